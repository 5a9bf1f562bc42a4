"""The model's input contract (efficientnet/normalization.py) against Keras's own preprocessing:
ImageNet mean/std is Keras's 'torch' mode, AdvProp's x * 2 / 255 - 1 its 'tf' mode."""

import jax.numpy as jnp
import numpy as np
import pytest
from tensorflow.keras.applications import imagenet_utils

import efficientnet
from efficientnet import normalization


@pytest.fixture(scope='module')
def pixels():
    return np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize('name,keras_mode', [('imagenet', 'torch'), ('advprop', 'tf')])
def test_matches_keras_preprocess_input(pixels, name, keras_mode):
    want = imagenet_utils.preprocess_input(pixels.astype(np.float32), mode=keras_mode)
    got = normalization.normalize_images(jnp.asarray(pixels), name)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_lite_is_minus_127_over_128(pixels):
    got = normalization.normalize_images(jnp.asarray(pixels), 'lite')
    np.testing.assert_array_equal(np.asarray(got), (pixels.astype(np.float32) - 127) / 128)


def test_compute_dtype_is_a_cast_of_the_float32_result(pixels):
    got = normalization.normalize_images(jnp.asarray(pixels), 'imagenet', jnp.bfloat16)
    want = normalization.normalize_images(jnp.asarray(pixels), 'imagenet').astype(jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_each_variant_names_its_own():
    for name in efficientnet.list_models():
        info = efficientnet.model_info(name)
        if 'lite' in name:
            want = 'lite'
        elif name in (
            'efficientnetv2-s',
            'efficientnetv2-m',
            'efficientnetv2-l',
            'efficientnetv2-xl',
        ):
            want = 'v2'  # (x - 128) / 128; V2-B0..B3 keep V1's ImageNet mean/std
        else:
            want = 'imagenet'
        assert info['normalization'] == want, name
        assert (info['mean'], info['std']) == normalization.NORMALIZATIONS[want]


def test_unknown_name_is_a_clear_error(pixels):
    with pytest.raises(ValueError, match=r"unknown normalization 'caffe'.*advprop"):
        normalization.normalize_images(jnp.asarray(pixels), 'caffe')
