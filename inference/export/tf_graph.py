"""The folded network rebuilt from tf.nn ops, for the TFLite converter.

jax2tf in jax 0.10 only serialises StableHLO (an ``XlaCallModule`` op); its TF-op lowering
(``native_serialization=False``) is gone. The converter can legalise such a module, but not
reliably: with a fixed batch it fails on our 4-D pointwise dots, and with a symbolic batch it
emits shape arithmetic (SHAPE, GATHER, UNSORTED_SEGMENT_PROD, ...) that int8 quantisation leaves
in float. A graph of plain TF ops converts to the fused kernels TFLite is built around
(CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED with folded BatchNorm and fused ReLU6) and
quantises fully. ``tests/test_export.py`` checks the converted models against the JAX model.

``QuantTFOps`` is the same walk with ``tf.quantization`` fake-quant ops at the tensors and with
the ranges that quantisation-aware training learned (``quant.FakeQuantWalk`` places them for
both); the converter reads every range as an int8 scale and zero point.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from inference.export import quant
from inference.export.network import Conv, FoldedNetwork, SqueezeExcite, forward


def _activation(x: tf.Tensor, name: str | None) -> tf.Tensor:
    if name is None:
        return x
    if name == 'swish':
        return x * tf.sigmoid(x)
    if name == 'relu6':
        return tf.nn.relu6(x)
    if name == 'relu':
        return tf.nn.relu(x)
    raise ValueError(f'unknown activation {name!r}')


class TFOps:
    """``network.Ops`` with tf.nn ops on NHWC tensors. TF's 'SAME' is exactly the model's
    'same' padding (the odd pixel at the bottom/right); 'symmetric' pads explicitly."""

    def __init__(self, net: FoldedNetwork):
        self.net = net

    def _padded(self, x: tf.Tensor, layer: Conv, size: int) -> tuple[tf.Tensor, str]:
        if layer.size == 1 and layer.stride == 1:
            return x, 'VALID'
        if self.net.padding == 'same':
            return x, 'SAME'
        lo, hi = self.net.pads(size, layer.size, layer.stride)
        return tf.pad(x, [[0, 0], [lo, hi], [lo, hi], [0, 0]]), 'VALID'

    def normalize(self, images: tf.Tensor, mean: tuple, std: tuple) -> tf.Tensor:
        x = tf.cast(images, tf.float32)
        return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)

    def conv(self, x: tf.Tensor, layer: Conv, size: int) -> tf.Tensor:
        x, padding = self._padded(x, layer, size)
        y = tf.nn.conv2d(x, tf.constant(layer.kernel), layer.stride, padding)
        return _activation(tf.nn.bias_add(y, tf.constant(layer.bias)), layer.activation)

    def depthwise(self, x: tf.Tensor, layer: Conv, size: int) -> tf.Tensor:
        x, padding = self._padded(x, layer, size)
        kernel = tf.constant(layer.kernel[:, :, :, None])
        s = layer.stride
        y = tf.nn.depthwise_conv2d(x, kernel, [1, s, s, 1], padding)
        return _activation(tf.nn.bias_add(y, tf.constant(layer.bias)), layer.activation)

    def squeeze_excite(self, x: tf.Tensor, se: SqueezeExcite) -> tf.Tensor:
        s = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
        s = tf.nn.conv2d(s, tf.constant(se.reduce_kernel[None, None]), 1, 'VALID')
        s = _activation(tf.nn.bias_add(s, tf.constant(se.reduce_bias)), se.activation)
        s = tf.nn.conv2d(s, tf.constant(se.expand_kernel[None, None]), 1, 'VALID')
        return x * tf.sigmoid(tf.nn.bias_add(s, tf.constant(se.expand_bias)))

    def add(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        return x + y

    def classify(self, x: tf.Tensor, kernel: np.ndarray, bias: np.ndarray) -> tuple[Any, Any]:
        features = tf.reduce_mean(x, axis=[1, 2])
        logits = tf.matmul(features, tf.constant(kernel)) + tf.constant(bias)
        return logits, tf.nn.softmax(logits)


class QuantTFOps(quant.FakeQuantWalk):
    """The fake-quant walk in TF ops with fixed ``ranges`` ({name: [min, max]}, from
    ``quant.QuantOps``); weights are fake-quantised here from their own symmetric range."""

    def __init__(self, net: FoldedNetwork, ranges: dict):
        super().__init__(net)
        self.ranges = ranges
        self._tf = TFOps(net)

    def fake_quant_act(self, x: tf.Tensor, name: str) -> tf.Tensor:
        if name not in self.ranges:
            raise ValueError(f'no range {name!r}: the ranges belong to another network')
        lo, hi = (float(v) for v in np.asarray(self.ranges[name], np.float32))
        return tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, name=f'q{name}')

    def fake_quant_fixed(self, x: tf.Tensor, lo: float, hi: float) -> tf.Tensor:
        return tf.quantization.fake_quant_with_min_max_vars(x, lo, hi)

    def act_scale(self, name: str) -> np.ndarray:
        # Computed by the JAX code (eagerly), so that the bias constants equal the JAX ones.
        lo, hi = np.asarray(self.ranges[name], np.float32)
        return np.asarray(quant.nudge(lo, hi)[2])

    def constant_out(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def fake_quant_weights(self, kernel: np.ndarray, per_channel: bool) -> tf.Tensor:
        kernel = np.asarray(kernel, np.float32)
        lo, hi = quant.weight_range(kernel, per_channel)
        if not per_channel:
            fq = tf.quantization.fake_quant_with_min_max_vars
            return fq(tf.constant(kernel), float(lo), float(hi), narrow_range=True)
        if kernel.ndim == 3:  # depthwise (k, k, C): quantised as (k, k, 1, C), which converts
            kernel = kernel[:, :, None, :]
        return tf.quantization.fake_quant_with_min_max_vars_per_channel(
            tf.constant(kernel), tf.constant(lo), tf.constant(hi), narrow_range=True
        )

    def cast(self, images: tf.Tensor) -> tf.Tensor:
        return tf.cast(images, tf.float32)

    def conv2d(self, x: tf.Tensor, kernel: tf.Tensor, stride: int, size: int) -> tf.Tensor:
        layer = Conv(np.zeros(kernel.shape), np.zeros(()), stride, None)
        x, padding = self._tf._padded(x, layer, size)
        return tf.nn.conv2d(x, kernel, stride, padding)

    def depthwise2d(self, x: tf.Tensor, kernel: tf.Tensor, stride: int, size: int) -> tf.Tensor:
        k, c = int(kernel.shape[0]), int(kernel.shape[-1])
        layer = Conv(np.zeros((k, k, c)), np.zeros(()), stride, None)
        x, padding = self._tf._padded(x, layer, size)
        kernel = tf.reshape(kernel, [k, k, c, 1])
        return tf.nn.depthwise_conv2d(x, kernel, [1, stride, stride, 1], padding)

    def sigmoid(self, x: tf.Tensor) -> tf.Tensor:
        return tf.sigmoid(x)

    def relu6(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.relu6(x)

    def relu(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.relu(x)

    def mean(self, x: tf.Tensor, keepdims: bool) -> tf.Tensor:
        return tf.reduce_mean(x, axis=[1, 2], keepdims=keepdims)

    def matmul(self, x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        return tf.matmul(x, kernel)

    def softmax(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.softmax(x)


def serving_function(
    net: FoldedNetwork, ranges: dict | None = None
) -> tf.types.experimental.ConcreteFunction:
    """uint8 images [N, S, S, 3] -> {'logits', 'probabilities'} (float32), N free. With
    ``ranges`` (quantisation-aware training's), the graph carries fake-quant ops."""
    size = net.resolution

    @tf.function(
        input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name='images')],
        autograph=False,
    )
    def serve(images):
        ops = TFOps(net) if ranges is None else QuantTFOps(net, ranges)
        logits, probabilities = forward(ops, net, images)
        return {'logits': logits, 'probabilities': probabilities}

    return serve.get_concrete_function()
