"""The model's input contract: how [0, 255] pixels become the network's input.

Each variant names the normalisation its published weights expect (``Variant.normalization``):
B0-B7, B8, L2 and EfficientNetV2-B0..B3 use the ImageNet mean and std, Lite uses
(x - 127) / 128, EfficientNetV2-S/M/L/XL (x - 128) / 128, and the AdvProp checkpoints
x * 2 / 255 - 1. Training, evaluation, inference and export all normalise through
``normalize_images``, on the device, so the pipeline hands over uint8 images.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# (mean, std) per channel on [0, 255] input.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
ADVPROP_MEAN = (127.5, 127.5, 127.5)  # x * 2 / 255 - 1
ADVPROP_STD = (127.5, 127.5, 127.5)
LITE_MEAN = (127.0, 127.0, 127.0)  # (x - 127) / 128
LITE_STD = (128.0, 128.0, 128.0)
V2_MEAN = (128.0, 128.0, 128.0)  # (x - 128) / 128: the official EfficientNetV2-S/M/L/XL input
V2_STD = (128.0, 128.0, 128.0)

NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    'imagenet': (IMAGENET_MEAN, IMAGENET_STD),
    'advprop': (ADVPROP_MEAN, ADVPROP_STD),
    'lite': (LITE_MEAN, LITE_STD),
    'v2': (V2_MEAN, V2_STD),
}


def check_normalization(normalization: str) -> str:
    """Returns ``normalization`` if it is a known name; ValueError listing the names if not."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f'unknown normalization {normalization!r}; expected one of {sorted(NORMALIZATIONS)}'
        )
    return normalization


def normalize_images(images: jax.Array, normalization: str, dtype: Any = jnp.float32) -> jax.Array:
    """uint8 [0, 255] NHWC -> normalised ``dtype``; arithmetic in float32, then cast."""
    mean, std = NORMALIZATIONS[check_normalization(normalization)]
    x = images.astype(jnp.float32)
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.astype(dtype)
