"""Our own training checkpoints as weights: the orbax directories ``train.py`` writes.

    <workdir>/checkpoints/<step>/state    the latest TrainState saves
    <workdir>/best/<step>/state           the best one by eval top-1

A saved TrainState holds ``params``, ``batch_stats`` and their EMA copies ``ema_params``,
``ema_batch_stats`` (plus the optimizer state and step). These functions find a step directory
and read its variables as host numpy arrays, whatever mesh or process count saved them. Paths may
be local or gs:// (``efficientnet.paths``). orbax is imported only inside the function that
reads.

Each step directory also holds ``checksums/``: a digest of every saved array (``digests``),
written by ``train.py`` from the arrays in memory and checked against what is read back, so a
checkpoint whose files were damaged after the save (flipped, truncated or lost bytes) is refused
instead of being used as if it were good.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficientnet import paths

LATEST_DIR = 'checkpoints'
BEST_DIR = 'best'
STATE_ITEM = 'state'
CHECKSUMS_ITEM = 'checksums'  # orbax's JSON item beside the state: its file is 'metadata'
CHECKSUMS_FILE = 'metadata'
CHECKSUMS_FORMAT = 1
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
    """A saved TrainState (``<step>/state``) as a dict of host numpy arrays, whatever mesh or
    process count saved it (every process reads the whole arrays; meant for weights and tests,
    not for resuming), verified against the step's checksums (ValueError if they disagree)."""
    import orbax.checkpoint as ocp

    state_dir = paths.absolute(state_dir)
    # The item's handler, not a Checkpointer: a Checkpointer looks for orbax's step metadata
    # (_CHECKPOINT_METADATA) inside the item directory, where it never is (it is in the step
    # directory), and warns that it does not exist.
    handler = ocp.PyTreeCheckpointHandler()
    try:
        meta = handler.metadata(paths.as_path(state_dir))
        tree = getattr(meta, 'tree', meta)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = handler.restore(
            paths.as_path(state_dir), args=ocp.args.PyTreeRestore(restore_args=restore_args)
        )
    finally:
        handler.close()
    step_dir = os.path.dirname(state_dir)
    verify(step_dir, state)
    return state


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


# -- checksums -----------------------------------------------------------------------------
# A digest is a function of an array's values (their bits), not of how it is sharded or laid out
# in files: every step is exact uint32 arithmetic, wrapping sums are associative, so the same
# array gives the same digest on any mesh, process count or device, in any reduction order.


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's finaliser: every input bit flips about half of the output bits."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _as_words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (narrower types widened, wider ones split)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte types: a trailing axis of 2
    narrow = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)


def _leaf_digest(x: jax.Array) -> jax.Array:
    """uint32[3]: two independent 32-bit hashes of the values and their positions, and 1 if
    every value is finite (always for integer arrays)."""
    x = jnp.asarray(x)
    words = _as_words(x)
    index = jnp.zeros(words.shape, jnp.uint32)  # the flat position, from iotas: keeps sharding
    stride = 1
    for axis in reversed(range(words.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
        index = index + iota * np.uint32(stride % 2**32)
        stride *= words.shape[axis]
    h1 = jnp.sum(_fmix32(words ^ _fmix32(index + np.uint32(0x9E3779B9))), dtype=jnp.uint32)
    h2 = jnp.sum(words * (index * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32)  # odd weights
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else True
    return jnp.stack([h1, h2, jnp.asarray(finite, jnp.uint32)])


def digests(tree: Any, groups: tuple[tuple[int, ...], ...] | None = None) -> jax.Array:
    """uint32[leaves, 3]: ``_leaf_digest`` of each leaf of ``tree`` in flattening order; trace
    it under ``jax.jit`` (one pass over the state, one small array to fetch).

    ``groups`` (default: ``leaf_groups``) partitions the leaf indices into sets of one shape and
    dtype; each set is hashed as one stacked array, so the program grows with the number of
    distinct shapes, not with the number of arrays (a deep network's state repeats a few shapes
    hundreds of times): B7's state (3,496 arrays, 79 shapes) compiles in 20 s instead of 220 s
    on 2 CPU cores. The digests are the same either way (exact integer arithmetic); the price is
    a transient copy of the state in device memory while it is hashed."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((0, 3), jnp.uint32)
    groups = leaf_groups(leaves) if groups is None else groups
    hashed = [
        jax.vmap(_leaf_digest)(jnp.stack([jnp.asarray(leaves[i]) for i in group]))
        for group in groups
    ]
    order = np.argsort(np.concatenate([np.asarray(g, np.int64) for g in groups]))
    return jnp.concatenate(hashed)[order]  # back in leaf order: one gather


def leaf_groups(leaves: list[Any], key: Any = None) -> tuple[tuple[int, ...], ...]:
    """The indices of ``leaves`` grouped by shape, dtype and ``key(leaf)`` (``device_digests``
    passes the sharding, so that stacking a group never moves data between devices)."""
    groups: dict[Any, list[int]] = {}
    for i, x in enumerate(leaves):
        k = (tuple(np.shape(x)), jnp.result_type(x), None if key is None else key(x))
        groups.setdefault(k, []).append(i)
    return tuple(tuple(g) for g in groups.values())


def _key_name(key: Any) -> str:
    for attr in ('name', 'key', 'idx'):  # GetAttrKey, DictKey/FlattenedIndexKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


@functools.cache
def _jitted_digests(out_sharding: Any, groups: tuple[tuple[int, ...], ...]) -> Any:
    return jax.jit(functools.partial(digests, groups=groups), out_shardings=out_sharding)


def device_digests(tree: Any) -> np.ndarray:
    """``digests`` of a tree of arrays, computed where they are (global jax.Arrays on their
    mesh: one jitted pass, a few bytes per array come back to every process; host arrays on
    the default device)."""
    from jax.sharding import NamedSharding, PartitionSpec

    leaves = jax.tree.leaves(tree)
    mesh = next(
        (
            x.sharding.mesh
            for x in leaves
            if isinstance(getattr(x, 'sharding', None), NamedSharding)
        ),
        None,
    )
    groups = leaf_groups(leaves, key=lambda x: getattr(x, 'sharding', None))
    out_sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    out = _jitted_digests(out_sharding, groups)(tree)
    return np.asarray(out.addressable_data(0))


def leaf_names(tree: Any) -> list[str]:
    """The leaves' paths as '/'-joined names (``params/stem/conv/kernel``), in ``digests``
    order: the same for the TrainState that was saved and the dict tree read back."""
    return [
        '/'.join(_key_name(k) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def checksums_record(tree: Any, digest: np.ndarray) -> dict[str, Any]:
    """The JSON saved beside a state: each array's shape, dtype and 64-bit digest."""
    arrays = {}
    for name, x, d in zip(leaf_names(tree), jax.tree.leaves(tree), np.asarray(digest)):
        arrays[name] = {
            'shape': list(np.shape(x)),
            'dtype': str(jnp.dtype(x.dtype)),
            'digest': f'{int(d[0]):08x}{int(d[1]):08x}',
        }
    return {'format': CHECKSUMS_FORMAT, 'arrays': arrays}


def non_finite(tree: Any, digest: np.ndarray) -> list[str]:
    """The names of the leaves that hold a NaN or an infinity (from ``digests``)."""
    return [n for n, d in zip(leaf_names(tree), np.asarray(digest)) if not d[2]]


def mismatches(record: dict[str, Any], tree: Any, digest: np.ndarray) -> list[str]:
    """How ``tree`` (with its ``digests``) differs from a saved ``checksums_record``, one short
    phrase per array: [] when every array is the one that was saved."""
    if record.get('format') != CHECKSUMS_FORMAT:
        return [f'checksums in an unknown format {record.get("format")!r}']
    now = checksums_record(tree, digest)['arrays']
    saved = record.get('arrays', {})
    out = [f'{n} is missing' for n in saved if n not in now]
    out += [f'{n} was not saved' for n in now if n not in saved]
    for name, got in now.items():
        want = saved.get(name)
        if want is None:
            continue
        for field in ('shape', 'dtype', 'digest'):
            if got[field] != want[field]:
                out.append(f'{name} {field} {got[field]} != saved {want[field]}')
                break
    return out


def read_checksums(step_dir: str) -> dict[str, Any] | None:
    """The checksums saved in ``step_dir``; None when the step has none (saved before they
    were recorded). Raises ValueError when the file exists but is not valid JSON."""
    path = paths.as_path(step_dir, CHECKSUMS_ITEM, CHECKSUMS_FILE)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f'{path}: unreadable checksums ({e})') from None


def lists_checksums(step_dir: str) -> bool:
    """Whether orbax's step metadata names a checksums item (so a missing one is damage, not a
    step saved before checksums were recorded); True when that metadata cannot be read."""
    try:
        meta = json.loads(paths.as_path(step_dir, '_CHECKPOINT_METADATA').read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return True
    return CHECKSUMS_ITEM in (meta.get('item_handlers') or {})


def verify(step_dir: str, tree: Any) -> None:
    """Raises ValueError naming the first damaged array when ``tree`` (read from
    ``step_dir``) is not what was saved there; does nothing for a step saved without
    checksums."""
    record = read_checksums(step_dir)
    if record is None:
        return
    problems = mismatches(record, tree, device_digests(tree))
    if problems:
        more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
        raise ValueError(
            f'{step_dir} is damaged: {problems[0]}{more}; it does not hold what was saved'
        )
