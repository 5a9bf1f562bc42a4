"""ONNX export, written directly with the ``onnx`` helper API from the folded network.

tf2onnx does not install beside TF 2.21 and numpy 2, and jax2tf's StableHLO SavedModel is no
input for it anyway; the network is small enough to write node by node. The graph takes
uint8 images [N, S, S, 3] (NHWC, as the other exports; N is symbolic), normalises, transposes to
NCHW once and returns float32 'logits' and 'probabilities'. Opset 17, standard ops only (Conv
with explicit asymmetric pads for TF SAME, Sigmoid*x for swish, Clip for ReLU6,
GlobalAveragePool, Gemm, Softmax), so any ONNX runtime can run it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from efficientnet import paths
from inference.export.network import Conv, FoldedNetwork, SqueezeExcite, fold_network, forward

OPSET = 17


class OnnxOps:
    """``network.Ops`` that appends ONNX nodes; tensors are value names (NCHW after
    ``normalize``)."""

    def __init__(self, net: FoldedNetwork):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.net = net
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f'{prefix}_{self._count}'

    def _const(self, value: np.ndarray, prefix: str = 'const') -> str:
        name = self._name(prefix)
        self.initializers.append(self.numpy_helper.from_array(np.asarray(value), name))
        return name

    def _node(self, op: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        output = output or self._name(op.lower())
        self.nodes.append(self.helper.make_node(op, inputs, [output], **attrs))
        return output

    def _activation(self, x: str, name: str | None) -> str:
        if name is None:
            return x
        if name == 'swish':
            return self._node('Mul', [x, self._node('Sigmoid', [x])])
        if name in ('relu6', 'relu'):
            hi = 6.0 if name == 'relu6' else np.inf
            lo_c = self._const(np.array(0.0, np.float32))
            hi_c = self._const(np.array(hi, np.float32))
            return self._node('Clip', [x, lo_c, hi_c])
        raise ValueError(f'unknown activation {name!r}')

    def normalize(self, images: str, mean: tuple, std: tuple) -> str:
        from onnx import TensorProto

        x = self._node('Cast', [images], to=TensorProto.FLOAT)
        x = self._node('Sub', [x, self._const(np.asarray(mean, np.float32))])
        x = self._node('Div', [x, self._const(np.asarray(std, np.float32))])
        return self._node('Transpose', [x], perm=[0, 3, 1, 2])

    def _conv(
        self, x: str, weight: np.ndarray, bias: np.ndarray, layer: Conv, size: int, group: int
    ) -> str:
        lo, hi = self.net.pads(size, layer.size, layer.stride)
        y = self._node(
            'Conv',
            [x, self._const(weight, 'weight'), self._const(bias, 'bias')],
            kernel_shape=[layer.size, layer.size],
            strides=[layer.stride, layer.stride],
            pads=[lo, lo, hi, hi],
            group=group,
        )
        return self._activation(y, layer.activation)

    def conv(self, x: str, layer: Conv, size: int) -> str:
        weight = layer.kernel.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        return self._conv(x, weight, layer.bias, layer, size, group=1)

    def depthwise(self, x: str, layer: Conv, size: int) -> str:
        weight = layer.kernel.transpose(2, 0, 1)[:, None]  # (k, k, C) -> (C, 1, k, k)
        return self._conv(x, weight, layer.bias, layer, size, group=weight.shape[0])

    def squeeze_excite(self, x: str, se: SqueezeExcite) -> str:
        s = self._node('GlobalAveragePool', [x])
        s = self._node(
            'Conv',
            [
                s,
                self._const(se.reduce_kernel.T[:, :, None, None], 'weight'),
                self._const(se.reduce_bias, 'bias'),
            ],
            kernel_shape=[1, 1],
        )
        s = self._activation(s, se.activation)
        s = self._node(
            'Conv',
            [
                s,
                self._const(se.expand_kernel.T[:, :, None, None], 'weight'),
                self._const(se.expand_bias, 'bias'),
            ],
            kernel_shape=[1, 1],
        )
        return self._node('Mul', [x, self._node('Sigmoid', [s])])

    def add(self, x: str, y: str) -> str:
        return self._node('Add', [x, y])

    def classify(self, x: str, kernel: np.ndarray, bias: np.ndarray) -> tuple[str, str]:
        features = self._node('Flatten', [self._node('GlobalAveragePool', [x])], axis=1)
        logits = self._node(
            'Gemm',
            [
                features,
                self._const(kernel, 'classifier_kernel'),
                self._const(bias, 'classifier_bias'),
            ],
            output='logits',
        )
        return logits, self._node('Softmax', [logits], output='probabilities', axis=-1)


def build_onnx(
    model: Any,
    variables: Any,
    *,
    resolution: int | None = None,
    normalization: str | tuple | None = None,
) -> Any:
    """The checked ``onnx.ModelProto`` of ``model`` with ``variables``."""
    import onnx
    from onnx import TensorProto, helper

    net = fold_network(model, variables, resolution=resolution, normalization=normalization)
    ops = OnnxOps(net)
    forward(ops, net, 'images')
    s, k = net.resolution, net.num_classes
    graph = helper.make_graph(
        ops.nodes,
        net.name.replace('-', '_'),
        [helper.make_tensor_value_info('images', TensorProto.UINT8, ['batch', s, s, 3])],
        [
            helper.make_tensor_value_info('logits', TensorProto.FLOAT, ['batch', k]),
            helper.make_tensor_value_info('probabilities', TensorProto.FLOAT, ['batch', k]),
        ],
        ops.initializers,
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid('', OPSET)], producer_name='efficientnet-jax'
    )
    proto.ir_version = 8  # ONNX 1.10+, readable by every maintained runtime
    metadata = {
        'model': net.name,
        'resolution': str(s),
        'mean': repr(list(net.mean)),
        'std': repr(list(net.std)),
        'padding': net.padding,
        'input': 'uint8 [N, S, S, 3] RGB, resized and cropped by the caller',
    }
    helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model: Any, variables: Any, path: str | os.PathLike, **kwargs: Any) -> str:
    """Writes ``build_onnx(model, variables, **kwargs)`` to ``path`` (local or gs://); returns
    the path."""
    proto = build_onnx(model, variables, **kwargs)
    path = os.fspath(path)
    # The bytes onnx.save_model would write, through the one writer that also takes gs://.
    paths.write_atomic(path, proto.SerializeToString())
    return path


def run_onnx(path: str | os.PathLike, images: np.ndarray) -> dict[str, np.ndarray]:
    """Runs an exported file with onnxruntime on uint8 images [N, S, S, 3]."""
    import onnxruntime as ort

    path = os.fspath(path)
    # onnxruntime opens local files only; a gs:// file is read into memory first.
    model = paths.as_path(path).read_bytes() if paths.is_remote(path) else path
    session = ort.InferenceSession(model, providers=['CPUExecutionProvider'])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {'images': np.asarray(images, np.uint8)})
    return dict(zip(names, values))
