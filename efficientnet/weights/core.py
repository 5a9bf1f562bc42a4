"""The part every weight source shares: the tensors our model expects, and a strict assembly of
a source's tensors into our variable tree.

A source module turns a foreign file or object into a flat ``{source_key: array}`` dict and
says, for each of our tensor paths, which source key fills it and how to lay it out. ``assemble``
then checks the match both ways (every tensor of ours filled, every source tensor used) and all
shapes, and raises one ``WeightsMismatchError`` naming the first offenders of each kind.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from efficientnet import arch

Transform = Callable[[np.ndarray], np.ndarray]
# Our tensor path ('blocks_3/dw_bn/mean') -> (source key, layout transform).
Plan = dict[str, tuple[str, Transform]]

BATCH_STATS_LEAVES = ('mean', 'var')
HEAD_PREFIX = 'classifier/'
_SHOW = 5  # offenders named per kind in an error message


class WeightsMismatchError(ValueError):
    """The source's tensors do not fill our model exactly (missing, unexpected or misshapen)."""


# Layout transforms into ours (conv kernels HWIO, depthwise (k, k, 1, C), dense (in, out)).
def identity(a: np.ndarray) -> np.ndarray:
    return a


def hwio_from_oihw(a: np.ndarray) -> np.ndarray:
    """PyTorch conv weight (out, in/groups, kh, kw) -> (kh, kw, in/groups, out); for a depthwise
    weight (C, 1, k, k) this gives our (k, k, 1, C) directly."""
    return np.transpose(a, (2, 3, 1, 0))


def depthwise_from_tf(a: np.ndarray) -> np.ndarray:
    """TensorFlow/Keras depthwise kernel (k, k, C, multiplier=1) -> (k, k, 1, C)."""
    return np.transpose(a, (0, 1, 3, 2))


def transpose_2d(a: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight (out, in) -> (in, out)."""
    if a.ndim != 2:
        raise ValueError(f'expected a 2-D weight, got shape {a.shape}')
    return a.T


@functools.lru_cache(maxsize=32)
def _target_shapes(canonical: str, num_classes: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    # Imported here so that `import efficientnet.weights` stays cheap for the CLI's --help.
    import jax
    import jax.numpy as jnp

    from efficientnet import create_model

    # eval_shape traces the real module (so the tree is exactly the model's) but allocates
    # nothing; the tiny input and XLA depthwise keep the trace fast.
    model = create_model(canonical, num_classes=num_classes, depthwise_impl='xla')
    tree = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
    flat = {}
    for collection in ('params', 'batch_stats'):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree[collection])[0]:
            flat['/'.join(k.key for k in path)] = tuple(leaf.shape)
    # Natural order (blocks_2 before blocks_10), so errors name the earliest offenders first.
    return tuple(sorted(flat.items(), key=lambda kv: _natural(kv[0])))


def _natural(path: str) -> tuple:
    return tuple((0, int(p), '') if p.isdigit() else (1, 0, p) for p in re.split(r'(\d+)', path))


def target_shapes(
    name: str, num_classes: int = 1000, skip_head: bool = False
) -> dict[str, tuple[int, ...]]:
    """Every tensor of ``create_model(name, num_classes=...)`` as {'stem_bn/mean': shape, ...};
    without the classifier when ``skip_head``."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f'num_classes must be a positive int, got {num_classes!r}')
    canonical = arch.get_variant(name).name
    return dict(_target_shapes(canonical, 0 if skip_head else num_classes))


def is_batch_stat(path: str) -> bool:
    return path.rsplit('/', 1)[-1] in BATCH_STATS_LEAVES


def block_path(path: str) -> tuple[int | None, str]:
    """'blocks_3/se/reduce/kernel' -> (3, 'se/reduce/kernel'); 'stem_bn/mean' -> (None, path)."""
    head, _, rest = path.partition('/')
    if head.startswith('blocks_'):
        return int(head[len('blocks_') :]), rest
    return None, path


def _dims(shape: tuple[int, ...]) -> str:
    return 'x'.join(map(str, shape)) or 'scalar'


def _listing(kind: str, items: list[str]) -> str:
    shown = ', '.join(items[:_SHOW])
    more = f', ... ({len(items) - _SHOW} more)' if len(items) > _SHOW else ''
    return f'{len(items)} {kind}: {shown}{more}'


def assemble(
    source: Mapping[str, Any],
    plan: Plan,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    ignored: Iterable[str] = (),
    what: str = 'weights',
    model: str = '',
) -> dict[str, dict]:
    """Fills every path of ``shapes`` from ``source`` through ``plan``; strict both ways.

    ``ignored`` source keys may stay unused (a dropped head, preprocessing constants). Returns
    ``{'params': ..., 'batch_stats': ...}`` as nested dicts of float32 numpy arrays.
    """
    missing, misshapen, used, flat = [], [], set(), {}
    for path, shape in shapes.items():
        key, transform = plan[path]
        if key not in source:
            missing.append(f'{path} (needs {key})')
            continue
        used.add(key)
        raw = np.asarray(source[key], dtype=np.float32)
        try:
            arr = transform(raw)
        except ValueError:
            arr = raw
        if arr.shape != shape:
            misshapen.append(f'{path} expects {_dims(shape)} but {key} gives {_dims(arr.shape)}')
            continue
        flat[path] = np.ascontiguousarray(arr)
    skip = set(ignored)
    unexpected = sorted((k for k in source if k not in used and k not in skip), key=_natural)
    if missing or misshapen or unexpected:
        parts = [
            _listing(kind, items)
            for kind, items in (
                ('missing', missing),
                ('unexpected', unexpected),
                ('shape mismatches', misshapen),
            )
            if items
        ]
        hint = ''
        if missing and all(m.startswith(HEAD_PREFIX) for m in missing):
            hint = ' (the source has no classifier: pass skip_head=True for a backbone)'
        elif misshapen and all(m.startswith(HEAD_PREFIX) for m in misshapen):
            hint = (
                ' (the classifier has a different class count: pass num_classes=... to '
                'match it, or skip_head=True to drop it)'
            )
        target = f' as {model}' if model else ''
        raise WeightsMismatchError(f'{what} do not fit{target}: ' + '; '.join(parts) + hint)
    return unflatten(flat)


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """{'stem_bn/mean': a, ...} -> {'params': {...}, 'batch_stats': {'stem_bn': {'mean': a}}}."""
    out: dict[str, dict] = {'params': {}, 'batch_stats': {}}
    for path, arr in flat.items():
        node = out['batch_stats' if is_batch_stat(path) else 'params']
        *parents, leaf = path.split('/')
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = arr
    return out


def classifier_classes(variables: Mapping[str, Any]) -> int:
    """Class count of the classifier in our variable tree, 0 when it has none (a backbone)."""
    params = variables.get('params', {})
    kernel = params.get('classifier', {}).get('kernel') if isinstance(params, Mapping) else None
    return 0 if kernel is None else int(np.shape(kernel)[-1])


def count(variables: Mapping[str, Any]) -> tuple[int, int, int]:
    """(tensors, parameter elements, batch-stat elements) of a variables dict."""
    import jax

    params = jax.tree.leaves(variables.get('params', {}))
    stats = jax.tree.leaves(variables.get('batch_stats', {}))
    return (
        len(params) + len(stats),
        sum(int(np.size(a)) for a in params),
        sum(int(np.size(a)) for a in stats),
    )


def blocks_of(name: str) -> list[arch.BlockSpec]:
    return arch.build_blocks(arch.get_variant(name))
