"""Decoding, crops, resize and flip (docs/reference.md §5). Everything is uint8 in, uint8 out,
in TensorFlow.

An image arrives either as encoded bytes (JPEG, PNG, BMP, GIF) or as a uint8 [H, W, C] tensor.
JPEG bytes are decoded only inside the crop window (`decode_and_crop_jpeg`), which is what makes
the Inception crop cheap; other formats are decoded whole and sliced. Grayscale becomes 3
channels, CMYK JPEGs are converted by the decoder. Randomness is stateless: every random choice
takes an explicit `seed` (int [2]), so the pipeline's output is a function of its seeds.
"""

from __future__ import annotations

import tensorflow as tf

CROP_PADDING = 32
MIN_OBJECT_COVERED = 0.1
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
AREA_RANGE = (0.08, 1.0)
MAX_ATTEMPTS = 10


def is_jpeg(data: tf.Tensor) -> tf.Tensor:
    """True for bytes that start with the JPEG SOI marker and a segment marker."""
    return tf.equal(tf.strings.substr(data, 0, 3), b'\xff\xd8\xff')


def to_rgb(image: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W, 1|3|4] → [H, W, 3] (gray is repeated, alpha is dropped)."""
    image = tf.convert_to_tensor(image)
    if image.shape.rank == 2:
        image = image[..., None]
    channels = image.shape[-1]
    if channels == 1:
        image = tf.tile(image, [1, 1, 3])
    elif channels == 4:
        image = image[..., :3]
    elif channels is None:
        image = tf.cond(
            tf.equal(tf.shape(image)[-1], 1),
            lambda: tf.tile(image, [1, 1, 3]),
            lambda: image[..., :3],
        )
    return tf.ensure_shape(tf.cast(image, tf.uint8), [None, None, 3])


def decode(data: tf.Tensor) -> tf.Tensor:
    """Whole image as uint8 [H, W, 3], from bytes or from a decoded array."""
    if data.dtype == tf.string:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        return tf.ensure_shape(image, [None, None, 3])
    return to_rgb(data)


def decode_cropped(data: tf.Tensor, window_fn) -> tf.Tensor:
    """Decodes only `window_fn(image_shape) = [offset_y, offset_x, height, width]`."""
    if data.dtype != tf.string:
        image = to_rgb(data)
        oy, ox, h, w = tf.unstack(window_fn(tf.shape(image)))
        return image[oy : oy + h, ox : ox + w]

    def jpeg():
        window = window_fn(tf.io.extract_jpeg_shape(data))
        return tf.io.decode_and_crop_jpeg(data, window, channels=3)

    def other():
        image = decode(data)
        oy, ox, h, w = tf.unstack(window_fn(tf.shape(image)))
        return image[oy : oy + h, ox : ox + w]

    image = tf.cond(is_jpeg(data), jpeg, other)
    return tf.ensure_shape(image, [None, None, 3])


def image_shape(data: tf.Tensor) -> tf.Tensor:
    """[H, W, C] of encoded bytes (JPEG without decoding) or of an array."""
    if data.dtype != tf.string:
        return tf.shape(data)
    return tf.cond(
        is_jpeg(data), lambda: tf.io.extract_jpeg_shape(data), lambda: tf.shape(decode(data))
    )


def eval_crop_window(shape: tf.Tensor, resolution: int, crop_fraction: float | None = None):
    """Centre square of side int(S / (S + 32) × min(h, w)), offset ((h − side) + 1) // 2."""
    h, w = shape[0], shape[1]
    if crop_fraction is None:
        crop_fraction = resolution / (resolution + CROP_PADDING)
    side = tf.cast(crop_fraction * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
    side = tf.maximum(side, 1)
    return tf.stack([((h - side) + 1) // 2, ((w - side) + 1) // 2, side, side])


def sample_crop_window(shape: tf.Tensor, seed: tf.Tensor, resolution: int, crop_fraction=None):
    """Inception crop: a box of area [0.08, 1] and aspect [3/4, 4/3], 10 attempts.

    When sampling fails the op returns the whole image; like the official code, a box equal to
    the whole image then falls back to the eval centre crop.
    """
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        seed=seed,
        min_object_covered=MIN_OBJECT_COVERED,
        aspect_ratio_range=ASPECT_RATIO_RANGE,
        area_range=AREA_RANGE,
        max_attempts=MAX_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    whole = tf.logical_and(tf.equal(size[0], shape[0]), tf.equal(size[1], shape[1]))
    return tf.cond(
        whole, lambda: eval_crop_window(shape, resolution, crop_fraction), lambda: window
    )


def resize(image: tf.Tensor, resolution: int, method: str = 'bicubic') -> tf.Tensor:
    """Resize to S×S (no antialiasing, like the official code), rounded back to uint8."""
    if method not in ('bicubic', 'bilinear'):
        raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {method!r}")
    out = tf.image.resize(image, [resolution, resolution], method=method)
    out = tf.cast(tf.round(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)
    return tf.ensure_shape(out, [resolution, resolution, 3])


def preprocess_train(
    data: tf.Tensor,
    seed: tf.Tensor,
    resolution: int,
    *,
    random_crop: bool = True,
    random_flip: bool = True,
    interpolation: str = 'bicubic',
    crop_fraction: float | None = None,
    random_translate: int = 0,
) -> tf.Tensor:
    """Crop (decode-and-crop for JPEG), resize, translate, flip → uint8 [S, S, 3]."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if random_crop:
        image = decode_cropped(
            data, lambda s: sample_crop_window(s, crop_seed, resolution, crop_fraction)
        )
    else:
        image = decode(data)
    image = resize(image, resolution, interpolation)
    if random_translate:
        # A stream of its own, folded from the flip's: turning it on changes no crop or flip.
        shift_seed = tf.random.experimental.stateless_fold_in(flip_seed, 1)
        image = translate(image, random_translate, shift_seed)
    if random_flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return image


def translate(image: tf.Tensor, pixels: int, seed: tf.Tensor) -> tf.Tensor:
    """Shift [S, S, C] by a uniform random offset in [-pixels, pixels] along each axis, filling
    the uncovered border with zeros (pad by `pixels`, crop S×S back: the small-image translation
    of the CIFAR recipes)."""
    side = int(image.shape[0])
    padded = tf.pad(image, [[pixels, pixels], [pixels, pixels], [0, 0]])
    return tf.image.stateless_random_crop(padded, [side, side, image.shape[-1]], seed)


def preprocess_eval(
    data: tf.Tensor, resolution: int, *, interpolation: str = 'bicubic', crop_fraction=None
) -> tf.Tensor:
    """Centre crop with padding 32 (or `crop_fraction`), resize → uint8 [S, S, 3]."""
    image = decode_cropped(data, lambda s: eval_crop_window(s, resolution, crop_fraction))
    return resize(image, resolution, interpolation)
