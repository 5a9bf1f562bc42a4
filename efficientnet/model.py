"""The EfficientNet Flax module: stem, MBConv and Fused-MBConv blocks and head, built from
``arch.BlockSpec``s."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientnet import arch
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
    bn_momentum: float = 0.99

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        s = self.spec
        act = activation_fn(self.activation)
        bn = dict(
            use_running_average=not train,
            momentum=self.bn_momentum,
            group_size=self.bn_group_size,
            dtype=self.dtype,
        )
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
        return _residual(self, x, inputs, train)


def _residual(block: nn.Module, x: Array, inputs: Array, train: bool) -> Array:
    """Stochastic depth and the skip connection, when the block keeps its shape."""
    s = block.spec
    if s.has_residual:
        if train and s.survival < 1.0:
            x = drop_path(x, s.survival, block.make_rng('dropout'))
        x = x + inputs
    return x


class FusedMBConv(nn.Module):
    """EfficientNetV2's Fused-MBConv: k x k conv (stride) to e * Cin -> [SE] -> 1x1 project
    (+ residual). With expand 1 the k x k conv goes straight to Cout and is followed by BN and
    the activation (the project conv of the e > 1 form has none), then the residual.

    The layer names follow ``MBConv`` (``expand_conv``/``expand_bn``, ``project_conv``/
    ``project_bn``): the e = 1 form is one ``project_conv``, as in keras.applications.
    ``depthwise_impl`` is accepted (and unused) so both block types take the same arguments.
    """

    spec: arch.BlockSpec
    activation: str = 'swish'
    padding: str = 'same'
    depthwise_impl: str = 'auto'
    bn_group_size: int | None = None
    dtype: Any = jnp.float32
    bn_momentum: float = 0.99

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        s = self.spec
        act = activation_fn(self.activation)
        bn = dict(
            use_running_average=not train,
            momentum=self.bn_momentum,
            group_size=self.bn_group_size,
            dtype=self.dtype,
        )
        conv = dict(padding=self.padding, dtype=self.dtype)
        inputs = x
        if s.expand != 1:
            x = Conv2D(s.expanded_channels, s.kernel, s.stride, **conv, name='expand_conv')(x)
            x = act(BatchNorm(**bn, name='expand_bn')(x))
            if s.se_channels:
                x = SqueezeExcite(s.se_channels, self.activation, name='se')(x)
            x = Conv2D(s.out_channels, **conv, name='project_conv')(x)
            x = BatchNorm(**bn, name='project_bn')(x)
        else:
            if s.se_channels:  # no published V2 uses it; the official code would put it here
                raise ValueError('a Fused-MBConv block without expansion has no squeeze-excite')
            x = Conv2D(s.out_channels, s.kernel, s.stride, **conv, name='project_conv')(x)
            x = act(BatchNorm(**bn, name='project_bn')(x))
        return _residual(self, x, inputs, train)


class EfficientNet(nn.Module):
    """EfficientNet / EfficientNet-Lite / EfficientNetV2.

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
    bn_momentum: float | None = None  # None: the variant's (0.99 V1, 0.9 V2)
    features_only: bool = False  # backbone use: no head, returns the endpoints dict only
    remat: bool = False  # recompute each block's activations in the backward pass
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
    def __call__(self, x: Array, train: bool = False, return_endpoints: bool = False):
        self._check_input(x)
        activation = self.activation or self.variant.activation
        act = activation_fn(activation)
        momentum = self.variant.bn_momentum if self.bn_momentum is None else self.bn_momentum
        bn = dict(
            use_running_average=not train,
            momentum=momentum,
            group_size=self.bn_group_size,
            dtype=self.dtype,
        )
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
        kinds = {False: MBConv, True: FusedMBConv}
        if self.remat:
            kinds = {k: nn.remat(v, static_argnums=(2,)) for k, v in kinds.items()}
        for spec in blocks:
            x = kinds[spec.fused](
                spec,
                activation,
                self.padding,
                self.depthwise_impl,
                self.bn_group_size,
                self.dtype,
                momentum,
                name=f'blocks_{spec.index}',
            )(x, train)
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


__all__ = ['EfficientNet', 'FusedMBConv', 'MBConv', 'SqueezeExcite', 'drop_path']
