"""A model ready for inference: the flax module, its weights, and the eval preprocessing the
weights were trained with (resolution, crop fraction, interpolation, input normalisation).
``inference.loading.load_model`` builds one from any weights this project reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficientnet import arch


@dataclasses.dataclass
class LoadedModel:
    """A model with its weights and the eval preprocessing that goes with them."""

    name: str  # variant name, e.g. 'efficientnet-b0' (custom widths: '...-w0.25-d0.25')
    model: Any  # the flax EfficientNet module (float32 compute, inference)
    variables: dict  # {'params': ..., 'batch_stats': ...} as numpy arrays
    num_classes: int
    resolution: int
    crop_fraction: float | None  # None means S / (S + 32) (the pipeline's convention)
    normalization: str  # 'imagenet' | 'advprop' | 'lite' (efficientnet.normalization)
    interpolation: str  # 'bicubic' | 'bilinear'
    source: str = ''  # what was loaded, for messages
    format: str = ''  # one of inference.loading.FORMATS
    data_config: dict | None = None  # a workdir's config.data (class names, dataset), else None
    step: int | None = None  # a workdir's checkpoint step

    def __post_init__(self) -> None:
        self._jitted: dict[str, Any] = {}
        self._device_variables = None

    def apply_fn(self) -> Any:
        """The jitted ``f(variables, images) -> logits``: normalises [0, 255] NHWC images as the
        weights expect, then applies the model with ``train=False``. Jit follows the arguments'
        shardings, so a caller may pass a batch split over devices and replicated variables."""
        if self.normalization not in self._jitted:
            from efficientnet.normalization import normalize_images

            model, normalization = self.model, self.normalization

            def apply(variables, images):
                x = normalize_images(images, normalization, jnp.float32)
                return model.apply(variables, x, train=False)

            self._jitted[normalization] = jax.jit(apply)
        return self._jitted[self.normalization]

    def logits(self, images: Any) -> np.ndarray:
        """float32 logits [N, num_classes] (pooled features when num_classes is 0) of NHWC
        images on [0, 255] (uint8 or float), normalised as the weights expect; jitted."""
        if self._device_variables is None:  # moved to the device once, not on every call
            self._device_variables = jax.device_put(self.variables)
        return np.asarray(self.apply_fn()(self._device_variables, images))

    @property
    def effective_crop_fraction(self) -> float:
        if self.crop_fraction is not None:
            return float(self.crop_fraction)
        return self.resolution / (self.resolution + arch.CROP_PADDING)
