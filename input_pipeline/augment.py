"""RandAugment and AutoAugment (policy v0) on uint8 images, in TensorFlow (docs/reference.md §6).

Every op maps uint8 [H, W, 3] → uint8 [H, W, 3] and runs eagerly or inside tf.data. The colour
ops follow PIL's ImageOps/ImageEnhance definitions (the tests compare against PIL):
  - enhancements blend with a degenerate image like `Image.blend`: float32, truncated to uint8;
  - Color's gray is PIL's fixed-point ITU-R 601 luma, Contrast's degenerate is its rounded mean
    (the official TF code used pixel-count / 256 there, a known bug we do not copy);
  - AutoContrast and Equalize build PIL's per-channel lookup tables.
Geometric ops use nearest-neighbour projective transforms with fill 128, as the official code.

Magnitudes (M in [0, 10], not clipped, so M > 10 extrapolates): rotate M/10·30°, shear M/10·0.3,
translate M/10·100 px (AutoAugment: 250), cutout half-side M/10·40 px (AutoAugment: 100),
enhance factor M/10·1.8 + 0.1, posterize int(M/10·4) bits kept, solarize threshold
int(M/10·256), solarize-add int(M/10·110). Rotate, shear and translate take a random sign;
enhance factors and the rest do not (as in the official code).
"""

from __future__ import annotations

import functools
import math

import tensorflow as tf

FILL_VALUE = 128
MAX_LEVEL = 10.0

# Ops made of many elementwise steps run as one XLA program each (fused loops instead of one
# pass over the image per TensorFlow op), several times cheaper per image on CPU. Only ops whose
# results XLA leaves unchanged: integer arithmetic, and the geometric ops' index arithmetic (the
# tests check them exactly). Not the enhancement blends: XLA contracts their multiply-add into
# an FMA, which moved truncated values by 1 on more pixels than PIL's own rounding explains.
_compiled = functools.partial(tf.function, jit_compile=True, reduce_retracing=True)


def _f32(image):
    return tf.cast(image, tf.float32)


def blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
    """PIL `Image.blend(degenerate, image, factor)`: degenerate + factor·(image − degenerate)."""
    out = _f32(degenerate) + tf.cast(factor, tf.float32) * (_f32(image) - _f32(degenerate))
    return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)  # the cast truncates, like PIL


def grayscale(image: tf.Tensor) -> tf.Tensor:
    """PIL's RGB → L: (R·19595 + G·38470 + B·7471 + 2^15) >> 16, as uint8 [H, W, 1]."""
    rgb = tf.cast(image, tf.int32)
    luma = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
    return tf.cast(tf.bitwise.right_shift(luma, 16), tf.uint8)[..., None]


# ----------------------------------------------------------------------------- colour ops


@_compiled
def _channel_keys(image: tf.Tensor) -> tf.Tensor:
    """int32 [H·W·3]: value + 256·channel, the index of a pixel into three stacked tables."""
    return tf.reshape(tf.cast(image, tf.int32) + tf.constant([0, 256, 512]), [-1])


@_compiled
def _apply_tables(image: tf.Tensor, keys: tf.Tensor, tables: tf.Tensor) -> tf.Tensor:
    """Per-channel lookup tables [3, 256] applied with one gather (compiled: TensorFlow's own
    gather costs ~10x more per pixel on CPU)."""
    out = tf.gather(tf.reshape(tf.cast(tables, tf.uint8), [-1]), keys)
    return tf.reshape(out, tf.shape(image))


@_compiled
def _channel_range(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    pixels = tf.reshape(image, [-1, 3])
    return tf.reduce_min(pixels, axis=0), tf.reduce_max(pixels, axis=0)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
    """Per channel, stretch [min, max] to [0, 255]: PIL's table of int(i·scale + offset),
    computed in float64 (Python's float) for the 256 values, applied with one gather."""
    lo, hi = (tf.cast(x, tf.float64)[:, None] for x in _channel_range(image))
    scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
    offset = tf.where(hi > lo, -lo * scale, 0.0)
    values = tf.range(256, dtype=tf.float64)[None]
    tables = tf.clip_by_value(values * scale + offset, 0.0, 255.0)
    return _apply_tables(image, _channel_keys(image), tf.cast(tables, tf.int32))  # int() truncates


def equalize(image: tf.Tensor) -> tf.Tensor:
    """PIL's histogram equalisation per channel: the three histograms as one bincount of
    value + 256·channel and the three lookup tables applied by one gather."""
    keys = _channel_keys(image)
    hist = tf.reshape(tf.math.bincount(keys, minlength=768, maxlength=768), [3, 256])
    # PIL: step = (count of all pixels − count in the highest occupied bin) // 255.
    highest = 255 - tf.argmax(tf.reverse(hist, [1]) > 0, axis=1, output_type=tf.int32)
    top = tf.gather(hist, highest, batch_dims=1)
    step = (tf.reduce_sum(hist, axis=1) - top) // 255
    safe_step = tf.maximum(step, 1)[:, None]
    lut = (safe_step // 2 + tf.cumsum(hist, axis=1, exclusive=True)) // safe_step
    identity = tf.broadcast_to(tf.range(256), [3, 256])
    lut = tf.where(step[:, None] > 0, tf.clip_by_value(lut, 0, 255), identity)
    return _apply_tables(image, keys, lut)


def invert(image: tf.Tensor) -> tf.Tensor:
    return 255 - image


@_compiled
def posterize(image: tf.Tensor, bits) -> tf.Tensor:
    """Keep the top `bits` bits of every channel. 0 bits acts as 1, as in the official code,
    whose uint8 shift by 8 TensorFlow clamps to 7 (PIL rejects 0)."""
    shift = tf.cast(tf.clip_by_value(8 - tf.cast(bits, tf.int32), 0, 7), tf.uint8)
    return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


@_compiled
def solarize(image: tf.Tensor, threshold) -> tf.Tensor:
    """Invert pixels >= threshold (threshold > 255: none). 255 − x is x XOR 255 on uint8, which
    avoids TF's slow select."""
    threshold = tf.cast(threshold, tf.int32)
    at_or_above = image >= tf.cast(tf.clip_by_value(threshold, 0, 255), tf.uint8)
    flip = tf.cast(at_or_above, tf.uint8) * tf.cast(tf.where(threshold > 255, 0, 255), tf.uint8)
    return tf.bitwise.bitwise_xor(image, flip)


@_compiled
def solarize_add(image: tf.Tensor, addition, threshold: int = 128) -> tf.Tensor:
    """Add `addition` (>= 0, saturating at 255) to pixels below threshold."""
    addition = tf.cast(tf.clip_by_value(tf.cast(addition, tf.int32), 0, 255), tf.uint8)
    below = tf.cast(image < threshold, tf.uint8)
    return image + below * tf.minimum(addition, 255 - image)  # uint8 arithmetic, cannot wrap


@_compiled
def _gray_rgb(image: tf.Tensor) -> tf.Tensor:
    return tf.tile(grayscale(image), [1, 1, 3])


@_compiled
def _gray_mean(image: tf.Tensor) -> tf.Tensor:
    """PIL's rounded mean of the gray image, int(sum / n + 0.5), in exact integer arithmetic."""
    gray = tf.cast(grayscale(image), tf.int64)
    n = tf.cast(tf.size(gray), tf.int64)
    return tf.cast((2 * tf.reduce_sum(gray) + n) // (2 * n), tf.uint8)


def color(image: tf.Tensor, factor) -> tf.Tensor:
    """Saturation: blend with the image's gray version."""
    return blend(_gray_rgb(image), image, factor)


def contrast(image: tf.Tensor, factor) -> tf.Tensor:
    """Blend with a flat image at the gray mean, rounded like PIL: int(mean + 0.5)."""
    return blend(tf.fill(tf.shape(image), _gray_mean(image)), image, factor)


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
    return blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
    """Blend with PIL's SMOOTH filter (3×3, centre 5, /13); the 1-pixel border is kept as is."""
    v = _f32(image)
    rows = v[:-2] + v[1:-1] + v[2:]
    box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
    # Integer sums / 13 are never exactly halfway, so this rounding is PIL's.
    smooth = tf.cast(tf.round((box + 4.0 * v[1:-1, 1:-1]) / 13.0), tf.uint8)
    middle = tf.concat([image[1:-1, :1], smooth, image[1:-1, -1:]], axis=1)
    degenerate = tf.concat([image[:1], middle, image[-1:]], axis=0)
    return blend(degenerate, image, factor)


# ----------------------------------------------------------------------------- geometric ops


def transform(image: tf.Tensor, matrix) -> tf.Tensor:
    """Output pixel (x, y) takes input pixel round(A·(x, y, 1)); outside → 128.

    `matrix` is [a0, a1, a2, b0, b1, b2]: x_in = a0·x + a1·y + a2, y_in = b0·x + b1·y + b2.
    Nearest neighbour (ties round up), as the official code's projective transform; done as
    a row gather, several times faster on CPU than ImageProjectiveTransformV3.
    """
    a0, a1, a2, b0, b1, b2 = (tf.cast(m, tf.float32) for m in matrix)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    ys, xs = tf.meshgrid(tf.range(h), tf.range(w), indexing='ij')
    xs, ys = tf.reshape(_f32(xs), [-1]), tf.reshape(_f32(ys), [-1])
    xi = tf.cast(tf.floor(a0 * xs + a1 * ys + a2 + 0.5), tf.int32)
    yi = tf.cast(tf.floor(b0 * xs + b1 * ys + b2 + 0.5), tf.int32)
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    index = tf.where(inside, yi * w + xi, h * w)  # h·w: the fill row appended below
    fill = tf.fill([1, 3], tf.constant(FILL_VALUE, tf.uint8))
    table = tf.concat([tf.reshape(image, [-1, 3]), fill], axis=0)
    return tf.reshape(tf.gather(table, index), tf.shape(image))


@_compiled
def rotate(image: tf.Tensor, degrees) -> tf.Tensor:
    """Rotate about the image centre ((w − 1)/2, (h − 1)/2) by `degrees` (counter-clockwise)."""
    theta = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    cos, sin = tf.cos(theta), tf.sin(theta)
    cx = (tf.cast(tf.shape(image)[1], tf.float32) - 1.0) / 2.0
    cy = (tf.cast(tf.shape(image)[0], tf.float32) - 1.0) / 2.0
    # input = R(θ)·(output − c) + c: a counter-clockwise turn of the picture on screen.
    return transform(
        image, [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy]
    )


@_compiled
def shear_x(image: tf.Tensor, level) -> tf.Tensor:
    return transform(image, [1.0, level, 0.0, 0.0, 1.0, 0.0])


@_compiled
def shear_y(image: tf.Tensor, level) -> tf.Tensor:
    return transform(image, [1.0, 0.0, 0.0, level, 1.0, 0.0])


def _shift(image: tf.Tensor, pixels, axis: int) -> tf.Tensor:
    """Content moved by round(pixels) along `axis` (1: x, 0: y), fill 128: the same pixels as a
    nearest-neighbour translation transform, with a slice and a pad instead of a resampler."""
    size = tf.shape(image)[axis]
    shift = tf.clip_by_value(tf.cast(tf.round(tf.cast(pixels, tf.float32)), tf.int32), -size, size)
    kept = size - tf.abs(shift)
    begin = [0, 0, 0]
    begin[axis] = tf.maximum(-shift, 0)
    length = [-1, -1, -1]
    length[axis] = kept
    paddings = [[0, 0], [0, 0], [0, 0]]
    paddings[axis] = [tf.maximum(shift, 0), tf.maximum(-shift, 0)]
    moved = tf.pad(tf.slice(image, begin, length), paddings, constant_values=FILL_VALUE)
    return tf.ensure_shape(moved, image.shape)


def translate_x(image: tf.Tensor, pixels) -> tf.Tensor:
    """Move the content right by `pixels`."""
    return _shift(image, pixels, 1)


def translate_y(image: tf.Tensor, pixels) -> tf.Tensor:
    """Move the content down by `pixels`."""
    return _shift(image, pixels, 0)


def cutout(image: tf.Tensor, half_size, seed) -> tf.Tensor:
    """Fill a (2·half_size)² square at a uniform random centre (clipped to the image) with 128."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    cy = tf.random.stateless_uniform([], seed, 0, h, tf.int32)
    cx = tf.random.stateless_uniform([], seed + 1, 0, w, tf.int32)
    y0, y1 = tf.clip_by_value(cy - half_size, 0, h), tf.clip_by_value(cy + half_size, 0, h)
    x0, x1 = tf.clip_by_value(cx - half_size, 0, w), tf.clip_by_value(cx + half_size, 0, w)
    band = image[y0:y1]
    patch = tf.fill([y1 - y0, x1 - x0, 3], tf.constant(FILL_VALUE, tf.uint8))
    band = tf.concat([band[:, :x0], patch, band[:, x1:]], axis=1)
    return tf.concat([image[:y0], band, image[y1:]], axis=0)


# ----------------------------------------------------------------------------- policies


def _signed(value, seed):
    """value or −value with probability 1/2."""
    flip = tf.random.stateless_uniform([], seed) < 0.5
    return tf.where(flip, -value, value)


def level_to_arg(name: str, level, translate_const: float, cutout_const: float):
    """The op's argument at magnitude `level` (a number or a scalar tensor), unsigned: the sign
    is drawn at apply time. Computed in float64 like Python, then truncated like `int()`."""
    m = tf.cast(level, tf.float64) / MAX_LEVEL
    as_int = lambda x: tf.cast(x, tf.int32)
    as_f32 = lambda x: tf.cast(x, tf.float32)
    return {
        'AutoContrast': lambda: None,
        'Equalize': lambda: None,
        'Invert': lambda: None,
        'Rotate': lambda: as_f32(m * 30.0),
        'Posterize': lambda: as_int(m * 4),
        'Solarize': lambda: as_int(m * 256),
        'SolarizeAdd': lambda: as_int(m * 110),
        'Color': lambda: as_f32(m * 1.8 + 0.1),
        'Contrast': lambda: as_f32(m * 1.8 + 0.1),
        'Brightness': lambda: as_f32(m * 1.8 + 0.1),
        'Sharpness': lambda: as_f32(m * 1.8 + 0.1),
        'ShearX': lambda: as_f32(m * 0.3),
        'ShearY': lambda: as_f32(m * 0.3),
        'TranslateX': lambda: as_f32(m * translate_const),
        'TranslateY': lambda: as_f32(m * translate_const),
        'Cutout': lambda: as_int(m * cutout_const),
    }[name]()


def apply_op(image, name: str, level, seed, translate_const=100.0, cutout_const=40.0):
    """Applies op `name` at magnitude `level`; `seed` (int [2]) draws its sign or position."""
    arg = level_to_arg(name, level, translate_const, cutout_const)
    if name in ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'):
        arg = _signed(arg, seed)
    fn = {
        'AutoContrast': lambda x: autocontrast(x),
        'Equalize': lambda x: equalize(x),
        'Invert': lambda x: invert(x),
        'Rotate': lambda x: rotate(x, arg),
        'Posterize': lambda x: posterize(x, arg),
        'Solarize': lambda x: solarize(x, arg),
        'SolarizeAdd': lambda x: solarize_add(x, arg),
        'Color': lambda x: color(x, arg),
        'Contrast': lambda x: contrast(x, arg),
        'Brightness': lambda x: brightness(x, arg),
        'Sharpness': lambda x: sharpness(x, arg),
        'ShearX': lambda x: shear_x(x, arg),
        'ShearY': lambda x: shear_y(x, arg),
        'TranslateX': lambda x: translate_x(x, arg),
        'TranslateY': lambda x: translate_y(x, arg),
        'Cutout': lambda x: cutout(x, arg, seed),
    }[name]
    return tf.ensure_shape(fn(image), image.shape)


RANDAUGMENT_OPS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'Color',
    'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY',
    'Cutout', 'SolarizeAdd',
)  # fmt: skip

# AutoAugment ImageNet policy v0: 25 sub-policies of (op, probability, magnitude).
AUTOAUGMENT_POLICY_V0 = (
    (('Equalize', 0.8, 1), ('ShearY', 0.8, 4)),
    (('Color', 0.4, 9), ('Equalize', 0.6, 3)),
    (('Color', 0.4, 1), ('Rotate', 0.6, 8)),
    (('Solarize', 0.8, 3), ('Equalize', 0.4, 7)),
    (('Solarize', 0.4, 2), ('Solarize', 0.6, 2)),
    (('Color', 0.2, 0), ('Equalize', 0.8, 8)),
    (('Equalize', 0.4, 8), ('SolarizeAdd', 0.8, 3)),
    (('ShearX', 0.2, 9), ('Rotate', 0.6, 8)),
    (('Color', 0.6, 1), ('Equalize', 1.0, 2)),
    (('Invert', 0.4, 9), ('Rotate', 0.6, 0)),
    (('Equalize', 1.0, 9), ('ShearY', 0.6, 3)),
    (('Color', 0.4, 7), ('Equalize', 0.6, 0)),
    (('Posterize', 0.4, 6), ('AutoContrast', 0.4, 7)),
    (('Solarize', 0.6, 8), ('Color', 0.6, 9)),
    (('Solarize', 0.2, 4), ('Rotate', 0.8, 9)),
    (('Rotate', 1.0, 7), ('TranslateY', 0.8, 9)),
    (('ShearX', 0.0, 0), ('Solarize', 0.8, 4)),
    (('ShearY', 0.8, 0), ('Color', 0.6, 4)),
    (('Color', 1.0, 0), ('Rotate', 0.6, 2)),
    (('Equalize', 0.8, 4), ('Equalize', 0.0, 8)),
    (('Equalize', 1.0, 4), ('AutoContrast', 0.6, 2)),
    (('ShearY', 0.4, 7), ('SolarizeAdd', 0.6, 7)),
    (('Posterize', 0.8, 2), ('Solarize', 0.6, 10)),
    (('Solarize', 0.6, 8), ('Equalize', 0.6, 1)),
    (('Color', 0.8, 6), ('Rotate', 0.4, 5)),
)


def apply_op_by_index(image, index, level, seed, translate_const=100.0, cutout_const=40.0):
    """`apply_op` with the op given as a tensor index into RANDAUGMENT_OPS (one switch_case)."""
    branches = [
        (lambda name=name: apply_op(image, name, level, seed, translate_const, cutout_const))
        for name in RANDAUGMENT_OPS
    ]
    return tf.switch_case(index, branches)


def _apply_layers(image, num_layers, layer_fn):
    """image ← layer_fn(i, image) for i < num_layers, as a while_loop so each op is traced once."""
    image = tf.ensure_shape(tf.convert_to_tensor(image, tf.uint8), [None, None, 3])
    _, image = tf.while_loop(
        lambda i, x: i < num_layers,
        lambda i, x: (i + 1, tf.ensure_shape(layer_fn(i, x), image.shape)),
        (tf.constant(0), image),
    )
    return image


def randaugment(image: tf.Tensor, seed, num_layers: int = 2, magnitude: float = 9.0):
    """N layers, each applies one of the 16 ops chosen uniformly, at magnitude M."""
    layer_seeds = tf.random.experimental.stateless_split(seed, max(num_layers, 1))

    def layer(i, x):
        choice_seed, op_seed = tf.unstack(tf.random.experimental.stateless_split(layer_seeds[i], 2))
        choice = tf.random.stateless_uniform([], choice_seed, 0, len(RANDAUGMENT_OPS), tf.int32)
        return apply_op_by_index(x, choice, magnitude, op_seed)

    return _apply_layers(image, num_layers, layer)


def autoaugment(image: tf.Tensor, seed, policy=AUTOAUGMENT_POLICY_V0):
    """Picks a sub-policy uniformly; applies each of its ops with that op's probability.

    Translate and cutout use AutoAugment's constants (250 px, 100 px) as the official code.
    """
    ops = tf.constant([[RANDAUGMENT_OPS.index(op[0]) for op in sub] for sub in policy])
    probs = tf.constant([[op[1] for op in sub] for sub in policy], tf.float32)
    levels = tf.constant([[op[2] for op in sub] for sub in policy], tf.float32)
    choice_seed, ops_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    choice = tf.random.stateless_uniform([], choice_seed, 0, len(policy), tf.int32)
    op_seeds = tf.random.experimental.stateless_split(ops_seed, ops.shape[1])

    def layer(i, x):
        apply_seed, op_seed = tf.unstack(tf.random.experimental.stateless_split(op_seeds[i], 2))
        return tf.cond(
            tf.random.stateless_uniform([], apply_seed) < probs[choice, i],
            lambda: apply_op_by_index(x, ops[choice, i], levels[choice, i], op_seed, 250.0, 100.0),
            lambda: x,
        )

    return _apply_layers(image, ops.shape[1], layer)
