"""Our own training checkpoints as weights: the orbax directories ``train.py`` writes.

    <workdir>/checkpoints/<step>/state    the latest TrainState saves
    <workdir>/best/<step>/state           the best one by eval top-1

A saved TrainState holds ``params``, ``batch_stats`` and their EMA copies ``ema_params``,
``ema_batch_stats`` (plus the optimizer state and step). These functions find a step directory
and read its variables as host numpy arrays, whatever mesh or process count saved them. Paths may
be local or gs:// (``efficientnet.paths``). orbax is imported only inside the function that
reads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from efficientnet import paths

LATEST_DIR = 'checkpoints'
BEST_DIR = 'best'
STATE_ITEM = 'state'
# Orbax finishes a save by renaming '<step>.orbax-checkpoint-tmp-*' to '<step>' on local disks;
# on gs://, where a rename is a copy, it writes '<step>' directly and this file into it last.
COMMIT_FILE = 'commit_success.txt'


def _holds_state(path: str) -> bool:
    """Whether ``path`` holds a finished save: ``state/`` (and on gs://, the commit file)."""
    if not paths.as_path(path, STATE_ITEM).is_dir():
        return False
    return not paths.is_remote(path) or paths.as_path(path, COMMIT_FILE).exists()


def is_step_dir(path: str) -> bool:
    """Whether ``path`` is one finished save: a directory named by its step holding ``state/``
    (and on gs://, orbax's commit file)."""
    path = paths.absolute(path)
    return os.path.basename(path).isdigit() and _holds_state(path)


def newest_step_dir(root: str) -> str | None:
    """The finished step directory with the highest step under ``root``, None if there is none."""
    root = paths.absolute(root)
    steps = [int(n) for n in paths.listdir(root) if is_step_dir(os.path.join(root, n))]
    return os.path.join(root, str(max(steps))) if steps else None


def find_step_dir(path: str, subdirs: Sequence[str] = (BEST_DIR, LATEST_DIR)) -> str | None:
    """``path`` itself when it holds a saved state (a step directory), else the newest step of
    the first of ``subdirs`` (relative to ``path``; '' is ``path`` itself) that holds one; None
    if none does. Paths come back absolute (URLs unchanged)."""
    path = paths.absolute(path)
    if _holds_state(path):
        return path
    for sub in subdirs:
        found = newest_step_dir(os.path.join(path, sub) if sub else path)
        if found is not None:
            return found
    return None


def workdir_of(step_dir: str) -> str:
    """The workdir a step directory (``<workdir>/{checkpoints,best}/<step>``) belongs to."""
    return os.path.dirname(os.path.dirname(paths.absolute(step_dir)))


def read_state(state_dir: str) -> dict[str, Any]:
    """A saved TrainState as a dict of host numpy arrays, whatever mesh or process count saved
    it (every process reads the whole arrays; meant for weights and tests, not for resuming)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(state_dir)
        tree = getattr(meta, 'item_metadata', meta)
        tree = getattr(tree, 'tree', tree)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def read_variables(step_dir: str, *, use_ema: bool = True) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` of one step directory: the EMA copies with ``use_ema``."""
    state = read_state(os.path.join(step_dir, STATE_ITEM))
    prefix = 'ema_' if use_ema else ''
    return {
        'params': state[prefix + 'params'],
        'batch_stats': state.get(prefix + 'batch_stats', {}),
    }


def read_state_shapes(state_dir: str) -> dict[str, Any]:
    """The shapes of a saved TrainState's arrays (a dict of tuples, like ``read_state``'s),
    from orbax's metadata alone: nothing is restored."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(state_dir)
    tree = getattr(meta, 'item_metadata', meta)
    tree = getattr(tree, 'tree', tree)
    return jax.tree.map(lambda m: tuple(m.shape), tree)
