"""Layers of the network: convolutions with the official initialisers and padding, a depthwise
convolution with two numerically equal implementations, and a BatchNorm with optional
statistics groups.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any
PADDINGS = ('same', 'symmetric')
DEPTHWISE_IMPLS = ('auto', 'xla', 'unrolled', 'cpu_kernel')


def conv_kernel_init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
    """Normal(0, sqrt(2 / fan_out)), untruncated, fan_out = kh * kw * out (docs/reference.md §3).

    For a depthwise kernel (kh, kw, 1, C) each group has one output channel, so fan_out = kh * kw;
    ``depthwise_kernel_init`` handles that case.
    """
    kh, kw, _, out = shape
    return jax.random.normal(key, shape, dtype) * np.sqrt(2.0 / (kh * kw * out))


def depthwise_kernel_init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
    kh, kw = shape[0], shape[1]
    return jax.random.normal(key, shape, dtype) * np.sqrt(2.0 / (kh * kw))


def dense_kernel_init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
    """Uniform(+-1 / sqrt(num_classes)) as the official head (docs/reference.md §3)."""
    bound = 1.0 / np.sqrt(shape[1])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def pad_amounts(size: int, kernel: int, stride: int, padding: str) -> tuple[int, int]:
    """(low, high) padding of one spatial axis.

    'same' is TensorFlow's SAME: output ceil(size / stride), the odd extra pixel on the high
    (bottom/right) side. 'symmetric' pads kernel // 2 on both sides, as PyTorch-trained
    models (torchvision, timm's non-tf_ models) do.
    """
    if padding == 'same':
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2
    if padding == 'symmetric':
        return kernel // 2, kernel // 2
    raise ValueError(f'padding must be one of {PADDINGS}, got {padding!r}')


def _pads(x: Array, kernel: int, stride: int, padding: str) -> list[tuple[int, int]]:
    return [
        pad_amounts(x.shape[1], kernel, stride, padding),
        pad_amounts(x.shape[2], kernel, stride, padding),
    ]


def activation_fn(name: str) -> Callable[[Array], Array]:
    if name == 'swish':
        return nn.swish
    if name == 'relu6':
        return nn.relu6
    if name == 'relu':
        return nn.relu
    raise ValueError(f'unknown activation {name!r}; expected swish, relu6 or relu')


def _window(xp: Array, i: int, j: int, stride: int, out_h: int, out_w: int) -> Array:
    """xp[:, i + stride*y, j + stride*x, :] for the (out_h, out_w) output positions: the input
    under kernel tap (i, j) of a strided window over padded ``xp``."""
    end = (xp.shape[0], i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, xp.shape[3])
    return jax.lax.slice(xp, (0, i, j, 0), end, (1, stride, stride, 1))


def _patches(x: Array, kernel: int, stride: int, padding: str) -> Array:
    """(N, Ho, Wo, k*k*C) windows of padded ``x``, ordered like an HWIO kernel flattened to
    (k*k*C, O)."""
    pads = _pads(x, kernel, stride, padding)
    xp = jnp.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
    out_h = (xp.shape[1] - kernel) // stride + 1
    out_w = (xp.shape[2] - kernel) // stride + 1
    return jnp.concatenate(
        [_window(xp, i, j, stride, out_h, out_w) for i in range(kernel) for j in range(kernel)],
        axis=-1,
    )


def pointwise_conv(x: Array, w: Array) -> Array:
    """``x @ w`` over the channel axis. On CPU its gradient is written out (see
    ``_pointwise_bwd``); elsewhere it is plain autodiff."""
    if jax.default_backend() == 'cpu':
        return _pointwise_cpu(x, w)
    return jnp.dot(x, w)


@jax.custom_vjp
def _pointwise_cpu(x: Array, w: Array) -> Array:
    return jnp.dot(x, w)


def _pointwise_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _pointwise_bwd(res, dy):
    """The weight gradient contracts over every pixel of the batch. Left to itself, XLA:CPU
    transposes the large output gradient into channel-major order (with the BatchNorm backward
    fused into that strided copy) before a slow generic dot; here the operand with fewer
    channels is materialised and transposed instead, and the product is a plain GEMM."""
    x, w = res
    cin, cout = w.shape
    x2 = x.reshape(-1, cin)
    dy2 = dy.reshape(-1, cout)
    dx = jnp.dot(dy, w.T)
    if cin <= cout:
        dw = jnp.dot(jax.lax.optimization_barrier(x2).T, dy2)
    else:
        dw = jnp.dot(jax.lax.optimization_barrier(dy2).T, x2).T
    return dx, dw.astype(w.dtype)


_pointwise_cpu.defvjp(_pointwise_fwd, _pointwise_bwd)


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _conv_s1(x: Array, k: Array, pads: Any) -> Array:
    return jax.lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_stride1_cpu(x: Array, k: Array, pads: Any) -> Array:
    """A stride-1 NHWC/HWIO convolution whose two backward convolutions are written out in
    the NHWC/HWIO form that XLA:CPU hands to its fast convolution library. Autodiff's own
    forms (a kernel with swapped in/out axes; batch and feature axes exchanged for the kernel
    gradient) are rewritten to that form in a plain program, but not inside a loop body: a
    scanned block's gradient ran 9-21x slower there (``scripts/bench_scan_conv.py``,
    docs/benchmarks.md). The values are those of autodiff, bit for bit."""
    return _conv_s1(x, k, pads)


def _conv_s1_fwd(x, k, pads):
    return _conv_s1(x, k, pads), (x, k)


def _conv_s1_bwd(pads, res, dy):
    x, k = res
    (top, bottom), (left, right) = pads
    kh, kw = k.shape[:2]
    # Input gradient: the flipped kernel, in and out swapped, over the output gradient.
    flipped = jnp.flip(k, (0, 1)).transpose(0, 1, 3, 2)
    back = ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right))
    dx = _conv_s1(dy, flipped, back)
    # Kernel gradient: channels of x as the batch, its examples as the features, the output
    # gradient as the kernel (HWIO: examples in, channels out); stride 1 keeps the padding.
    dk = _conv_s1(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), pads)
    return dx, dk.transpose(1, 2, 0, 3)


conv_stride1_cpu.defvjp(_conv_s1_fwd, _conv_s1_bwd)


class Conv2D(nn.Module):
    """A dense (non-grouped) convolution with explicit TF-SAME or symmetric padding."""

    features: int
    kernel: int = 1
    stride: int = 1
    use_bias: bool = False
    padding: str = 'same'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k, b = conv_weights(self, self.kernel, x.shape[-1], self.features, self.use_bias)
        if self.kernel == 1 and self.stride == 1:
            # A pointwise conv is a matmul over channels; as a dot XLA uses its GEMM path.
            y = pointwise_conv(x.astype(self.dtype), k[0, 0].astype(self.dtype))
        elif jax.default_backend() == 'cpu' and self.kernel**2 * x.shape[-1] <= 64:
            # The stem (3x3 over 3 channels): XLA:CPU's convolution handles so few input
            # channels poorly; gathering the k*k*C patch values is cheap and the rest is a GEMM.
            y = pointwise_conv(
                _patches(x.astype(self.dtype), self.kernel, self.stride, self.padding),
                k.reshape(-1, self.features).astype(self.dtype),
            )
        elif jax.default_backend() == 'cpu' and self.stride == 1:
            pads = tuple(
                tuple(int(p) for p in pad) for pad in _pads(x, self.kernel, 1, self.padding)
            )
            y = conv_stride1_cpu(x.astype(self.dtype), k.astype(self.dtype), pads)
        else:
            y = jax.lax.conv_general_dilated(
                x.astype(self.dtype),
                k.astype(self.dtype),
                (self.stride, self.stride),
                _pads(x, self.kernel, self.stride, self.padding),
                dimension_numbers=_NHWC,
            )
        if self.use_bias:
            y = y + b.astype(self.dtype)
        return y


def conv_weights(
    mdl: nn.Module, kernel: int, cin: int, features: int, use_bias: bool
) -> tuple[Array, Array | None]:
    """``Conv2D``'s parameters, created in ``mdl``: 'kernel' (HWIO) and, with ``use_bias``,
    'bias'."""
    k = mdl.param('kernel', conv_kernel_init, (kernel, kernel, cin, features), jnp.float32)
    b = mdl.param('bias', nn.initializers.zeros, (features,), jnp.float32) if use_bias else None
    return k, b


class PointwiseWeights(nn.Module):
    """The parameters of a 1x1 ``Conv2D`` with bias, under the same names, shapes and
    initialisers, returned (kernel as a [cin, features] matrix, bias) rather than applied."""

    features: int

    @nn.compact
    def __call__(self, cin: int) -> tuple[Array, Array]:
        k, b = conv_weights(self, 1, cin, self.features, True)
        return k[0, 0], b


def resolve_scan_blocks(scan_blocks: bool | None) -> bool:
    """``scan_blocks`` None (the configs' default) is on for GPU and TPU, where it keeps
    compile time from growing with depth, and off on CPU, where XLA runs the scanned training
    step 1.16x (B0) to 1.34x (V2-S) slower than the unrolled one (docs/benchmarks.md)."""
    if scan_blocks is None:
        return jax.default_backend() != 'cpu'
    return scan_blocks


def resolve_depthwise_impl(impl: str, dtype: Any = jnp.float32) -> str:
    """'auto' picks XLA's grouped convolution on GPU and TPU. On CPU, where XLA runs it (and
    its gradient) far slower (docs/benchmarks.md), it picks the C++ kernels of
    ``efficientnet.cpu_kernels`` for float32 when they build here, else the unrolled
    shift-and-multiply form. An explicit 'cpu_kernel' on another backend or dtype, or without a
    compiler, falls back the same way."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f'depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}')
    on_cpu = jax.default_backend() == 'cpu'
    if impl == 'auto':
        impl = 'cpu_kernel' if on_cpu else 'xla'
    if impl == 'cpu_kernel':
        from efficientnet import cpu_kernels

        return 'cpu_kernel' if cpu_kernels.usable(dtype) else ('unrolled' if on_cpu else 'xla')
    return impl


def depthwise_conv(x: Array, kernel: Array, stride: int, padding: str, impl: str) -> Array:
    """Depthwise convolution of NHWC ``x`` with a (k, k, 1, C) kernel.

    'xla' is a grouped ``conv_general_dilated``; 'unrolled' pads once and sums k*k strided
    shifted slices times the per-channel tap (plain elementwise work that XLA's CPU backend
    vectorises well); 'cpu_kernel' runs hand-written C++ for the forward and backward passes
    on CPU. All compute the same sum.
    """
    k = kernel.shape[0]
    pads = _pads(x, k, stride, padding)
    impl = resolve_depthwise_impl(impl, x.dtype)
    if impl == 'xla':
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            (stride, stride),
            pads,
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            feature_group_count=x.shape[-1],
        )
    if impl == 'cpu_kernel':
        from efficientnet import cpu_kernels

        return cpu_kernels.depthwise(x, kernel, stride, tuple(map(tuple, pads)))
    return _depthwise_unrolled(x, kernel, stride, tuple(pads))


def _shift_sum(xp: Array, taps: Array, stride: int, out_h: int, out_w: int) -> Array:
    """sum_ij xp[:, i + s*y, j + s*x, :] * taps[i, j] over the k*k taps."""
    k = taps.shape[0]
    out = None
    for i in range(k):
        for j in range(k):
            patch = _window(xp, i, j, stride, out_h, out_w)
            term = patch * taps[i, j]
            out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_unrolled(x: Array, kernel: Array, stride: int, pads: tuple) -> Array:
    return _depthwise_unrolled_fwd(x, kernel, stride, pads)[0]


def _depthwise_unrolled_fwd(x, kernel, stride, pads):
    k = kernel.shape[0]
    xp = jnp.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
    # Materialise the padded input once: otherwise XLA fuses its producer (BN, swish) into each
    # of the k*k slices and recomputes it k*k times.
    xp = jax.lax.optimization_barrier(xp)
    out_h = (xp.shape[1] - k) // stride + 1
    out_w = (xp.shape[2] - k) // stride + 1
    return _shift_sum(xp, kernel[:, :, 0, :], stride, out_h, out_w), (xp, kernel)


def _depthwise_unrolled_bwd(stride, pads, res, g):
    """The input gradient is itself a depthwise correlation: of the stride-dilated, (k-1)-padded
    output gradient with the flipped kernel. Written so, it is one more shift-and-multiply pass
    instead of k*k scattered pads that XLA's CPU backend handles poorly."""
    xp, kernel = res
    k = kernel.shape[0]
    n, hp, wp, c = xp.shape
    g = jax.lax.optimization_barrier(g)
    gd = jax.lax.pad(
        g,
        jnp.zeros((), g.dtype),
        [(0, 0, 0), (k - 1, k - 1, stride - 1), (k - 1, k - 1, stride - 1), (0, 0, 0)],
    )
    span_h, span_w = gd.shape[1] - k + 1, gd.shape[2] - k + 1
    dxp = _shift_sum(gd, kernel[::-1, ::-1, 0, :], 1, span_h, span_w)
    # Rows/columns of xp beyond the last window (possible when stride > 1) get no gradient.
    dxp = jnp.pad(dxp, [(0, 0), (0, hp - span_h), (0, wp - span_w), (0, 0)])
    dx = dxp[:, pads[0][0] : hp - pads[0][1], pads[1][0] : wp - pads[1][1], :]
    out_h, out_w = g.shape[1], g.shape[2]
    dk = jnp.stack(
        [
            jnp.stack(
                [
                    jnp.sum(
                        jax.lax.slice(
                            xp,
                            (0, i, j, 0),
                            (n, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c),
                            (1, stride, stride, 1),
                        )
                        * g,
                        axis=(0, 1, 2),
                    )
                    for j in range(k)
                ]
            )
            for i in range(k)
        ]
    )[:, :, None, :]
    return dx, dk.astype(kernel.dtype)


_depthwise_unrolled.defvjp(_depthwise_unrolled_fwd, _depthwise_unrolled_bwd)


class DepthwiseConv2D(nn.Module):
    kernel: int
    stride: int = 1
    padding: str = 'same'
    impl: str = 'auto'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.param(
            'kernel', depthwise_kernel_init, (self.kernel, self.kernel, 1, x.shape[-1]), jnp.float32
        )
        return depthwise_conv(
            x.astype(self.dtype), k.astype(self.dtype), self.stride, self.padding, self.impl
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm_train(xf: Array, scale: Array, bias: Array, epsilon: float):
    """Normalises (groups, group_size, ..., C) by each group's statistics; returns the output and
    the (biased) group means and variances. Its hand-written backward pass is two reductions and
    one elementwise pass: XLA's CPU backend runs the autodiff version much slower
    (docs/benchmarks.md)."""
    return _batch_norm_train_fwd(xf, scale, bias, epsilon)[0]


def _batch_norm_train_fwd(xf, scale, bias, epsilon):
    axes = tuple(range(1, xf.ndim - 1))
    mean = jnp.mean(xf, axes, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axes, keepdims=True)
    inv = jax.lax.rsqrt(var + epsilon)
    y = (xf - mean) * (inv * scale) + bias
    return (y, mean, var), (xf, mean, inv, scale)


def _batch_norm_train_bwd(epsilon, res, cts):
    del epsilon
    xf, mean, inv, scale = res
    gy = cts[0]  # the statistics feed only the moving averages, never the loss
    axes = tuple(range(1, xf.ndim - 1))
    xhat = (xf - mean) * inv
    g_mean = jnp.mean(gy, axes, keepdims=True)
    gx_mean = jnp.mean(gy * xhat, axes, keepdims=True)
    dx = (gy - g_mean - xhat * gx_mean) * (inv * scale)
    all_axes = (0, *axes)
    dscale = jnp.sum(gy * xhat, all_axes).reshape(scale.shape)
    dbias = jnp.sum(gy, all_axes).reshape(scale.shape)
    return dx, dscale, dbias


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(nn.Module):
    """BatchNorm with the official momentum 0.99 and epsilon 1e-3 (docs/reference.md §3).

    Statistics are reduced in float32 (in float64 when ``dtype`` is float64). With
    ``group_size`` set, the batch is split into consecutive groups of that many examples and
    each group is normalised by its own statistics, like the TPU cross-replica groups of the
    official recipe; the moving averages take the mean over groups. Under jit with a sharded
    batch the reductions cover the global batch (or each group), so results do not depend on how
    many devices hold it. Variables are named like flax's ``nn.BatchNorm`` (scale, bias, mean,
    var).

    ``activation`` (a name for ``activation_fn``, or None) is applied to the output. In training
    on CPU in float32 the normalisation and the activation run as one C++ kernel each way
    (``efficientnet.cpu_kernels.batch_norm_act``; docs/benchmarks.md has the gain); elsewhere
    it is the same computation in XLA.
    """

    use_running_average: bool = True
    momentum: float = 0.99
    epsilon: float = 1e-3
    group_size: int | None = None
    dtype: Dtype = jnp.float32
    activation: str | None = None

    @nn.compact
    def __call__(self, x: Array, squeeze_excite: Callable[..., Array] | None = None) -> Array:
        """``squeeze_excite``, a ``SqueezeExcite`` module, is applied to the activation's output;
        passed here, it runs inside the fused CPU kernels with the BatchNorm."""
        c = x.shape[-1]
        scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
        act = (lambda y: y) if self.activation is None else activation_fn(self.activation)
        se = (lambda y: y) if squeeze_excite is None else squeeze_excite
        f = jnp.promote_types(self.dtype, jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
            y = (x.astype(f) - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
            return se(act(y.astype(self.dtype)))
        n = x.shape[0]
        g = self.group_size or n
        if n % g:
            raise ValueError(f'batch of {n} does not split into BatchNorm groups of {g}')
        from efficientnet import cpu_kernels

        if jnp.dtype(self.dtype) == jnp.float32 and cpu_kernels.usable(x.dtype):
            if squeeze_excite is None:
                y, mean, var = cpu_kernels.batch_norm_act(
                    x.reshape(n // g, -1, c), scale, bias, self.epsilon, self.activation
                )
            else:
                y, mean, var = squeeze_excite(
                    x.reshape(n, -1, c), fused_bn=(scale, bias, self.epsilon, self.activation, g)
                )
            y = y.reshape(x.shape)
        else:
            xf = x.astype(f).reshape((n // g, g) + x.shape[1:])
            y, mean, var = _batch_norm_train(xf, scale, bias, self.epsilon)
            y = se(act(y.reshape(x.shape).astype(self.dtype)))
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * jnp.mean(mean, axis=0).reshape(c)
            ra_var.value = m * ra_var.value + (1 - m) * jnp.mean(var, axis=0).reshape(c)
        return y
