"""Quantisation-aware training numerics: TensorFlow's fake-quant in JAX, bit for bit, and the
folded network walked with fake-quant at every tensor the int8 TFLite graph holds.

``fake_quant`` / ``fake_quant_per_channel`` reproduce TF's ``fake_quant_with_min_max_vars`` and
``..._per_channel`` (tensorflow/core/kernels/fake_quant_ops_functor.h): the range is nudged
so that 0 is a grid point (``nudge``), values are clamped to it and rounded half up,
``floor(x / scale - zero + 0.5) * scale``. The gradient is TF's straight-through one: the
incoming gradient where ``nudged_min <= x <= nudged_max``, 0 outside; the ranges get none
(they are statistics, not parameters). Two XLA:CPU rewrites would break the bit equality and
are blocked: a multiply feeding an add is contracted into one FMA (one rounding instead of
TF's two), and a division by a constant becomes a multiplication by its reciprocal.

``QuantOps`` is the ``network.Ops`` that training and the export check run; ``tf_graph.QuantTFOps``
places ``tf.quantization`` fake-quant ops at the same tensors with the learned ranges, and the
converter turns every such range into an int8 scale and zero point (docs/techniques.md):

- activations: 8-bit asymmetric, range an EMA of the batch min/max (widened to hold 0),
  updated only in training;
- weights: symmetric narrow range [-127, 127], per output channel for convolutions (dense and
  depthwise), per tensor for the dense classifier (a per-channel FULLY_CONNECTED kernel fails
  to convert);
- sigmoid outputs (swish, squeeze-excite) and the softmax: TFLite's fixed int8 range for
  LOGISTIC and SOFTMAX, scale 1/256 and zero point -128, i.e. [0, 255/256].
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficientnet.layers import depthwise_conv
from inference.export.network import (
    Conv,
    FoldedNetwork,
    SqueezeExcite,
    forward,
    network_from_dict,
    network_to_dict,
)

NUM_BITS = 8
PROBABILITY_RANGE = (0.0, 255.0 / 256.0)  # TFLite's int8 LOGISTIC / SOFTMAX output range
PIXEL_RANGE = (0.0, 255.0)  # the cast uint8 input: scale 1, every pixel value exact


def _quant_bounds(narrow_range: bool) -> tuple[float, float]:
    return (1.0 if narrow_range else 0.0), float(2**NUM_BITS - 1)


def _no_contract(p: jax.Array) -> jax.Array:
    """``p`` unchanged, but XLA:CPU can no longer fuse the multiply that made it into an FMA
    with the add that uses it (a select between them blocks LLVM's contraction)."""
    return jnp.where(p == p, p, jnp.float32(jnp.nan))


def opaque(constant: jax.Array) -> jax.Array:
    """``constant`` hidden from XLA's simplifier, which turns a division by a constant into a
    multiplication by its reciprocal (it sees through a barrier on a scalar that is broadcast
    afterwards, hence full-shaped constants)."""
    return jax.lax.optimization_barrier(constant)


def _round_half_away(x: jax.Array) -> jax.Array:
    """std::round: half away from zero (``jnp.round`` rounds half to even)."""
    t = jnp.trunc(x)
    return jnp.where(jnp.abs(x - t) >= 0.5, t + jnp.sign(x), t)


def nudge(
    min_val: jax.Array, max_val: jax.Array, narrow_range: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """TF's ``Nudge``: (nudged_min, nudged_max, scale, inv_scale) in float32, with the zero
    point rounded to an integer so that 0.0 is exactly representable."""
    qmin, qmax = _quant_bounds(narrow_range)
    min_val = jnp.asarray(min_val, jnp.float32)
    max_val = jnp.asarray(max_val, jnp.float32)
    qmin_f, qmax_f = jnp.float32(qmin), jnp.float32(qmax)
    scale = (max_val - min_val) / opaque(jnp.full_like(max_val, qmax - qmin))
    inv_scale = (qmax_f - qmin_f) / (max_val - min_val)
    zero_from_min = qmin_f - min_val / scale
    zero = jnp.where(
        zero_from_min < qmin_f,
        qmin_f,
        jnp.where(zero_from_min > qmax_f, qmax_f, _round_half_away(zero_from_min)),
    )
    nudged_min = _no_contract((qmin_f - zero) * scale)
    nudged_max = _no_contract((qmax_f - zero) * scale)
    return nudged_min, nudged_max, scale, inv_scale


def _fake_quant_forward(x, min_val, max_val, narrow_range, per_channel):
    nudged_min, nudged_max, scale, inv_scale = nudge(min_val, max_val, narrow_range)
    quant_zero = jnp.floor(_no_contract(-nudged_min * inv_scale) + jnp.float32(0.5))
    shifted = jnp.minimum(jnp.maximum(x, nudged_min), nudged_max) - nudged_min
    # The per-tensor kernel divides by the scale, the per-channel one multiplies by the inverse.
    q = _no_contract(shifted * inv_scale) if per_channel else shifted / scale
    out = jnp.floor(q - quant_zero + jnp.float32(0.5)) * scale
    zero_range = (min_val == 0.0) & (max_val == 0.0)
    out = jnp.where(zero_range, jnp.float32(0.0), out)
    inside = ((x >= nudged_min) & (x <= nudged_max)) | zero_range
    return out, inside


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fq(x, min_val, max_val, narrow_range, per_channel):
    return _fake_quant_forward(x, min_val, max_val, narrow_range, per_channel)[0]


def _fq_fwd(x, min_val, max_val, narrow_range, per_channel):
    out, inside = _fake_quant_forward(x, min_val, max_val, narrow_range, per_channel)
    return out, (inside, min_val, max_val)


def _fq_bwd(narrow_range, per_channel, res, g):
    inside, min_val, max_val = res
    return jnp.where(inside, g, jnp.zeros_like(g)), jnp.zeros_like(min_val), jnp.zeros_like(max_val)


_fq.defvjp(_fq_fwd, _fq_bwd)


def fake_quant(x: jax.Array, min_val: Any, max_val: Any, narrow_range: bool = False) -> jax.Array:
    """``tf.quantization.fake_quant_with_min_max_vars(x, min, max, num_bits=8, narrow_range)``:
    float32 in, float32 out, straight-through gradient to ``x``."""
    x = jnp.asarray(x, jnp.float32)
    return _fq(
        x,
        jnp.asarray(min_val, jnp.float32),
        jnp.asarray(max_val, jnp.float32),
        bool(narrow_range),
        False,
    )


def fake_quant_per_channel(
    x: jax.Array, min_val: Any, max_val: Any, narrow_range: bool = False
) -> jax.Array:
    """``tf.quantization.fake_quant_with_min_max_vars_per_channel``: one range per entry of the
    last axis of ``x``."""
    x = jnp.asarray(x, jnp.float32)
    return _fq(
        x,
        jnp.asarray(min_val, jnp.float32),
        jnp.asarray(max_val, jnp.float32),
        bool(narrow_range),
        True,
    )


def weight_range(kernel: Any, per_channel: bool) -> tuple[Any, Any]:
    """Symmetric range of a kernel: ±max|w| over everything but the last (output) axis, or over
    the whole kernel. Works on numpy and jax arrays alike (the TF graph gets numpy)."""
    xp = jnp if isinstance(kernel, jax.Array) else np
    axes = tuple(range(kernel.ndim - 1)) if per_channel else None
    m = xp.max(xp.abs(kernel), axis=axes)
    return -m, m


def weight_scale(kernel: Any, per_channel: bool) -> Any:
    """The int8 scale TFLite gives a kernel fake-quantised by ``fake_quant_weights``."""
    lo, hi = weight_range(kernel, per_channel)
    return nudge(lo, hi, narrow_range=True)[2]


@jax.custom_vjp
def _straight_through(x: jax.Array, q: jax.Array) -> jax.Array:
    return q


_straight_through.defvjp(lambda x, q: (q, None), lambda _, g: (g, jnp.zeros_like(g)))


def quantize_bias(bias: Any, input_scale: Any, kernel_scale: Any) -> jax.Array:
    """TFLite's int32 bias: ``round(b / (s_in * s_w)) * s_in * s_w`` (per output channel), with
    a straight-through gradient. Without it the JAX model would miss TFLite's bias rounding,
    which is coarse where a channel's weights are large: up to a tenth of an output step,
    enough to move a whole channel that is mostly bias by one step."""
    bias = jnp.asarray(bias, jnp.float32)
    scale = jnp.asarray(input_scale, jnp.float32) * jnp.asarray(kernel_scale, jnp.float32)
    q = _no_contract(_round_half_away(bias / scale) * scale)
    return _straight_through(bias, jax.lax.stop_gradient(q))


# ------------------------------------------------------------------ the walk with fake-quant


class FakeQuantWalk:
    """``network.Ops`` with fake-quant at every tensor of the int8 TFLite graph, written once
    over array primitives so that the JAX ops (``QuantOps``) and the TF ops
    (``tf_graph.QuantTFOps``) quantise exactly the same tensors. Each activation range is named
    by its position in the walk and its kind (``'007_relu6'``), the same in both.

    TFLite holds a tensor after: the cast input, the normalised input, each convolution
    (bias and a fused ReLU6/ReLU included; swish is x * sigmoid(x): the pre-activation, the
    sigmoid and the product), the squeeze-excite mean, its convolutions, sigmoid and product,
    each residual add, the pooled features, the logits and the softmax.
    """

    def __init__(self, net: FoldedNetwork):
        self.net = net
        self._count = 0

    # Subclasses: fake-quant and array primitives.
    def fake_quant_act(self, x: Any, name: str) -> Any:
        raise NotImplementedError

    def fake_quant_fixed(self, x: Any, lo: float, hi: float) -> Any:
        raise NotImplementedError

    def fake_quant_weights(self, kernel: Any, per_channel: bool) -> Any:
        raise NotImplementedError

    def act_scale(self, name: str) -> Any:
        """The int8 scale of activation ``name`` (after ``fake_quant_act`` saw it)."""
        raise NotImplementedError

    def bias(self, bias: Any, kernel: Any, per_channel: bool) -> Any:
        """``bias`` as TFLite stores it (``quantize_bias``), the input being the last
        activation quantised: every convolution and the classifier read the tensor made just
        before them."""
        return self.constant_out(
            quantize_bias(bias, self._input_scale, weight_scale(kernel, per_channel))
        )

    def constant_out(self, x: jax.Array) -> Any:
        return x

    def _act(self, x: Any, kind: str) -> Any:
        name = f'{self._count:03d}_{kind}'
        self._count += 1
        x = self.fake_quant_act(x, name)
        self._input_scale = self.act_scale(name)
        return x

    def _activation(self, y: Any, name: str | None) -> Any:
        if name is None:
            return self._act(y, 'linear')
        if name == 'swish':
            y = self._act(y, 'preact')
            s = self.fake_quant_fixed(self.sigmoid(y), *PROBABILITY_RANGE)
            return self._act(y * s, 'swish')
        if name == 'relu6':
            return self._act(self.relu6(y), 'relu6')
        if name == 'relu':
            return self._act(self.relu(y), 'relu')
        raise ValueError(f'unknown activation {name!r}')

    def normalize(self, images: Any, mean: tuple, std: tuple) -> Any:
        # (x - mean) / std as a 1x1 depthwise convolution (x * 1/std - mean/std): int8 TFLite
        # has no SUB/DIV by a per-channel constant, but a DEPTHWISE_CONV_2D on the exact pixels.
        x = self.fake_quant_fixed(self.cast(images), *PIXEL_RANGE)
        self._input_scale = np.float32(1.0)  # PIXEL_RANGE's
        std64 = np.asarray(std, np.float64)
        scale = np.float32(1.0 / std64)[None, None, :]
        shift = self.bias(np.float32(-np.asarray(mean, np.float64) / std64), scale, True)
        kernel = self.fake_quant_weights(scale, True)
        return self._act(self.depthwise2d(x, kernel, 1, self.net.resolution) + shift, 'input')

    def conv(self, x: Any, layer: Conv, size: int) -> Any:
        bias = self.bias(layer.bias, layer.kernel, True)
        kernel = self.fake_quant_weights(layer.kernel, True)
        y = self.conv2d(x, kernel, layer.stride, size) + bias
        return self._activation(y, layer.activation)

    def depthwise(self, x: Any, layer: Conv, size: int) -> Any:
        # (k, k, C) per channel; the TF side quantises it as (k, k, 1, C), which converts.
        bias = self.bias(layer.bias, layer.kernel, True)
        kernel = self.fake_quant_weights(layer.kernel, True)
        y = self.depthwise2d(x, kernel, layer.stride, size) + bias
        return self._activation(y, layer.activation)

    def squeeze_excite(self, x: Any, se: SqueezeExcite) -> Any:
        s = self._act(self.mean(x, keepdims=True), 'se_mean')
        bias = self.bias(se.reduce_bias, se.reduce_kernel, True)
        s = self.conv2d(s, self.fake_quant_weights(se.reduce_kernel[None, None], True), 1, 1)
        s = self._activation(s + bias, se.activation)
        bias = self.bias(se.expand_bias, se.expand_kernel, True)
        s = self.conv2d(s, self.fake_quant_weights(se.expand_kernel[None, None], True), 1, 1)
        s = self._act(s + bias, 'se_logit')
        s = self.fake_quant_fixed(self.sigmoid(s), *PROBABILITY_RANGE)
        return self._act(x * s, 'se_scaled')

    def add(self, x: Any, y: Any) -> Any:
        return self._act(x + y, 'residual')

    def classify(self, x: Any, kernel: Any, bias: Any) -> tuple[Any, Any]:
        features = self._act(self.mean(x, keepdims=False), 'features')
        bias = self.bias(bias, kernel, False)
        logits = self.matmul(features, self.fake_quant_weights(kernel, False)) + bias
        logits = self._act(logits, 'logits')
        return logits, self.fake_quant_fixed(self.softmax(logits), *PROBABILITY_RANGE)


class QuantOps(FakeQuantWalk):
    """The JAX fake-quant walk. ``ranges`` maps each activation's name to float32 [min, max];
    None measures them on this batch (the start of the EMA). ``train=True`` moves every range
    towards this batch's (``decay``); ``new_ranges`` holds the ranges used, to keep.
    ``depthwise_impl`` picks the depthwise convolution as the model's option does."""

    def __init__(
        self,
        net: FoldedNetwork,
        ranges: dict | None,
        *,
        train: bool = False,
        decay: float = 0.99,
        depthwise_impl: str = 'auto',
    ):
        super().__init__(net)
        self.impl = depthwise_impl
        self.ranges = ranges
        self.train = train
        self.decay = decay
        self.new_ranges: dict[str, jax.Array] = {}

    def fake_quant_act(self, x: jax.Array, name: str) -> jax.Array:
        if self.ranges is None or self.train:
            x_ = jax.lax.stop_gradient(x)
            batch = jnp.stack([jnp.minimum(jnp.min(x_), 0.0), jnp.maximum(jnp.max(x_), 0.0)])
        if self.ranges is None:
            r = batch
        elif name not in self.ranges:
            raise KeyError(f'no range {name!r}: the ranges belong to another network')
        elif self.train:
            r = self.decay * self.ranges[name] + (1.0 - self.decay) * batch
        else:
            r = self.ranges[name]
        r = jax.lax.stop_gradient(jnp.asarray(r, jnp.float32))
        self.new_ranges[name] = r
        return fake_quant(x, r[0], r[1])

    def act_scale(self, name: str) -> jax.Array:
        r = self.new_ranges[name]
        return nudge(r[0], r[1])[2]

    def fake_quant_fixed(self, x: jax.Array, lo: float, hi: float) -> jax.Array:
        return fake_quant(x, opaque(jnp.float32(lo)), opaque(jnp.float32(hi)))

    def fake_quant_weights(self, kernel: jax.Array, per_channel: bool) -> jax.Array:
        lo, hi = weight_range(jax.lax.stop_gradient(jnp.asarray(kernel)), per_channel)
        if per_channel:
            return fake_quant_per_channel(kernel, lo, hi, narrow_range=True)
        return fake_quant(kernel, lo, hi, narrow_range=True)

    def cast(self, images: jax.Array) -> jax.Array:
        return jnp.asarray(images).astype(jnp.float32)

    def _pads(self, size: int, k: int, stride: int) -> list[tuple[int, int]]:
        lo, hi = self.net.pads(size, k, stride) if (k > 1 or stride > 1) else (0, 0)
        return [(lo, hi), (lo, hi)]

    def conv2d(self, x: jax.Array, kernel: jax.Array, stride: int, size: int) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            (stride, stride),
            self._pads(size, kernel.shape[0], stride),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            precision=jax.lax.Precision.HIGHEST,
        )
        return _no_contract(y)  # the bias add stays a separate rounding, as in TF

    def depthwise2d(self, x: jax.Array, kernel: jax.Array, stride: int, size: int) -> jax.Array:
        # The model's own depthwise convolution: XLA's grouped convolution (and its gradient) is
        # many times slower on CPU (efficientnet.layers.depthwise_conv).
        k, _, c = kernel.shape
        y = depthwise_conv(x, kernel.reshape(k, k, 1, c), stride, self.net.padding, self.impl)
        return _no_contract(y)  # the bias add stays a separate rounding, as in TF

    def sigmoid(self, x: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(x)

    def relu6(self, x: jax.Array) -> jax.Array:
        return jnp.clip(x, 0.0, 6.0)

    def relu(self, x: jax.Array) -> jax.Array:
        return jnp.maximum(x, 0.0)

    def mean(self, x: jax.Array, keepdims: bool) -> jax.Array:
        return jnp.mean(x, axis=(1, 2), keepdims=keepdims)

    def matmul(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        return _no_contract(jnp.matmul(x, kernel, precision=jax.lax.Precision.HIGHEST))

    def softmax(self, x: jax.Array) -> jax.Array:
        return jax.nn.softmax(x, axis=-1)


def qat_forward(
    net: FoldedNetwork,
    ranges: dict | None,
    images: jax.Array,
    *,
    train: bool = False,
    decay: float = 0.99,
    depthwise_impl: str = 'auto',
) -> tuple[jax.Array, jax.Array, dict]:
    """uint8 images -> (logits, probabilities, ranges used) of the fake-quantised network.
    ``depthwise_impl``: as the model's (``efficientnet.layers.depthwise_conv``)."""
    ops = QuantOps(net, ranges, train=train, decay=decay, depthwise_impl=depthwise_impl)
    logits, probabilities = forward(ops, net, images)
    return logits, probabilities, ops.new_ranges


# ------------------------------------------------------------------- the QAT result on disk

QAT_FILE = 'qat.msgpack'  # in a QAT workdir: the folded network, its ranges and where from


def logits_step(ranges: dict) -> float:
    """The logits' output step (one LSB of their int8 scale) under ``ranges``."""
    (name,) = [k for k in ranges if k.endswith('_logits')]
    lo, hi = np.asarray(ranges[name], np.float32)
    return float(nudge(lo, hi)[2])


def save_qat(path: str, net: FoldedNetwork, ranges: dict, info: dict) -> str:
    """Writes the fine-tuned folded network, its activation ranges and ``info`` (source, step,
    normalisation, ...) as msgpack to ``path`` (local or gs://)."""
    from flax import serialization

    from efficientnet import paths

    data = {
        'network': network_to_dict(jax.device_get(net)),
        'ranges': {k: np.asarray(v, np.float32) for k, v in ranges.items()},
        'info': dict(info),
    }
    paths.write_atomic(path, serialization.msgpack_serialize(data))
    return path


def load_qat(path: str) -> tuple[FoldedNetwork, dict, dict]:
    """(network, ranges, info) from ``save_qat``'s file, or from a QAT workdir holding one."""
    from flax import serialization

    from efficientnet import paths

    p = paths.as_path(path)
    if p.is_dir():
        p = paths.as_path(path, QAT_FILE)
    if not p.is_file():
        raise FileNotFoundError(f'{p} not found: not a QAT result (scripts/qat.py writes it)')
    data = serialization.msgpack_restore(p.read_bytes())
    ranges = {k: np.asarray(v, np.float32) for k, v in data['ranges'].items()}
    return network_from_dict(data['network']), ranges, dict(data['info'])
