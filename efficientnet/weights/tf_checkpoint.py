"""Official TensorFlow checkpoints (tensorflow/tpu ``models/official/efficientnet`` and
google/automl ``efficientnetv2``, which name variables the same way).

Variables live under the model's scope, e.g. ``efficientnet-b0/`` or ``efficientnetv2-s/``:

    stem/conv2d/kernel, stem/tpu_batch_normalization/{gamma,beta,moving_mean,moving_variance}
    blocks_N/...                          (see _block_names: numbering depends on expansion)
    head/conv2d/kernel, head/tpu_batch_normalization/*, head/dense/{kernel,bias}

Inside a block, tf.layers numbers same-typed layers in call order, so a block without the
expand conv shifts every later name by one. A V2 Fused-MBConv block holds conv2d (the k x k
conv) and conv2d_1 (the projection) with their batch norms, or, without expansion, only
conv2d and one batch norm. Training writes slots next to each variable
(``<var>/ExponentialMovingAverage``, ``<var>/RMSProp``, ...); the EMA copy is what the official
evaluation and exports use, so it is preferred when present.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from efficientnet import arch, paths
from efficientnet.weights import core

EMA_SUFFIX = '/ExponentialMovingAverage'
_STEM_KERNEL = '/stem/conv2d/kernel'
_BN_LEAF = {'scale': 'gamma', 'bias': 'beta', 'mean': 'moving_mean', 'var': 'moving_variance'}
_HEAD_KEYS = ('head/dense/kernel', 'head/dense/bias')
_log = logging.getLogger(__name__)


def _block_names(spec: arch.BlockSpec, bn: str) -> dict[str, str]:
    expanded = spec.expand != 1
    if spec.fused:
        if not expanded:
            return {'project_conv': 'conv2d', 'project_bn': bn}
        return {
            'expand_conv': 'conv2d',
            'expand_bn': bn,
            'se/reduce': 'se/conv2d',
            'se/expand': 'se/conv2d_1',
            'project_conv': 'conv2d_1',
            'project_bn': f'{bn}_1',
        }
    if expanded:
        return {
            'expand_conv': 'conv2d',
            'expand_bn': bn,
            'dw_conv': 'depthwise_conv2d',
            'dw_bn': f'{bn}_1',
            'se/reduce': 'se/conv2d',
            'se/expand': 'se/conv2d_1',
            'project_conv': 'conv2d_1',
            'project_bn': f'{bn}_2',
        }
    return {
        'dw_conv': 'depthwise_conv2d',
        'dw_bn': bn,
        'se/reduce': 'se/conv2d',
        'se/expand': 'se/conv2d_1',
        'project_conv': 'conv2d',
        'project_bn': f'{bn}_1',
    }


def tf_plan(
    shapes: Mapping[str, tuple[int, ...]],
    blocks: list[arch.BlockSpec],
    bn: str = 'tpu_batch_normalization',
) -> core.Plan:
    top = {
        'stem_conv': 'stem/conv2d',
        'stem_bn': f'stem/{bn}',
        'head_conv': 'head/conv2d',
        'head_bn': f'head/{bn}',
        'classifier': 'head/dense',
    }
    plan = {}
    for path in shapes:
        index, rest = core.block_path(path)
        module, leaf = rest.rsplit('/', 1)
        if index is None:
            scope = top[module]
        else:
            scope = f'blocks_{index}/' + _block_names(blocks[index], bn)[module]
        if module.endswith('_bn'):
            var = _BN_LEAF[leaf]
        elif module == 'dw_conv':
            var = 'depthwise_kernel'
        else:
            var = leaf
        transform = core.depthwise_from_tf if module == 'dw_conv' else core.identity
        plan[path] = (f'{scope}/{var}', transform)
    return plan


def checkpoint_prefix(path: str) -> str:
    """A checkpoint prefix from what a user may pass (local or gs://): the prefix, its '.index'
    file, or a directory (with a 'checkpoint' state file, or holding exactly one '.index')."""
    if path.endswith('.index') and paths.as_path(path).is_file():
        return path[: -len('.index')]
    if paths.as_path(path).is_dir() and not paths.as_path(path, 'checkpoint').is_file():
        indexes = [n for n in paths.listdir(path) if n.endswith('.index')]
        if len(indexes) == 1:
            return os.path.join(path, indexes[0][: -len('.index')])
        if len(indexes) > 1:
            raise ValueError(
                f'{path} holds several checkpoints ({", ".join(indexes)}) and no '
                "'checkpoint' file naming one: pass the prefix"
            )
    return path


def _open(path: str) -> Any:
    import tensorflow as tf

    if not (paths.as_path(path).exists() or paths.as_path(path + '.index').exists()):
        raise FileNotFoundError(
            f'TensorFlow checkpoint not found: {path} '
            '(give the prefix, e.g. model.ckpt, or its directory)'
        )
    path = checkpoint_prefix(path)
    try:
        return tf.train.load_checkpoint(path)
    except (ValueError, tf.errors.OpError) as e:
        raise ValueError(f'cannot read a TensorFlow checkpoint at {path}: {e}') from e


def classifier_classes(path: str | os.PathLike) -> int:
    """Class count of the checkpoint's classifier ('head/dense/kernel'); 0 if it has none."""
    for name, shape in _open(os.fspath(path)).get_variable_to_shape_map().items():
        if name.endswith('head/dense/kernel'):
            return int(shape[-1])
    return 0


def detect_scope(names: list[str]) -> str:
    """The model scope of a checkpoint: what precedes '/stem/conv2d/kernel'."""
    scopes = sorted({n[: -len(_STEM_KERNEL)] for n in names if n.endswith(_STEM_KERNEL)})
    if len(scopes) != 1:
        found = f'several: {", ".join(scopes)}' if scopes else 'none'
        raise ValueError(
            f'expected one EfficientNet scope holding "<scope>{_STEM_KERNEL}" in '
            f'the checkpoint, found {found}'
        )
    return scopes[0]


def from_tf_checkpoint(
    path: str | os.PathLike,
    name: str,
    *,
    use_ema: bool = True,
    num_classes: int = 1000,
    skip_head: bool = False,
) -> dict[str, dict]:
    """Converts an official tensorflow/tpu EfficientNet or google/automl EfficientNetV2
    checkpoint (a prefix such as ``efficientnet-b0/model.ckpt``, its '.index' file or its
    directory) for model ``name``.

    The model scope is read from the checkpoint; a scope naming another variant is an error.
    With ``use_ema`` each variable's ``ExponentialMovingAverage`` copy is taken where present.
    Optimizer slots and variables outside the scope (global_step, ...) are ignored; any other
    missing, extra or misshapen tensor raises ``WeightsMismatchError`` (a ValueError).
    """
    canonical = arch.get_variant(name).name
    reader = _open(os.fspath(path))
    names = sorted(reader.get_variable_to_shape_map())
    scope = detect_scope(names)
    try:
        stored = arch.get_variant(scope.rsplit('/', 1)[-1]).name
    except ValueError:
        stored = None  # a custom scope: the shape checks decide
    if stored is not None and stored != canonical:
        raise ValueError(f'the checkpoint holds {stored} (scope {scope!r}), not {canonical}')

    inside = {n[len(scope) + 1 :] for n in names if n.startswith(scope + '/')}
    # A variable named '<another variable>/<suffix>' is a slot of it (EMA, RMSProp, Momentum).
    variables = {n for n in inside if not _parents(n) & inside}
    source, ema_used = {}, 0
    for n in variables:
        if use_ema and n + EMA_SUFFIX in inside:
            source[n] = reader.get_tensor(f'{scope}/{n}{EMA_SUFFIX}')
            ema_used += 1
        else:
            source[n] = reader.get_tensor(f'{scope}/{n}')
    _log.info(
        '%s: %d of %d tensors from their ExponentialMovingAverage copies',
        os.fspath(path),
        ema_used,
        len(source),
    )

    bn = (
        'tpu_batch_normalization'
        if 'stem/tpu_batch_normalization/gamma' in source
        else 'batch_normalization'
    )
    shapes = core.target_shapes(canonical, num_classes, skip_head)
    return core.assemble(
        source,
        tf_plan(shapes, core.blocks_of(canonical), bn),
        shapes,
        ignored=_HEAD_KEYS if skip_head else (),
        what='TensorFlow checkpoint',
        model=canonical,
    )


def _parents(name: str) -> set[str]:
    """'a/b/c' -> {'a', 'a/b'}."""
    parts = name.split('/')
    return {'/'.join(parts[:i]) for i in range(1, len(parts))}
