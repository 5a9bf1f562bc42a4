"""Checkpoints with orbax: async saves, the K latest plus the best by EMA top-1, the train
stream's position beside each, automatic resume onto any mesh, and ``init_from`` weights (read
by ``efficientnet.weights``, which knows this layout).

Layout under the workdir::

    checkpoints/<step>/state        the TrainState (global jax.Arrays, any sharding)
    checkpoints/<step>/data         the train stream's state (JSON: format version, step, seed,
                                    examples, global batch; the same for every process)
    best/<step>/state               the best one by eval top-1 (kept apart, never rotated out)

Orbax writes into a temporary directory and renames it when complete (on gs://, where a rename
is a copy, it writes the step directory in place and a commit file into it last), and only
deletes old steps after a newer one is finalised, so a crash or a failed save never removes the
last good checkpoint. The workdir may be local or gs:// (orbax takes both).
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

DATA_ITEM = 'data'


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

    # -- saving ---------------------------------------------------------------------------
    def save(self, step: int, state: TrainState, data_state: dict | None = None) -> None:
        """Starts an async save of ``state`` (and the JSON-able ``data_state``) at ``step`` (a
        no-op if that step exists)."""
        if step in self.latest.all_steps():
            return
        if self.best is not None:
            # Orbax names its multi-host barriers by step (and some not at all), not by manager:
            # two managers saving at once collide across processes ("barrier ... is already
            # ongoing"). One manager's save must finish before the other's starts.
            self.best.wait_until_finished()
        items = {'state': ocp.args.StandardSave(state)}
        if data_state is not None:
            items[DATA_ITEM] = ocp.args.JsonSave(data_state)
        self.latest.save(step, args=ocp.args.Composite(**items), force=True)

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

    # -- restoring ------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore(
        self, abstract_state: TrainState, shardings: Any, step: int | None = None
    ) -> tuple[TrainState, dict | None] | None:
        """Restores the latest (or given) step into ``shardings``, which may describe a
        different mesh than the one that saved it. Returns (state, data_state) or None."""
        step = self.latest.latest_step() if step is None else step
        if step is None:
            return None
        target = _abstract(abstract_state, shardings)
        items = {'state': ocp.args.StandardRestore(target)}
        step_dir = paths.as_path(self.latest.directory, str(step))
        if step_dir.joinpath(DATA_ITEM).exists():  # absent in checkpoints of older versions
            items[DATA_ITEM] = ocp.args.JsonRestore()
        restored = self.latest.restore(step, args=ocp.args.Composite(**items))
        data_state = restored[DATA_ITEM] if DATA_ITEM in items else None
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
