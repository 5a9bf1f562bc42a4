"""Crops, decoding and resize (docs/reference.md §5), checked against the formula and
TensorFlow's own ops."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from input_pipeline import preprocessing
from tests import input_fixtures as fx


@pytest.mark.parametrize(
    'h,w,res,fraction',
    [(375, 500, 224, None), (500, 375, 224, None), (333, 500, 380, None), (64, 48, 32, None),
     (375, 500, 224, 0.875), (100, 101, 224, 1.0), (28, 28, 224, None)],
)  # fmt: skip
def test_eval_crop_window_matches_recipe(h, w, res, fraction):
    window = preprocessing.eval_crop_window(tf.constant([h, w, 3]), res, fraction).numpy()
    frac = res / (res + 32) if fraction is None else fraction
    side = int(frac * min(h, w))
    assert list(window) == [((h - side) + 1) // 2, ((w - side) + 1) // 2, side, side]


def test_eval_preprocessing_equals_crop_then_resize_by_hand():
    """JPEG decode-and-crop path == full decode, numpy crop by the formula, tf.image.resize."""
    image = fx.color_image(3, 75, 100) + np.arange(100, dtype=np.uint8)[None, :, None]
    jpeg = fx.encode(image, quality=95)
    got = preprocessing.preprocess_eval(tf.constant(jpeg), 32).numpy()
    decoded = tf.io.decode_jpeg(jpeg, channels=3).numpy()
    side = int(32 / 64 * 75)
    oy, ox = (75 - side + 1) // 2, (100 - side + 1) // 2
    crop = decoded[oy : oy + side, ox : ox + side]
    want = tf.image.resize(crop, [32, 32], method='bicubic').numpy()
    want = np.round(np.clip(want, 0, 255)).astype(np.uint8)
    assert got.dtype == np.uint8 and got.shape == (32, 32, 3)
    # From the decoded array the pipeline is exactly crop-by-formula + TF's bicubic resize.
    from_array = preprocessing.preprocess_eval(tf.constant(decoded), 32).numpy()
    np.testing.assert_array_equal(from_array, want)
    # decode_and_crop_jpeg upsamples chroma without the pixels outside the window, so the
    # crop's border differs by a few levels from a full decode.
    diff = np.abs(got.astype(int) - want)
    assert diff.max() <= 3 and diff.mean() < 0.1


def test_train_crops_within_area_and_aspect_bounds():
    for h, w in [(375, 500), (500, 375), (64, 48), (224, 224), (30, 200)]:
        shape = tf.constant([h, w, 3])
        centre = list(preprocessing.eval_crop_window(shape, 224).numpy())
        for s in range(150):
            oy, ox, ch, cw = preprocessing.sample_crop_window(
                shape, tf.constant([s, 1]), 224
            ).numpy()
            assert 0 <= oy and oy + ch <= h and 0 <= ox and ox + cw <= w
            if [oy, ox, ch, cw] == centre:
                continue  # the fallback after 10 failed attempts
            area = ch * cw / (h * w)
            # The op rounds the sampled height and width to integers: allow that slack.
            assert 0.08 - 2 / min(h, w) <= area <= 1.0
            assert 3 / 4 - 1 / min(ch, cw) <= cw / ch <= 4 / 3 + 1 / min(ch, cw)


def test_train_preprocessing_shapes_and_determinism():
    jpeg = tf.constant(fx.encode(fx.color_image(1, 60, 90), quality=90))
    seeds = [tf.constant([s, 0], tf.int64) for s in range(6)]
    outs = [preprocessing.preprocess_train(jpeg, s, 40).numpy() for s in seeds]
    assert all(o.shape == (40, 40, 3) and o.dtype == np.uint8 for o in outs)
    assert len({o.tobytes() for o in outs}) == 6
    np.testing.assert_array_equal(preprocessing.preprocess_train(jpeg, seeds[0], 40), outs[0])
    plain = preprocessing.preprocess_train(jpeg, seeds[0], 40, random_crop=False).numpy()
    assert plain.shape == (40, 40, 3)


def test_flip_is_horizontal():
    image = np.zeros([8, 8, 3], np.uint8)
    image[:, :4] = 200
    data = tf.constant(image)
    flipped = {
        preprocessing.preprocess_train(data, tf.constant([s, 2]), 8, random_crop=False).numpy()[
            0, 0, 0
        ]
        for s in range(10)
    }
    assert flipped == {0, 200}


def _shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``image`` moved down dy and right dx pixels, zeros where nothing moved in."""
    h, w = image.shape[:2]
    out = np.zeros_like(image)
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_translate_shifts_by_at_most_its_pixels_with_zero_borders():
    """Each output is the untranslated image shifted by one offset in [-3, 3]² (numpy's shift
    as the oracle), every offset on each axis occurs, and crops and flips stay as they were."""
    image = tf.constant(fx.color_image(4, 24, 24) + np.arange(24, dtype=np.uint8)[:, None, None])
    offsets = set()
    for s in range(80):
        seed = tf.constant([s, 5])
        base = preprocessing.preprocess_train(image, seed, 24, random_crop=False).numpy()
        got = preprocessing.preprocess_train(
            image, seed, 24, random_crop=False, random_translate=3
        ).numpy()
        assert got.shape == (24, 24, 3) and got.dtype == np.uint8
        found = [
            (dy, dx)
            for dy in range(-3, 4)
            for dx in range(-3, 4)
            if np.array_equal(got, _shifted(base, dy, dx))
        ]
        assert len(found) == 1, (s, found)
        offsets.add(found[0])
    assert {dy for dy, _ in offsets} == set(range(-3, 4)) == {dx for _, dx in offsets}
    assert (0, 0) in offsets and len(offsets) > 30


@pytest.mark.parametrize('kind', ['gray_jpeg', 'cmyk_jpeg', 'png', 'gray_png', 'rgba_png', 'bmp'])
def test_formats_decode_to_three_channels(kind):
    rgb = fx.color_image(7, 30, 40)
    pil = Image.fromarray(rgb)
    data = {
        'gray_jpeg': lambda: fx.encode(pil.convert('L'), quality=95),
        'cmyk_jpeg': lambda: fx.encode(pil.convert('CMYK'), quality=95),
        'png': lambda: fx.encode(pil, 'PNG'),
        'gray_png': lambda: fx.encode(pil.convert('L'), 'PNG'),
        'rgba_png': lambda: fx.encode(pil.convert('RGBA'), 'PNG'),
        'bmp': lambda: fx.encode(pil, 'BMP'),
    }[kind]()
    for out in (
        preprocessing.preprocess_eval(tf.constant(data), 16),
        preprocessing.preprocess_train(tf.constant(data), tf.constant([1, 2]), 16),
    ):
        assert out.shape == (16, 16, 3) and out.dtype == tf.uint8
    mean = preprocessing.preprocess_eval(tf.constant(data), 16).numpy().reshape(-1, 3).mean(0)
    if 'gray' in kind:
        assert np.ptp(mean) < 1.0
    else:  # colours survive (CMYK is converted back by the decoder)
        np.testing.assert_allclose(mean, fx.example_color(7), atol=6)


def test_decoded_arrays_and_grayscale_arrays():
    gray = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28, 1)
    out = preprocessing.preprocess_eval(tf.constant(gray), 28, crop_fraction=1.0).numpy()
    assert out.shape == (28, 28, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    np.testing.assert_array_equal(out[..., 0], gray[..., 0])  # same size: resize is identity


def test_bilinear_and_bad_interpolation():
    data = tf.constant(fx.encode(fx.color_image(2, 50, 50)))
    assert preprocessing.preprocess_eval(data, 20, interpolation='bilinear').shape == (20, 20, 3)
    with pytest.raises(ValueError, match='interpolation'):
        preprocessing.preprocess_eval(data, 20, interpolation='lanczos7')
