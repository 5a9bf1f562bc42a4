"""EfficientNet (Tan & Le, 2019), EfficientNet-Lite and EfficientNetV2 (Tan & Le, 2021) in
Flax linen.

    import efficientnet
    model = efficientnet.create_model('efficientnet-b0')
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    logits = model.apply(variables, images)          # images already normalised, NHWC

This package imports only jax, flax and numpy; weight import from Keras, PyTorch and
TensorFlow checkpoints (``efficientnet.weights``) loads those libraries lazily.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from efficientnet.arch import (
    BlockSpec,
    Variant,
    build_blocks,
    get_variant,
    list_models,
    round_filters,
    round_repeats,
)
from efficientnet.layers import DEPTHWISE_IMPLS, PADDINGS, resolve_scan_blocks
from efficientnet.model import EfficientNet, stack_blocks, stacked_runs, unstack_blocks

__version__ = '0.1.0'

_OVERRIDES = (
    'dropout_rate',
    'drop_path_rate',
    'padding',
    'depthwise_impl',
    'bn_group_size',
    'activation',
    'bn_momentum',
    'features_only',
    'remat',
    'scan_blocks',
    'dropblock_stages',
    'dropblock_size',
    'dropblock_scale_by_stage',
)
_SCALING = ('width', 'depth', 'resolution')


def scaled_variant(
    name: str,
    *,
    width: float | None = None,
    depth: float | None = None,
    resolution: int | None = None,
) -> Variant:
    """The named variant with its compound-scaling coefficients overridden.

    A changed width or depth makes a custom member of the family, named
    ``'<variant>-w<width>-d<depth>'``; ``resolution`` changes the native input size (and so the
    eval crop fraction) without renaming it.
    """
    variant = get_variant(name)
    for key, v in (('width', width), ('depth', depth)):
        if v is not None and not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f'{key} must be a positive number, got {v!r}')
    if resolution is not None and not (isinstance(resolution, int) and resolution > 0):
        raise ValueError(f'resolution must be a positive int, got {resolution!r}')
    if width is not None or depth is not None:
        width = variant.width if width is None else width
        depth = variant.depth if depth is None else depth
        variant = dataclasses.replace(
            variant, name=f'{variant.name}-w{width:g}-d{depth:g}', width=width, depth=depth
        )
    if resolution is not None:
        variant = dataclasses.replace(variant, resolution=resolution)
    return variant


def create_model(
    name: str, *, num_classes: int = 1000, dtype: Any = jnp.float32, **overrides: Any
) -> EfficientNet:
    """Builds the named variant ('efficientnet-b0' ... 'efficientnet-l2', 'efficientnet-lite0'
    ... 'efficientnet-lite4', 'efficientnetv2-b0' ... 'efficientnetv2-b3', 'efficientnetv2-s',
    '-m', '-l', '-xl', or short forms 'b0', 'lite0', 'v2-s').

    ``num_classes=0`` returns pooled features instead of logits. ``dtype`` is the computation
    dtype (bfloat16 on accelerators; float64, under jax_enable_x64 with float64 variables,
    computes everything in float64: scripts/v2_parity.py); parameters are created float32.
    ``overrides``: dropout_rate, drop_path_rate, padding ('same' for TF weights, 'symmetric' for
    PyTorch-trained ones), depthwise_impl ('auto', 'xla', 'unrolled', 'cpu_kernel'),
    bn_group_size, activation, bn_momentum (the BatchNorm moving-average momentum; default the
    variant's), features_only, remat (recompute each block's activations in the backward pass
    instead of keeping them; the same gradients), scan_blocks (compile each stage's repeated
    blocks once: compile time that does not grow with depth; the same variables and outputs;
    None: on for GPU/TPU, off on CPU, where it runs slower),
    dropblock_stages, dropblock_size and dropblock_scale_by_stage (DropBlock on those stages'
    block outputs, efficientnet/dropblock.py); and the scaling coefficients width, depth and
    resolution (``scaled_variant``). This is the one place a model is built from a name:
    training, the scripts and the tests all come through here.
    """
    unknown = sorted(set(overrides) - set(_OVERRIDES) - set(_SCALING))
    if unknown:
        raise TypeError(f'unknown option(s) {unknown}; valid: {list(_OVERRIDES + _SCALING)}')
    variant = scaled_variant(name, **{k: overrides.pop(k) for k in _SCALING if k in overrides})
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f'num_classes must be a non-negative int, got {num_classes!r}')
    if overrides.get('padding', 'same') not in PADDINGS:
        raise ValueError(f'padding must be one of {PADDINGS}, got {overrides["padding"]!r}')
    if overrides.get('depthwise_impl', 'auto') not in DEPTHWISE_IMPLS:
        raise ValueError(
            f'depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {overrides["depthwise_impl"]!r}'
        )
    for key in ('dropout_rate', 'drop_path_rate', 'bn_momentum'):
        v = overrides.get(key)
        if v is not None and not 0.0 <= v < 1.0:
            raise ValueError(f'{key} must be in [0, 1), got {v!r}')
    g = overrides.get('bn_group_size')
    if g is not None and (not isinstance(g, int) or g < 1):
        raise ValueError(f'bn_group_size must be a positive int or None, got {g!r}')
    if 'scan_blocks' in overrides:  # None: the backend's default (layers.resolve_scan_blocks)
        if overrides['scan_blocks'] is not None and not isinstance(overrides['scan_blocks'], bool):
            raise ValueError(
                f'scan_blocks must be True, False or None, got {overrides["scan_blocks"]!r}'
            )
        overrides['scan_blocks'] = resolve_scan_blocks(overrides['scan_blocks'])
    if not isinstance(overrides.get('remat', False), bool):
        raise ValueError(f'remat must be True or False, got {overrides["remat"]!r}')
    if 'dropblock_stages' in overrides:
        overrides['dropblock_stages'] = tuple(int(s) for s in overrides['dropblock_stages'])
    return EfficientNet(variant, num_classes=num_classes, dtype=dtype, **overrides)


def model_info(name: str) -> dict[str, Any]:
    """The facts a pipeline needs about a variant: scaling coefficients, resolution (and the
    official training size), dropout, eval crop fraction and interpolation, and the input
    normalisation (mean and std on [0, 255] input)."""
    v = get_variant(name)
    info = dataclasses.asdict(v)
    info.update(
        crop_fraction=v.crop_fraction,
        interpolation=v.interpolation,
        train_resolution=v.train_resolution or v.resolution,
        bn_momentum=v.bn_momentum,
        mean=v.mean,
        std=v.std,
        normalization=v.normalization,
        activation=v.activation,
        squeeze_excite=v.use_se,
        num_blocks=len(build_blocks(v)),
    )
    return info


__all__ = [
    'BlockSpec',
    'EfficientNet',
    'Variant',
    'build_blocks',
    'create_model',
    'get_variant',
    'list_models',
    'model_info',
    'round_filters',
    'round_repeats',
    'scaled_variant',
    'stack_blocks',
    'stacked_runs',
    'unstack_blocks',
]
