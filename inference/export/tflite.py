"""TFLite export: float32, or int8 by post-training quantisation with representative images.

The model is the TF-op rebuild of ``tf_graph`` (see there for why not the jax2tf graph). Both
variants take uint8 images [N, S, S, 3] and return float32 'logits' and 'probabilities'
through the 'serving_default' signature. In the int8 model every op computes in int8 (the
converter fails rather than leave an op in float); the uint8 input is cast and quantised by
the model's first ops, the outputs are dequantised.

``convert_qat_tflite`` converts a quantisation-aware-trained network (``quant``): its graph
carries a fake-quant range on every tensor, so ``optimizations=[DEFAULT]`` without any
representative data gives a model that is int8 throughout; ``int8_problems`` lists the tensors
that are not.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np

from efficientnet import paths
from inference.export.network import fold_network

QUANTIZATIONS = (None, 'int8')


def convert_tflite(
    model: Any,
    variables: Any,
    *,
    quantization: str | None = None,
    representative_images: Iterable[np.ndarray] | np.ndarray | None = None,
    resolution: int | None = None,
    normalization: str | tuple | None = None,
) -> bytes:
    """The flatbuffer of ``model`` with ``variables``. ``quantization='int8'`` needs
    ``representative_images``: uint8 [S, S, 3] images like those the model will see (a few
    hundred real ones; they set every activation's int8 range)."""
    import tensorflow as tf

    from inference.export import tf_graph

    if quantization not in QUANTIZATIONS:
        raise ValueError(f'quantization must be one of {QUANTIZATIONS}, got {quantization!r}')
    size = model.variant.resolution if resolution is None else resolution
    if quantization == 'int8':
        images = _calibration_images(representative_images, size)
    net = fold_network(model, variables, resolution=size, normalization=normalization)
    fn = tf_graph.serving_function(net)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], tf.Module())
    if quantization == 'int8':

        def representative_dataset():
            for image in images:
                yield {'images': image[None]}

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def convert_qat_tflite(net: Any, ranges: dict) -> bytes:
    """The int8 flatbuffer of a QAT folded network with its learned ``ranges``
    (``quant.load_qat``); raises ValueError if any internal tensor is left in float."""
    import tensorflow as tf

    from inference.export import tf_graph

    fn = tf_graph.serving_function(net, ranges)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], tf.Module())
    converter.optimizations = [tf.lite.Optimize.DEFAULT]  # the FakeQuant ranges set every scale
    data = converter.convert()
    problems = int8_problems(data)
    if problems:
        raise ValueError('the QAT model did not convert to int8 throughout: ' + '; '.join(problems))
    return data


def int8_problems(data: bytes) -> list[str]:
    """Tensors of a flatbuffer that are neither int8 nor int32 (biases), other than the uint8
    input, its float cast (quantised by the next op) and the dequantised float outputs."""
    interpreter = _interpreter(data)
    ops = interpreter._get_ops_details()  # the only listing of ops; stable since TF 2.5
    boundary = {i for op in ops if op['op_name'] in ('CAST', 'DEQUANTIZE') for i in op['outputs']}
    boundary |= {d['index'] for d in interpreter.get_input_details()}
    problems = []
    for d in interpreter.get_tensor_details():
        if d['dtype'] in (np.int8, np.int32) or d['index'] in boundary:
            continue
        problems.append(f'{d["name"]} is {np.dtype(d["dtype"]).name}')
    float_ops = sorted({op['op_name'] for op in ops} - INT8_OPS)
    if float_ops:
        problems.append(f'unexpected ops {float_ops}')
    return problems


INT8_OPS = {
    'CAST',
    'QUANTIZE',
    'DEQUANTIZE',
    'CONV_2D',
    'DEPTHWISE_CONV_2D',
    'FULLY_CONNECTED',
    'ADD',
    'MUL',
    'MEAN',
    'LOGISTIC',
    'SOFTMAX',
    'PAD',
}


def _calibration_images(images: Any, resolution: int) -> list[np.ndarray]:
    if images is None:
        raise ValueError(
            'int8 quantisation needs representative images (uint8 [S, S, 3]) to '
            'calibrate the activation ranges'
        )
    out = [np.asarray(im) for im in images]
    if not out:
        raise ValueError('int8 quantisation needs at least one representative image')
    for im in out:
        if im.shape != (resolution, resolution, 3) or im.dtype != np.uint8:
            raise ValueError(
                f'representative images must be uint8 [{resolution}, {resolution}, '
                f'3]; got {im.dtype} {im.shape}'
            )
    return out


def export_tflite(
    model: Any,
    variables: Any,
    path: str | os.PathLike,
    **kwargs: Any,
) -> str:
    """Writes ``convert_tflite(model, variables, **kwargs)`` to ``path`` (local or gs://);
    returns the path."""
    data = convert_tflite(model, variables, **kwargs)
    path = os.fspath(path)
    paths.write_atomic(path, data)
    return path


def run_tflite(
    model: str | os.PathLike | bytes, images: np.ndarray, batch_size: int = 32
) -> dict[str, np.ndarray]:
    """Runs a TFLite file (or flatbuffer bytes) on uint8 images [N, S, S, 3] with TF's
    interpreter; returns {'logits', 'probabilities'}."""
    interpreter = _interpreter(model)
    images = np.asarray(images, np.uint8)
    # The signature maps 'images', 'logits' and 'probabilities' to the flatbuffer's tensors.
    runner = interpreter.get_signature_runner('serving_default')
    result: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch_size):
        out = runner(images=images[start : start + batch_size])
        for k, v in out.items():
            result.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in result.items()}


def _interpreter(model: str | os.PathLike | bytes) -> Any:
    import tensorflow as tf

    with warnings.catch_warnings():
        # TF 2.21 announces the interpreter's move to ai_edge_litert; it runs the same files.
        warnings.filterwarnings(
            'ignore', message='.*tf.lite.Interpreter is deprecated', category=UserWarning
        )
        if isinstance(model, bytes):
            return tf.lite.Interpreter(model_content=model)
        if paths.is_remote(model):  # the interpreter opens local files only
            return tf.lite.Interpreter(model_content=paths.as_path(model).read_bytes())
        return tf.lite.Interpreter(model_path=os.fspath(model))
