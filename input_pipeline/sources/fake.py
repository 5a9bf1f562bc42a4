"""The synthetic dataset (`name='fake'`) for tests and smoke runs: learnable and a pure function
of the example index.

Indices run over 'train' then 'validation', so the two splits hold different examples. Example i
has a label drawn from the stateless seed (FAKE_SEED, i) and an image that is its class's colour
plus noise in [-40, 40] per pixel and channel: a model can learn the colours, so a smoke run's
accuracy moves. Class colours have channels in [40, 216), so the noise never clips.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from input_pipeline.sources.base import IndexedSource

FAKE_SEED = 20190528
NOISE = 40


def class_colours(num_classes: int) -> np.ndarray:
    """int32 [num_classes, 3]: one fixed colour per class."""
    rng = np.random.default_rng(12345)
    return rng.integers(NOISE, 256 - NOISE, (num_classes, 3)).astype(np.int32)


class FakeSource(IndexedSource):
    """`num_train` + `num_eval` examples of `image_size`² uint8 images in `num_classes`."""

    def __init__(self, num_train: int, num_eval: int, num_classes: int, image_size: int):
        self.name = 'fake'
        self.num_classes = num_classes
        self.image_size = image_size
        self.split_sizes = {'train': num_train, 'validation': num_eval}
        self.aliases = {'test': 'validation'}

    def _records(self):
        size, num_classes = self.image_size, self.num_classes
        colours = tf.constant(class_colours(num_classes))

        def load(index: tf.Tensor) -> dict:
            label = tf.random.stateless_uniform(
                [], tf.stack([tf.constant(FAKE_SEED, tf.int64), index]), 0, num_classes, tf.int32
            )
            noise = tf.random.stateless_uniform(
                [size, size, 3], tf.stack([tf.constant(FAKE_SEED + 1, tf.int64), index]),
                -NOISE, NOISE + 1, tf.int32,
            )  # fmt: skip
            image = tf.gather(colours, label)[None, None, :] + noise
            return {'image': tf.cast(image, tf.uint8), 'label': label}

        total = sum(self.split_sizes.values())
        return tf.range(total, dtype=tf.int64), load  # the record is the example's index
