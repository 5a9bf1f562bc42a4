"""Checkpoints with orbax: async saves, the K latest plus the best by EMA top-1, the host-local
data-pipeline state beside each, automatic resume onto any mesh, and ``init_from`` weights
(read by ``efficientnet.weights``, which knows this layout).

Layout under the workdir::

    checkpoints/<step>/state        the TrainState (global jax.Arrays, any sharding)
    best/<step>/state               the best one by eval top-1 (kept apart, never rotated out)
    data_state/<step>/process_<i>   each process's input-iterator state (host-local bytes)

Orbax writes into a temporary directory and renames it when complete (on gs://, where a rename
is a copy, it writes the step directory in place and a commit file into it last), and only
deletes old steps after a newer one is finalised, so a crash or a failed save never removes the
last good checkpoint. The workdir may be local or gs:// (orbax takes both; the data-state files
go through ``efficientnet.paths``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from efficientnet import paths, weights
from efficientnet.weights import train_state
from training.state import TrainState


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


class Checkpointer:
    """The run's checkpoints. Every process must call save/restore (orbax coordinates them)."""

    def __init__(
        self, workdir: str, *, keep: int = 3, keep_best: bool = True, async_save: bool = True
    ):
        self.workdir = paths.absolute(workdir)  # a gs:// URL stays one
        opts = dict(enable_async_checkpointing=async_save, create=True)
        self.latest = ocp.CheckpointManager(
            os.path.join(self.workdir, train_state.LATEST_DIR),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, **opts),
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
        self.data_dir = os.path.join(self.workdir, 'data_state')

    # -- saving ---------------------------------------------------------------------------
    def save(self, step: int, state: TrainState, data_state: bytes | None = None) -> None:
        """Starts an async save of ``state`` at ``step`` (a no-op if that step exists)."""
        if step in self.latest.all_steps():
            return
        if self.best is not None:
            # Orbax names its multi-host barriers by step (and some not at all), not by manager:
            # two managers saving at once collide across processes ("barrier ... is already
            # ongoing"). One manager's save must finish before the other's starts.
            self.best.wait_until_finished()
        if data_state is not None:
            self._write_data_state(step, data_state)
        self.latest.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True
        )
        self._prune_data_states()

    def save_best(self, step: int, state: TrainState, top1: float) -> None:
        """Offers ``state`` as the best checkpoint; orbax keeps it only if top-1 improved."""
        if self.best is None or step in self.best.all_steps():
            return
        self.latest.wait_until_finished()  # see save(): never two managers in flight
        self.best.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
            metrics={'top1': float(top1)},
            force=True,
        )

    def wait(self) -> None:
        self.latest.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        if self.best is not None:
            self.best.close()

    def _data_path(self, step: int) -> str:
        return os.path.join(self.data_dir, str(step), f'process_{jax.process_index()}')

    def _write_data_state(self, step: int, data: bytes) -> None:
        paths.write_atomic(self._data_path(step), data)

    def _prune_data_states(self) -> None:
        keep = set(self.latest.all_steps()) | {max(self.latest.all_steps(), default=-1)}
        for name in paths.listdir(self.data_dir):
            if name.isdigit() and int(name) not in keep and int(name) < max(keep, default=0):
                step_dir = paths.as_path(self.data_dir, name)
                step_dir.joinpath(f'process_{jax.process_index()}').unlink(missing_ok=True)
                try:  # the last process to prune a step removes its directory
                    step_dir.rmdir()
                except (OSError, ValueError):  # another process's file is still there
                    pass

    # -- restoring ------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore(
        self, abstract_state: TrainState, shardings: Any, step: int | None = None
    ) -> tuple[TrainState, bytes | None] | None:
        """Restores the latest (or given) step into ``shardings``, which may describe a
        different mesh than the one that saved it. Returns (state, data_state) or None."""
        step = self.latest.latest_step() if step is None else step
        if step is None:
            return None
        target = _abstract(abstract_state, shardings)
        restored = self.latest.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        data_state = None
        path = paths.as_path(self._data_path(step))
        if path.exists():
            data_state = path.read_bytes()
        logging.info('restored checkpoint at step %d from %s', step, self.workdir)
        return restored['state'], data_state


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
