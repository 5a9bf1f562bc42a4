"""keras.applications EfficientNetB0-B7 and EfficientNetV2B0-B3/S/M/L: a built model, or its
weight files.

Layer names: stem_conv, stem_bn; block{stage}{letter}_{expand_conv, expand_bn, dwconv, bn,
se_reduce, se_expand, project_conv, project_bn} with the letter counting repeats within a
stage (V2 calls the depthwise conv dwconv2; its Fused-MBConv blocks have expand_conv/expand_bn,
the k x k conv, and project_conv/project_bn, or only project_conv/project_bn when they do not
expand); top_conv, top_bn, predictions. The model starts with Rescaling(1/255) and Normalization
(plus, for the ImageNet weights, a second Rescaling by 1/sqrt(std); V2-S/M/L: one
Rescaling(1/128, offset -1)); our model takes the normalised image instead, so
``keras_input_normalization`` reads what those layers do.
"""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from efficientnet import arch, paths
from efficientnet.weights import core

_TOP = {
    'stem_conv': 'stem_conv',
    'stem_bn': 'stem_bn',
    'head_conv': 'top_conv',
    'head_bn': 'top_bn',
    'classifier': 'predictions',
}
_BLOCK = {
    'expand_conv': 'expand_conv',
    'expand_bn': 'expand_bn',
    'dw_conv': 'dwconv',
    'dw_bn': 'bn',
    'se/reduce': 'se_reduce',
    'se/expand': 'se_expand',
    'project_conv': 'project_conv',
    'project_bn': 'project_bn',
}
_BN_LEAF = {'scale': 'gamma', 'bias': 'beta', 'mean': 'moving_mean', 'var': 'moving_variance'}
_HEAD_KEYS = ('predictions/kernel', 'predictions/bias')
_PREPROCESSING = ('Rescaling', 'Normalization')


def block_prefixes(blocks: list[arch.BlockSpec]) -> dict[int, str]:
    """Our block index -> Keras layer-name prefix 'block{stage + 1}{letter}_'."""
    out, first = {}, {}
    for b in blocks:
        first.setdefault(b.stage, b.index)
        out[b.index] = f'block{b.stage + 1}{chr(ord("a") + b.index - first[b.stage])}_'
    return out


def keras_plan(
    shapes: Mapping[str, tuple[int, ...]], blocks: list[arch.BlockSpec], v2: bool = False
) -> core.Plan:
    prefixes = block_prefixes(blocks)
    names = dict(_BLOCK, dw_conv='dwconv2') if v2 else _BLOCK
    plan = {}
    for path in shapes:
        index, rest = core.block_path(path)
        module, leaf = rest.rsplit('/', 1)
        layer = _TOP[module] if index is None else prefixes[index] + names[module]
        var = _BN_LEAF[leaf] if module.endswith('_bn') else leaf
        transform = core.depthwise_from_tf if module == 'dw_conv' else core.identity
        plan[path] = (f'{layer}/{var}', transform)
    return plan


def _model_tensors(model: Any) -> tuple[dict[str, np.ndarray], list[str]]:
    """Flat {layer/variable: array} of a Keras model, and the keys of its preprocessing layers."""
    source, preprocessing = {}, []
    for layer in model.layers:
        for w in layer.weights:
            # Keras 3 names a variable 'kernel'; tf.keras 2 said 'stem_conv/kernel:0'.
            var = w.name.split('/')[-1].split(':')[0]
            if var == 'depthwise_kernel':
                var = 'kernel'
            key = f'{layer.name}/{var}'
            source[key] = np.asarray(w.numpy() if hasattr(w, 'numpy') else w)
            if type(layer).__name__ in _PREPROCESSING:
                preprocessing.append(key)
    return source, preprocessing


def _h5_head(f: Any) -> int | None:
    """Class count of the one Dense kernel in a Keras weights file, None when it has no top.

    Works for Keras 3 ``.weights.h5`` (layers named by class) and legacy ``.h5`` alike: the
    only 2-D tensor an EfficientNet holds is the classifier's kernel.
    """
    import h5py

    dense = []

    def visit(_, obj):
        if isinstance(obj, h5py.Dataset) and obj.ndim == 2:
            dense.append(obj.shape)

    with h5py.File(f, 'r') as h5:
        h5.visititems(visit)
    if len(dense) > 1:
        raise ValueError(f'the file holds {len(dense)} 2-D tensors; not an EfficientNet')
    return dense[0][1] if dense else None


KERAS_V2 = ('b0', 'b1', 'b2', 'b3', 's', 'm', 'l')


def _keras_class(name: str) -> str:
    v = arch.get_variant(name)
    if v.is_v2:
        suffix = v.name.removeprefix('efficientnetv2-')
        if suffix in KERAS_V2:
            return 'EfficientNetV2' + suffix.upper()
    else:
        suffix = v.name.removeprefix('efficientnet-')
        if not v.is_lite and suffix in {f'b{i}' for i in range(8)}:
            return 'EfficientNet' + suffix.upper()
    raise ValueError(
        f'keras.applications has no {v.name}; Keras weights exist for efficientnet-b0 ... '
        'efficientnet-b7 and efficientnetv2-b0 ... -b3, -s, -m, -l'
    )


def load_keras_file(path: str, name: str) -> Any:
    """Builds ``keras.applications.EfficientNet[V2]*(weights=None)`` with the head the file has and
    loads the file (``.keras``, ``.weights.h5`` or legacy ``.h5``; local or gs://) into it."""
    if not paths.as_path(path).is_file():
        raise FileNotFoundError(f'Keras weights file not found: {path}')
    cls = _keras_class(name)
    if not path.endswith(('.keras', '.h5')):
        raise ValueError(f'unrecognised Keras file {path!r}: expected .keras, .weights.h5 or .h5')
    if paths.is_remote(path):  # Keras and h5py read local files only: a local copy first
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, os.path.basename(path))
            paths.as_path(path).copy(local)
            return _load_local_keras_file(local, cls, shown=path)
    return _load_local_keras_file(path, cls, shown=path)


def _load_local_keras_file(path: str, cls: str, shown: str) -> Any:
    if path.endswith('.keras'):
        with zipfile.ZipFile(path) as z:
            classes = _h5_head(io.BytesIO(z.read('model.weights.h5')))
    else:
        classes = _h5_head(path)
    import keras

    kwargs = dict(include_top=True, classes=classes) if classes else dict(include_top=False)
    model = getattr(keras.applications, cls)(weights=None, **kwargs)
    try:
        model.load_weights(path)
    except Exception as e:  # Keras raises ValueError, KeyError, ... on an architecture mismatch
        raise core.WeightsMismatchError(
            f'{shown} does not load into keras.applications.{cls} '
            f'(are these weights for another variant?): {e}'
        ) from e
    return model


def classifier_classes(model: Any) -> int:
    """Class count of a keras.applications model's classifier ('predictions'); 0 without top."""
    top = any(layer.name == 'predictions' for layer in model.layers)
    return int(model.output_shape[-1]) if top else 0


def from_keras(
    model_or_file: Any, name: str, *, num_classes: int = 1000, skip_head: bool = False
) -> dict[str, dict]:
    """Converts a keras.applications EfficientNetB0-B7 or EfficientNetV2* (a built model or a
    ``.keras`` / ``.weights.h5`` / ``.h5`` file) for model ``name``.

    The Keras model's input preprocessing is not part of the result; feed our model
    ``(x - mean) / std`` with ``mean, std = keras_input_normalization(keras_model)``.
    Raises ``WeightsMismatchError`` (a ValueError) on any missing, extra or misshapen tensor.
    """
    canonical = arch.get_variant(name).name
    if isinstance(model_or_file, (str, os.PathLike)):
        model = load_keras_file(os.fspath(model_or_file), canonical)
    else:
        model = model_or_file
    if not hasattr(model, 'layers'):
        raise ValueError(f'expected a Keras model or a file path, got {type(model).__name__}')
    source, preprocessing = _model_tensors(model)
    shapes = core.target_shapes(canonical, num_classes, skip_head)
    ignored = preprocessing + (list(_HEAD_KEYS) if skip_head else [])
    return core.assemble(
        source,
        keras_plan(shapes, core.blocks_of(canonical), arch.get_variant(canonical).is_v2),
        shapes,
        ignored=ignored,
        what='Keras weights',
        model=canonical,
    )


def _per_channel(value: Any, channels: int = 3) -> np.ndarray:
    a = np.asarray(value, dtype=np.float64).reshape(-1)
    return np.broadcast_to(a, (channels,)) if a.size == 1 else a


def keras_input_normalization(keras_model: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) in [0, 255] units such that our model on ``(x - mean) / std`` matches the
    Keras model on raw ``x``.

    Composes the leading Rescaling and Normalization layers as read from the model (a fresh
    ``weights=None`` model divides by 255 only; the ImageNet one applies the ImageNet mean and
    std), stopping at the first other layer.
    """
    scale, shift = np.ones(3), np.zeros(3)  # the stack so far: y = scale * x + shift
    import keras

    epsilon = keras.config.epsilon()
    for layer in keras_model.layers:
        kind = type(layer).__name__
        if kind == 'InputLayer':
            continue
        if kind == 'Rescaling':
            s, o = _per_channel(layer.scale), _per_channel(layer.offset)
            scale, shift = s * scale, s * shift + o
        elif kind == 'Normalization':
            if getattr(layer, 'invert', False):
                raise ValueError(f'{layer.name} is an inverted Normalization; not an input one')
            mean = _per_channel(np.asarray(layer.mean))
            sd = np.maximum(np.sqrt(_per_channel(np.asarray(layer.variance))), epsilon)
            scale, shift = scale / sd, (shift - mean) / sd
        else:
            break
    std = 1.0 / scale
    mean = -shift * std
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
