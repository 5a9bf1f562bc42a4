"""The EfficientNet Flax module: stem, MBConv blocks and head, built from ``arch.BlockSpec``s."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientnet import arch
from efficientnet import dropblock as dropblock_lib
from efficientnet.layers import (
    BatchNorm,
    Conv2D,
    DepthwiseConv2D,
    activation_fn,
    dense_kernel_init,
)

Array = jax.Array


def drop_path(x: Array, survival: float, rng: Array) -> Array:
    """Stochastic depth: keeps each example's branch with probability ``survival`` and divides
    the kept ones by it (per-example Bernoulli mask, docs/reference.md §3)."""
    keep = jax.random.bernoulli(rng, survival, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / jnp.asarray(survival, x.dtype), jnp.zeros((), x.dtype))


class SqueezeExcite(nn.Module):
    """Spatial mean -> 1x1 conv (bias) -> activation -> 1x1 conv (bias) -> sigmoid -> scale.

    Computed in float32 whatever the activation dtype: it is cheap and gates every channel.
    """

    reduced: int
    activation: str = 'swish'

    @nn.compact
    def __call__(self, x: Array) -> Array:
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
        s = Conv2D(self.reduced, use_bias=True, name='reduce')(s)
        s = activation_fn(self.activation)(s)
        s = Conv2D(x.shape[-1], use_bias=True, name='expand')(s)
        return x * jax.nn.sigmoid(s).astype(x.dtype)


class MBConv(nn.Module):
    """Inverted bottleneck: [expand 1x1] -> depthwise kxk -> SE -> project 1x1 (+ residual)."""

    spec: arch.BlockSpec
    activation: str = 'swish'
    padding: str = 'same'
    depthwise_impl: str = 'auto'
    bn_group_size: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        s = self.spec
        act = activation_fn(self.activation)
        bn = dict(use_running_average=not train, group_size=self.bn_group_size, dtype=self.dtype)
        inputs = x
        if s.expand != 1:
            x = Conv2D(s.expanded_channels, dtype=self.dtype, name='expand_conv')(x)
            x = act(BatchNorm(**bn, name='expand_bn')(x))
        x = DepthwiseConv2D(
            s.kernel, s.stride, self.padding, self.depthwise_impl, dtype=self.dtype, name='dw_conv'
        )(x)
        x = act(BatchNorm(**bn, name='dw_bn')(x))
        if s.se_channels:
            x = SqueezeExcite(s.se_channels, self.activation, name='se')(x)
        x = Conv2D(s.out_channels, dtype=self.dtype, name='project_conv')(x)
        x = BatchNorm(**bn, name='project_bn')(x)
        if s.has_residual:
            if train and s.survival < 1.0:
                x = drop_path(x, s.survival, self.make_rng('dropout'))
            x = x + inputs
        return x


class EfficientNet(nn.Module):
    """EfficientNet / EfficientNet-Lite.

    ``apply(variables, images, train=False)`` takes NHWC float images that are already
    normalised (see ``model_info``) and returns float32 logits, or pooled float32 features when
    ``num_classes == 0``. With ``return_endpoints=True`` it returns a dict holding
    'reduction_1' ... 'reduction_5' (the feature maps at strides 2, 4, 8, 16, 32, as EfficientDet
    consumes them) and 'features' or 'logits'. ``features_only=True`` builds no head and returns
    only the endpoints.

    Training needs the 'dropout' rng (dropout and stochastic depth) and a mutable
    'batch_stats' collection.

    ``remat=True`` rematerialises each MBConv block: the backward pass keeps only the blocks'
    inputs and recomputes everything inside a block from its input, trading a second forward
    pass through the blocks for the activation memory of the large variants. The parameters and
    their names are the same as without it, the gradients equal within float32 rounding.
    """

    variant: arch.Variant
    num_classes: int = 1000
    dropout_rate: float | None = None  # None: the variant's
    drop_path_rate: float = arch.DROP_PATH_RATE
    padding: str = 'same'
    depthwise_impl: str = 'auto'
    bn_group_size: int | None = None
    activation: str | None = None  # None: the variant's
    features_only: bool = False  # backbone use: no head, returns the endpoints dict only
    remat: bool = False  # recompute each block's activations in the backward pass
    # DropBlock (efficientnet/dropblock.py) on every block output of these stages (0-based,
    # negative from the end), in training calls that pass ``dropblock_keep_prob``.
    dropblock_stages: tuple[int, ...] = ()
    dropblock_size: int = 7
    dtype: Any = jnp.float32

    @property
    def blocks(self) -> list[arch.BlockSpec]:
        return arch.build_blocks(self.variant, self.drop_path_rate)

    def _check_input(self, x: Array) -> None:
        if x.ndim != 4:
            raise ValueError(f'expected NHWC images of rank 4, got shape {tuple(x.shape)}')
        if x.shape[-1] != 3:
            raise ValueError(
                f'expected 3 colour channels last (NHWC), got shape {tuple(x.shape)}; '
                'grayscale images must be repeated to 3 channels, NCHW transposed to NHWC'
            )
        if x.shape[1] < 2 or x.shape[2] < 2:
            raise ValueError(f'images of {x.shape[1]}x{x.shape[2]} are too small')

    @nn.compact
    def __call__(
        self,
        x: Array,
        train: bool = False,
        return_endpoints: bool = False,
        dropblock_keep_prob: Any = None,
    ):
        self._check_input(x)
        activation = self.activation or self.variant.activation
        act = activation_fn(activation)
        bn = dict(use_running_average=not train, group_size=self.bn_group_size, dtype=self.dtype)
        endpoints = {}

        x = Conv2D(
            arch.stem_channels(self.variant),
            kernel=3,
            stride=2,
            padding=self.padding,
            dtype=self.dtype,
            name='stem_conv',
        )(x)
        x = act(BatchNorm(**bn, name='stem_bn')(x))

        blocks = self.blocks
        names = arch.endpoint_blocks(blocks)
        # Per block (a later nn.scan over repeated blocks can wrap the same remat'd block).
        # ``train`` (argument 2, counting self) is static: it chooses Python branches (batch or
        # moving statistics, stochastic depth). Variables, rngs and names are lifted unchanged,
        # so the parameter tree and the dropout draws do not depend on ``remat``.
        block = nn.remat(MBConv, static_argnums=(2,)) if self.remat else MBConv
        dropblock_stages = frozenset()
        if train and self.dropblock_stages and dropblock_keep_prob is not None:
            num_stages = max(spec.stage for spec in blocks) + 1
            dropblock_stages = dropblock_lib.resolve_stages(self.dropblock_stages, num_stages)
        for spec in blocks:
            x = block(
                spec,
                activation,
                self.padding,
                self.depthwise_impl,
                self.bn_group_size,
                self.dtype,
                name=f'blocks_{spec.index}',
            )(x, train)
            if spec.stage in dropblock_stages:
                rng = self.make_rng('dropout')
                x = dropblock_lib.dropblock(x, dropblock_keep_prob, self.dropblock_size, rng)
            if spec.index in names:
                endpoints[names[spec.index]] = x
        if self.features_only:
            return endpoints

        x = Conv2D(arch.head_channels(self.variant), dtype=self.dtype, name='head_conv')(x)
        x = act(BatchNorm(**bn, name='head_bn')(x))
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        out_name = 'features'
        if self.num_classes > 0:
            rate = self.variant.dropout if self.dropout_rate is None else self.dropout_rate
            x = nn.Dropout(rate, deterministic=not train)(x)
            x = nn.Dense(self.num_classes, kernel_init=dense_kernel_init, name='classifier')(x)
            out_name = 'logits'
        if return_endpoints:
            endpoints[out_name] = x
            return endpoints
        return x


__all__ = ['EfficientNet', 'MBConv', 'SqueezeExcite', 'drop_path']
