"""The model a config describes: ``build_model`` applies ``config.model`` (width, depth,
resolution, dropout, stochastic depth, BatchNorm groups, DropBlock, remat, scan) through
``efficientnet.create_model``, and ``bn_group_size`` derives the BatchNorm statistics group,
the official TPU one included. ``training.config_checks`` checks these fields;
``training.config_resolve`` derives the rest of the run."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

import efficientnet

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def positive_int(x: Any) -> bool:
    """An int > 0 (a bool is not one)."""
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def official_bn_group_size(batch_size: int, tpu_cores: int) -> int:
    """Examples per BatchNorm statistics group in the official TPU implementation, for a
    global batch of ``batch_size`` split evenly over ``tpu_cores`` cores.

    That code normalises each core's examples alone on slices of 8 cores or fewer; on larger
    slices it averages the statistics over groups of ``max(8, cores // 8)`` consecutive cores.
    Raises ValueError for a topology the official code rejects.
    """
    if not (positive_int(batch_size) and positive_int(tpu_cores)):
        raise ValueError(f'need positive ints, got batch {batch_size!r}, cores {tpu_cores!r}')
    if batch_size % tpu_cores:
        raise ValueError(f'batch {batch_size} does not split evenly over {tpu_cores} TPU cores')
    cores_per_group = 1 if tpu_cores <= 8 else max(8, tpu_cores // 8)
    if tpu_cores % cores_per_group:
        raise ValueError(f'{tpu_cores} TPU cores do not split into groups of {cores_per_group}')
    return cores_per_group * (batch_size // tpu_cores)


def bn_group_size(config: Any) -> int | None:
    """Examples per BatchNorm statistics group: ``config.model.bn_group_size`` when set, else
    the official TPU groups for ``config.model.bn_tpu_cores`` at ``config.batch_size``, else
    None (the whole batch). The one place the group is derived; ``resolve`` checks it."""
    m = config.model
    if m.bn_group_size is not None:
        return m.bn_group_size
    cores = m.get('bn_tpu_cores')  # absent in the config.json of older runs
    return None if cores is None else official_bn_group_size(config.batch_size, cores)


def build_model(config: Any, num_classes: int) -> efficientnet.EfficientNet:
    """The model from ``config.model``; width/depth overrides give a custom-scaled member."""
    m = config.model
    return efficientnet.create_model(
        m.name,
        num_classes=num_classes,
        dtype=COMPUTE_DTYPES[m.compute_dtype],
        width=m.width,
        depth=m.depth,
        resolution=config.data.resolution,
        dropout_rate=m.dropout_rate,
        drop_path_rate=m.drop_path_rate,
        bn_group_size=bn_group_size(config),
        depthwise_impl=m.depthwise_impl,
        remat=m.get('remat', False),  # absent in the config.json of older runs
        scan_blocks=m.get('scan_blocks'),  # None: on for GPU/TPU, off on CPU
        **dropblock_overrides(config),
    )


def dropblock_overrides(config: Any) -> dict[str, Any]:
    """The model options ``config.dropblock`` asks for (none when it is off)."""
    d = config.get('dropblock')
    if d is None or d.keep_prob >= 1.0:
        return {}
    return {
        'dropblock_stages': tuple(d.stages),
        'dropblock_size': int(d.block_size),
        'dropblock_scale_by_stage': bool(d.get('scale_by_stage', True)),
    }
