"""TF SavedModel through jax2tf: the JAX model itself, serialised as StableHLO.

The 'serving_default' signature takes uint8 images [N, S, S, 3] (N free; resizing and
cropping are the caller's job), normalises them with the weights' mean/std inside, and returns
float32 'logits' and 'probabilities'. The weights are tf.Variables of the SavedModel (not
constants baked into the module), so large variants stay below protobuf's 2 GB limit. jax 0.10's
jax2tf always serialises natively (an XlaCallModule op), so this SavedModel runs under TF
(Python, C++, TF Serving) on the lowered platforms, but is no input for TFLite or tf2onnx.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficientnet import paths
from inference.export.network import check_exportable, resolve_normalization

DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')
INFO_FILE = os.path.join('assets.extra', 'export.json')


def export_savedmodel(
    model: Any,
    variables: Any,
    path: str | os.PathLike,
    *,
    resolution: int | None = None,
    normalization: str | tuple | None = None,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> str:
    """Writes the SavedModel directory ``path`` (local or gs://; replaced if present); returns
    it.

    ``platforms`` are those the serialised computation is lowered for (one module per
    platform, chosen at run time). The facts a client needs (variant, resolution, mean/std,
    classes) go to ``assets.extra/export.json`` beside it.
    """
    import tensorflow as tf
    from jax.experimental import jax2tf

    resolution = model.variant.resolution if resolution is None else resolution
    check_exportable(model, variables, resolution)
    mean, std = resolve_normalization(normalization, model.variant)
    # XLA's grouped convolution: one op per depthwise conv, fast on every platform (the
    # unrolled form only pays off on XLA:CPU during training).
    module = model.clone(depthwise_impl='xla')
    mean_a, std_a = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def serve(variables, images):
        x = (images.astype(jnp.float32) - mean_a) / std_a
        logits = module.apply(variables, x, train=False)
        return {'logits': logits, 'probabilities': jax.nn.softmax(logits, axis=-1)}

    converted = jax2tf.convert(
        serve,
        with_gradient=False,
        polymorphic_shapes=[None, f'(b, {resolution}, {resolution}, 3)'],
        native_serialization_platforms=tuple(platforms),
    )
    holder = tf.Module()
    holder.weights = jax.tree.map(
        lambda a: tf.Variable(np.asarray(a, np.float32), trainable=False), dict(variables)
    )

    @tf.function(
        input_signature=[tf.TensorSpec([None, resolution, resolution, 3], tf.uint8, name='images')],
        autograph=False,
    )
    def serving_default(images):
        return converted(holder.weights, images)

    holder.serving_default = serving_default
    path = os.fspath(path)
    tf.saved_model.save(holder, path, signatures={'serving_default': serving_default})
    info = {
        'model': model.variant.name,
        'num_classes': int(model.num_classes),
        'resolution': int(resolution),
        'input': 'uint8 [N, S, S, 3], RGB, resized and cropped by the caller',
        'mean': list(mean),
        'std': list(std),
        'padding': model.padding,
        'outputs': ['logits', 'probabilities'],
        'platforms': list(platforms),
    }
    paths.write_atomic(paths.as_path(path, INFO_FILE), json.dumps(info, indent=2))
    return path


def run_savedmodel(
    path: str | os.PathLike, images: np.ndarray, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """Loads the SavedModel with ``tf.saved_model.load`` and runs its serving signature."""
    import tensorflow as tf

    loaded = tf.saved_model.load(os.fspath(path))
    serve = loaded.signatures['serving_default']
    result: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch_size):
        out = serve(images=tf.constant(images[start : start + batch_size], tf.uint8))
        for k, v in out.items():
            result.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in result.items()}
