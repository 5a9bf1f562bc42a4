"""The folded network rebuilt from tf.nn ops, for the TFLite converter.

jax2tf in jax 0.10 only serialises StableHLO (an ``XlaCallModule`` op); its TF-op lowering
(``native_serialization=False``) is gone. The converter can legalise such a module, but not
reliably: with a fixed batch it fails on our 4-D pointwise dots, and with a symbolic batch it
emits shape arithmetic (SHAPE, GATHER, UNSORTED_SEGMENT_PROD, ...) that int8 quantisation leaves
in float. A graph of plain TF ops converts to the fused kernels TFLite is built around
(CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED with folded BatchNorm and fused ReLU6) and
quantises fully. ``tests/test_export.py`` checks the converted models against the JAX model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

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


def serving_function(net: FoldedNetwork) -> tf.types.experimental.ConcreteFunction:
    """uint8 images [N, S, S, 3] -> {'logits', 'probabilities'} (float32), N free."""
    size = net.resolution

    @tf.function(
        input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name='images')],
        autograph=False,
    )
    def serve(images):
        logits, probabilities = forward(TFOps(net), net, images)
        return {'logits': logits, 'probabilities': probabilities}

    return serve.get_concrete_function()
