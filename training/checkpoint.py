"""Checkpoints with orbax: async saves, the K latest plus the best by EMA top-1, the train
stream's position beside each, automatic resume onto any mesh, and ``init_from`` weights (read
by ``efficientnet.weights``, which knows this layout).

Layout under the workdir::

    checkpoints/<step>/state        the TrainState (global jax.Arrays, any sharding), one
                                    subtree per block even where the run's state holds a
                                    stage's repeats stacked (``scan_blocks``; converted both
                                    ways here, losslessly)
    checkpoints/<step>/checksums    a digest of every array of it (efficientnet.weights.train_state)
    checkpoints/<step>/data         the train stream's state (JSON: format version, step, seed,
                                    examples, global batch; the same for every process)
    checkpoints/<step>.skipped-<why> a step that failed to restore or verify, set aside (kept)
    best/<step>/{state,checksums}   the best one by eval top-1 (kept apart, never rotated out)

Orbax writes into a temporary directory and renames it when complete (on gs://, where a rename
is a copy, it writes the step directory in place and a commit file into it last), and only
deletes old steps after a newer one is finalised, so a crash or a failed save never removes the
last good checkpoint. The workdir may be local or gs:// (orbax takes both).

What this module adds for safety:

- a state is saved only if every array of it (parameters, BatchNorm statistics, EMA, optimizer
  state) is finite, checked in the same jitted pass that computes its checksums;
- restoring walks back from the newest step to the newest one that restores and matches its
  checksums; each step skipped on the way is renamed ``<step>.skipped-<why>`` (never deleted),
  with one log line saying why;
- rotation keeps the K newest steps and, besides them, the step the run resumed from (the
  newest one known to verify) until a later restart verifies a newer one;
- a failed async save is reported (``CheckpointError``: path and cause on one line) at the
  first step after it failed, before the next save starts and at exit.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from efficientnet import model as efficientnet_model
from efficientnet import paths, weights
from efficientnet.weights import train_state
from training import state as state_lib
from training.state import TrainState

DATA_ITEM = 'data'  # the train stream's state, saved with each latest step
SKIPPED = '.skipped-'  # '<step>.skipped-<why>': orbax's step listing ignores such names

# Orbax writes a replicated array "replica-parallel": each replica writes a slice of it, cut on
# its device by an eager ``jax.lax.slice_in_dim``, which compiles one program per array shape,
# device and slice. For a network's many small arrays that is hundreds of compilations at the
# first save (360, 15 s of a smoke run on 8 CPU devices) to split writes of a few kilobytes.
# Only slices of at least this many bytes are written that way; smaller arrays are written
# whole by one replica, as orbax does when replica-parallel is off.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 1 << 20


def _register_array_handler() -> None:
    absl_logger = logging.getLogger('absl')  # orbax warns on the console that it overrides
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array,
            ocp.type_handlers.ArrayHandler(
                # The default handler's per-host array metadata store (not exported by orbax),
                # so the files written stay the same.
                array_metadata_store=getattr(
                    ocp.type_handlers.get_type_handler(jax.Array), '_array_metadata_store', None
                ),
                min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES,
            ),
            override=True,
        )
    finally:
        absl_logger.setLevel(level)


_register_array_handler()


class CheckpointError(RuntimeError):
    """A save failed, or no checkpoint of the workdir restores: one line naming path and cause."""


class NonFiniteStateError(FloatingPointError):
    """The state about to be saved holds a NaN or an infinity (the run diverged)."""


class _Damaged(Exception):
    def __init__(self, tag: str, why: str):
        super().__init__(why)
        self.tag = tag


def _holds_stacked(params: Any) -> bool:
    return any(efficientnet_model.stacked_range(k) is not None for k in params)


# The per-block copy of a state whose runs of blocks are stacked (one compile per run).
_PER_BLOCK = jax.jit(state_lib.per_block)


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _cause(error: BaseException) -> str:
    """The innermost cause of ``error`` as one line (orbax wraps TensorStore's OSErrors)."""
    while error.__cause__ is not None or (
        error.__context__ is not None and not error.__suppress_context__
    ):
        error = error.__cause__ or error.__context__
    text = ' '.join(str(error).split()) or type(error).__name__
    # TensorStore appends its whole spec and source locations; the OS's reason (e.g. 'File too
    # large', 'No space left on device') ends the message before them.
    text = re.split(r' \[(?:tensorstore_spec|source locations)=', text)[0]
    return text if len(text) <= 320 else f'{text[:140]} ... {text[-170:]}'


@dataclasses.dataclass
class _KeepLatestAndVerified:
    """Orbax preservation policy: the ``n`` newest steps, and ``verified`` (the step this run
    resumed from after checking it) whatever its age, so that rotation never deletes the newest
    checkpoint known to be good while the newer ones have not been read back."""

    n: int
    verified: int | None = None

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        del context
        first_kept = len(checkpoints) - self.n
        return [i >= first_kept or c.step == self.verified for i, c in enumerate(checkpoints)]


class Checkpointer:
    """The run's checkpoints. Every process must call save/restore (orbax coordinates them)."""

    def __init__(
        self, workdir: str, *, keep: int = 3, keep_best: bool = True, async_save: bool = True
    ):
        self.workdir = paths.absolute(workdir)  # a gs:// URL stays one
        opts = dict(enable_async_checkpointing=async_save, create=True)
        self._policy = _KeepLatestAndVerified(keep)
        self.latest = ocp.CheckpointManager(
            os.path.join(self.workdir, train_state.LATEST_DIR),
            options=ocp.CheckpointManagerOptions(preservation_policy=self._policy, **opts),
        )
        self.best = None
        if keep_best:
            self.best = ocp.CheckpointManager(
                os.path.join(self.workdir, train_state.BEST_DIR),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1,
                    best_fn=lambda m: m['top1'],
                    best_mode='max',
                    keep_checkpoints_without_metrics=False,
                    **opts,
                ),
            )
        self._saving: dict[str, int] = {}  # manager directory -> step of its save in flight
        self._failed: dict[str, CheckpointError] = {}  # manager directory -> its failed save
        self._checked: tuple[int, dict] | None = None  # (step, checksums) of the last state

    def _managers(self) -> list[ocp.CheckpointManager]:
        return [self.latest] + ([self.best] if self.best is not None else [])

    # -- saving ---------------------------------------------------------------------------
    @staticmethod
    def _per_block(state: TrainState) -> TrainState:
        """``state`` as checkpoints hold it: with each stacked run of blocks split into one
        subtree per block (a jitted copy, freed once the save has it on the host)."""
        return _PER_BLOCK(state) if _holds_stacked(state.params) else state

    def _checksums(self, step: int, state: TrainState) -> dict:
        """The checksums of ``state``; NonFiniteStateError if any array is not finite."""
        if self._checked is not None and self._checked[0] == step:
            return self._checked[1]
        d = train_state.device_digests(state)
        bad = train_state.non_finite(state, d)
        if bad:
            more = f' and {len(bad) - 1} more arrays' if len(bad) > 1 else ''
            raise NonFiniteStateError(
                f'non-finite values at step {step} in {bad[0]}{more}: not saved; the newest '
                f'finite checkpoint in {self.workdir} stays the latest '
                f'(step {self.latest.latest_step()})'
            )
        record = train_state.checksums_record(state, d)
        self._checked = (step, record)
        return record

    def _start(
        self,
        manager: ocp.CheckpointManager,
        step: int,
        state: TrainState,
        data_state: dict | None = None,
        **kw,
    ) -> None:
        self._wait(manager)  # the previous save's outcome first: its error, not a later one
        if self._failed:  # a save failed (and was reported): write nothing more
            raise next(iter(self._failed.values()))
        record = self._checksums(step, state)
        items = {
            train_state.STATE_ITEM: ocp.args.StandardSave(state),
            train_state.CHECKSUMS_ITEM: ocp.args.JsonSave(record),
        }
        if data_state is not None:
            items[DATA_ITEM] = ocp.args.JsonSave(data_state)
        args = ocp.args.Composite(**items)
        self._saving[str(manager.directory)] = step
        try:
            manager.save(step, args=args, force=True, **kw)
        except Exception as e:  # the synchronous part (directories, metadata, host copies)
            error = self._save_error(manager, e)
            self._failed[str(manager.directory)] = error
            raise error from e

    def save(self, step: int, state: TrainState, data_state: dict | None = None) -> None:
        """Starts an async save of ``state`` (and the JSON-able ``data_state``) at ``step`` (a
        no-op if that step exists).
        Raises NonFiniteStateError (nothing written) if the state is not finite, and
        CheckpointError if this save or the previous one failed."""
        if step in self.latest.all_steps():
            return
        state = self._per_block(state)
        # Orbax names its multi-host barriers by step (and some not at all), not by manager:
        # two managers saving at once collide across processes ("barrier ... is already
        # ongoing"). One manager's save must finish before the other's starts. Waiting for both
        # also reports a failed earlier save before anything of this one is written.
        self.wait()
        self._checksums(step, state)  # NonFiniteStateError before anything is written
        self._start(self.latest, step, state, data_state)

    def save_best(self, step: int, state: TrainState, top1: float) -> None:
        """Offers ``state`` as the best checkpoint; orbax keeps it only if top-1 improved."""
        if self.best is None or step in self.best.all_steps():
            return
        state = self._per_block(state)
        self._wait(self.latest)  # see save(): never two managers in flight
        self._start(self.best, step, state, metrics={'top1': float(top1)})

    def _save_error(self, manager: ocp.CheckpointManager, error: BaseException) -> CheckpointError:
        step = self._saving.get(str(manager.directory))
        kept = manager.latest_step()
        return CheckpointError(
            f'saving the checkpoint of step {step} to {manager.directory}/{step} failed: '
            f'{_cause(error)}; the checkpoints saved before it are intact (latest: step {kept})'
        )

    def _wait(self, manager: ocp.CheckpointManager) -> None:
        """Waits for ``manager``'s save in flight; CheckpointError if it failed (raised once:
        later calls pass, but no further save starts)."""
        if str(manager.directory) in self._failed:
            return
        try:
            manager.wait_until_finished()
        except Exception as e:
            error = self._save_error(manager, e)
            self._failed[str(manager.directory)] = error
            raise error from e

    def check(self) -> None:
        """Raises CheckpointError if a save that finished in the background failed (cheap:
        waits for nothing; the training loop calls it every step)."""
        for manager in self._managers():
            if not manager.is_saving_in_progress():
                self._wait(manager)

    def wait(self) -> None:
        """Waits for the saves in flight; CheckpointError if one failed."""
        for manager in self._managers():
            self._wait(manager)

    def close(self) -> None:
        """Waits for the saves in flight and closes; CheckpointError if one failed (the
        managers are closed all the same)."""
        error = None
        for manager in self._managers():
            try:
                self._wait(manager)
            except CheckpointError as e:
                error = error or e
            try:  # joins orbax's background threads, a failed manager's too: left running,
                # they print tracebacks at exit ("Event loop is closed")
                manager.close()
            except Exception:  # noqa: BLE001 - a failed save's error again, already reported
                if str(manager.directory) not in self._failed:
                    raise
        if error is not None:
            raise error

    # -- restoring ------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore(
        self, abstract_state: TrainState, shardings: Any
    ) -> tuple[TrainState, dict | None] | None:
        """Restores the newest step that restores and verifies into ``shardings``, which may
        describe a different mesh than the one that saved it; returns (state, data_state), or
        None if the workdir holds no checkpoint. Each damaged step on the way is renamed
        ``<step>.skipped-<why>`` with one warning line; CheckpointError if none restores."""
        stacked = _holds_stacked(abstract_state.params)
        target = _abstract(abstract_state, shardings)
        if stacked:  # read per block (the saved layout), stack into the run's shardings
            target = state_lib.per_block(target)
        skipped = []
        for step in sorted(self.latest.all_steps(), reverse=True):
            restored, record, failure = None, None, None
            try:
                restored, record, data_state = self._read(step, target)
            except Exception as e:  # orbax and TensorStore raise many kinds
                failure = (e.tag, str(e)) if isinstance(e, _Damaged) else ('unreadable', _cause(e))
            # A file may fail to read on one process only: all of them must skip the step.
            if not _on_every_process(failure is None) and failure is None:
                failure = ('unreadable', 'another process could not read it')
            if failure is None:  # the digests are collective: every process, the same result
                failure = self._verify(step, restored, record)
            if failure is not None:
                tag, why = failure
                kept = self._set_aside(step, tag)
                logging.warning(
                    'checkpoint step %d skipped: %s; kept as %s; trying the step before it',
                    step,
                    why,
                    kept,
                )
                skipped.append(f'step {step} ({tag})')
                continue
            self._policy.verified = step
            logging.info('restored checkpoint at step %d from %s (verified)', step, self.workdir)
            if stacked:
                stack = lambda t: state_lib.stacked_like(t, abstract_state)
                restored = jax.jit(stack, out_shardings=shardings)(restored)
            return restored, data_state
        if skipped:
            raise CheckpointError(
                f'no checkpoint in {self.latest.directory} restores: skipped '
                f'{", ".join(skipped)}, kept under their {SKIPPED}* names; rerun to start '
                'from step 0, or rename one back to its step number to retry it'
            )
        return None

    def _read(self, step: int, target: Any) -> tuple[TrainState, dict | None, dict | None]:
        """Step ``step``'s state, checksums and data state (None in checkpoints of versions
        before it was saved), read by this process (raises if it cannot)."""
        step_dir = os.path.join(str(self.latest.directory), str(step))
        try:
            record = train_state.read_checksums(step_dir)
        except ValueError as e:
            raise _Damaged('checksums', str(e)) from None
        if record is None and train_state.lists_checksums(step_dir):
            raise _Damaged('checksums', f'{step_dir}: its checksums file is missing')
        items = {train_state.STATE_ITEM: ocp.args.StandardRestore(target)}
        if paths.as_path(step_dir, DATA_ITEM).exists():
            items[DATA_ITEM] = ocp.args.JsonRestore()
        restored = self.latest.restore(step, args=ocp.args.Composite(**items))
        return restored[train_state.STATE_ITEM], record, restored.get(DATA_ITEM)

    def _verify(self, step: int, state: TrainState, record: dict | None) -> tuple | None:
        """(tag, why) if ``state`` is not what was saved or not finite, else None."""
        d = train_state.device_digests(state)
        if record is None:
            logging.warning(
                'checkpoint step %d has no checksums (saved by an earlier version): '
                'restored unverified',
                step,
            )
        else:
            problems = train_state.mismatches(record, state, d)
            if problems:
                more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
                return 'checksum', f'checksum mismatch: {problems[0]}{more}'
        bad = train_state.non_finite(state, d)
        return ('nonfinite', f'non-finite values in {bad[0]}') if bad else None

    def _set_aside(self, step: int, tag: str) -> str:
        """Renames step ``step`` to ``<step>.skipped-<tag>`` (process 0; the others wait) so
        that orbax no longer lists it; returns the new path."""
        root = paths.as_path(self.latest.directory)
        names = set(paths.listdir(root))
        name, n = f'{step}{SKIPPED}{tag}', 1
        while name in names:
            n += 1
            name = f'{step}{SKIPPED}{tag}-{n}'
        if jax.process_index() == 0:
            root.joinpath(str(step)).rename(root.joinpath(name))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f'checkpoint_set_aside_{step}')
        self.latest.reload()
        return str(root.joinpath(name))


def _on_every_process(ok: bool) -> bool:
    """Whether ``ok`` holds on every process of the run."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def load_pretrained(path: str) -> dict[str, Any]:
    """``--config.init_from``: variables ``{'params', 'batch_stats'}`` from a converted-weights
    msgpack file or one of our checkpoint directories (a step directory, or a workdir's latest
    step; EMA weights); local or gs://."""
    path = paths.absolute(path)
    if paths.as_path(path).is_file():
        _, variables = weights.load_variables(path)
        return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
    step_dir = train_state.find_step_dir(path, (train_state.LATEST_DIR, ''))
    if step_dir is None:
        raise FileNotFoundError(
            f'init_from={path!r}: neither a weights file nor a checkpoint '
            f'(no {train_state.STATE_ITEM} directory under {path})'
        )
    return train_state.read_variables(step_dir, use_ema=True)


def merge_pretrained(init_tree: Any, pretrained: Any) -> tuple[Any, list[str]]:
    """Takes every pretrained leaf whose path and shape match ``init_tree`` (global jax.Arrays)
    and places it with the same sharding; keeps the fresh initialisation elsewhere (the head when
    the class count differs). Returns the merged tree and the re-initialised paths."""
    flat_pre = {
        jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(pretrained)[0]
    }
    fresh: list[str] = []

    def pick(path, x):
        k = jax.tree_util.keystr(path)
        v = flat_pre.get(k)
        if v is None or tuple(np.shape(v)) != tuple(x.shape):
            fresh.append(k)
            return x
        v = np.asarray(v, dtype=x.dtype)
        return jax.make_array_from_callback(x.shape, x.sharding, lambda idx: v[idx])

    return jax.tree_util.tree_map_with_path(pick, init_tree), fresh


def pretrained_shapes(path: str) -> dict[str, Any]:
    """The shapes of what ``load_pretrained(path)`` would return, ``{'params': ...,
    'batch_stats': ...}`` as trees of tuples: for one of our checkpoints read from orbax's
    metadata, without restoring an array (a config check before anything runs). Raises
    FileNotFoundError or ValueError as ``load_pretrained`` does."""
    path = paths.absolute(path)
    if not paths.as_path(path).exists():
        raise FileNotFoundError(f'no such file or directory: {path}')
    if paths.as_path(path).is_file():
        pre = load_pretrained(path)
        return jax.tree.map(np.shape, pre)
    step_dir = train_state.find_step_dir(path, (train_state.LATEST_DIR, ''))
    if step_dir is None:
        raise FileNotFoundError(
            f'neither a weights file nor a checkpoint (no {train_state.STATE_ITEM} directory '
            f'under {path})'
        )
    shapes = train_state.read_state_shapes(os.path.join(step_dir, train_state.STATE_ITEM))
    return {'params': shapes['ema_params'], 'batch_stats': shapes.get('ema_batch_stats', {})}


def untransferable(init_tree: Any, pretrained: Any) -> list[str]:
    """Paths of ``init_tree`` (arrays or shapes) that ``pretrained`` cannot fill, missing or of
    another shape, leaving out the classifier, which a new class count re-initialises. Anything
    listed means weights of another model, which would silently train from scratch."""
    available = _flat_shapes(pretrained)
    return [
        k
        for k, shape in _flat_shapes(init_tree).items()
        if "'classifier'" not in k and available.get(k) != shape
    ]


def _flat_shapes(tree: Any) -> dict[str, tuple]:
    """{path: shape} of a tree of arrays, ShapeDtypeStructs or shape tuples."""
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)
    return {
        jax.tree_util.keystr(p): v if is_shape(v) else tuple(np.shape(v))
        for p, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_shape)[0]
    }
