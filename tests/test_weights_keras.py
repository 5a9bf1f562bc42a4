"""from_keras and keras_input_normalization against keras.applications EfficientNetB0-B7.

The oracle is the Keras model itself (TensorFlow backend, see conftest.py): random weights,
BatchNorm statistics and biases randomised so that a swapped mean/var, gamma/beta or a dropped
bias shows in the logits; Keras gets raw [0, 255] images and our model the normalised ones.
"""

import functools

import jax
import keras
import numpy as np
import pytest

from efficientnet import create_model
from efficientnet.weights import (
    WeightsMismatchError,
    from_keras,
    keras_input_normalization,
)

# Reduced resolutions, odd ones included: Keras pads stride-2 layers by the static input size,
# and odd sizes are where TF SAME differs from symmetric padding.
RESOLUTIONS = {'b0': 64, 'b1': 65, 'b2': 72, 'b3': 67, 'b4': 64, 'b5': 71, 'b6': 64, 'b7': 64}
TOLERANCE = 1e-4  # max |ours - keras| / max |keras|


def keras_oracle(variant: str, resolution: int, seed: int, **kwargs) -> keras.Model:
    # Seeded: Keras draws the conv kernels itself. Unseeded, an occasional draw of the deep
    # variants amplifies float32 rounding through ~55 blocks (B7 logits of 170+ instead of ~2,
    # relative differences up to 0.6 in one CI run); every seeded draw is the same network.
    keras.utils.set_random_seed(seed)
    cls = getattr(keras.applications, 'EfficientNet' + variant.upper())
    model = cls(
        weights=None, input_shape=(resolution, resolution, 3), classifier_activation=None, **kwargs
    )
    randomise(model, seed)
    return model


def randomise(model: keras.Model, seed: int) -> None:
    """Non-trivial BatchNorm statistics and biases (fresh ones are 0 / 1)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, c),
                    rng.normal(0.0, 0.2, c),
                    rng.normal(0.0, 0.2, c),
                    rng.uniform(0.5, 2.0, c),
                ]
            )
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)) and layer.use_bias:
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0.0, 0.1, bias.shape)])


def relative_difference(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def our_logits(name: str, variables, images: np.ndarray, keras_model, **kwargs) -> np.ndarray:
    mean, std = keras_input_normalization(keras_model)
    x = (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.asarray(jitted_apply(name, **kwargs)(variables, x))


@functools.lru_cache
def jitted_apply(name: str, num_classes: int = 1000, depthwise_impl: str = 'xla'):
    # XLA's depthwise compiles faster than the unrolled CPU default; the two agree
    # (tests/test_model.py), and the B0-at-224 test runs the default.
    model = create_model(name, num_classes=num_classes, depthwise_impl=depthwise_impl)
    return jax.jit(model.apply)


def random_images(resolution: int, seed: int, batch: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 255.0, (batch, resolution, resolution, 3)).astype(np.float32)


@pytest.mark.parametrize('variant', list(RESOLUTIONS))
def test_logits_match_keras_at_reduced_resolution(variant):
    res = RESOLUTIONS[variant]
    oracle = keras_oracle(variant, res, seed=int(variant[1]))
    images = random_images(res, seed=10 + int(variant[1]))
    reference = oracle(images, training=False).numpy()
    variables = from_keras(oracle, variant)
    ours = our_logits(variant, variables, images, oracle)
    diff = relative_difference(ours, reference)
    print(f'keras {variant} @ {res}px: max relative logit difference {diff:.2e}')
    assert diff < TOLERANCE


@pytest.fixture(scope='module')
def b0_224():
    """B0 at its native 224 px with a non-trivial Normalization layer (as if adapted), so the
    normalisation has to be read from the layer rather than assumed."""
    model = keras_oracle('b0', 224, seed=100)
    norm = next(layer for layer in model.layers if isinstance(layer, keras.layers.Normalization))
    norm.set_weights([np.array([0.4, 0.5, 0.6]), np.array([0.04, 0.09, 0.0625]), np.array(7)])
    norm.finalize_state()  # the layer applies the tensors finalize_state derives
    return model


def test_logits_match_keras_b0_at_224_with_adapted_normalization(b0_224):
    mean, std = keras_input_normalization(b0_224)
    np.testing.assert_allclose(mean, [0.4 * 255, 0.5 * 255, 0.6 * 255], rtol=1e-6)
    np.testing.assert_allclose(std, [0.2 * 255, 0.3 * 255, 0.25 * 255], rtol=1e-6)
    images = random_images(224, seed=101)
    reference = b0_224(images, training=False).numpy()
    ours = our_logits('b0', from_keras(b0_224, 'b0'), images, b0_224, depthwise_impl='auto')
    diff = relative_difference(ours, reference)
    print(f'keras b0 @ 224px: max relative logit difference {diff:.2e}')
    assert diff < TOLERANCE


def test_input_normalization_of_imagenet_style_stack():
    """The ImageNet-weights stem: Rescaling(1/255), Normalization(mean, var=std), then a
    second Rescaling by 1/sqrt(std) (keras-team/keras#49930), checked against Keras itself."""
    mean = np.array([0.485, 0.456, 0.406])
    std = np.array([0.229, 0.224, 0.225])
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    x = keras.layers.Normalization(axis=-1, mean=mean, variance=std)(x)
    x = keras.layers.Rescaling(list(1.0 / np.sqrt(std)))(x)
    x = keras.layers.Conv2D(2, 1)(x)  # the stack ends at the first other layer
    model = keras.Model(inputs, x)
    got_mean, got_std = keras_input_normalization(model)
    np.testing.assert_allclose(got_mean, mean * 255, rtol=1e-6)
    np.testing.assert_allclose(got_std, std * 255, rtol=1e-6)
    images = random_images(8, seed=3)
    stem = keras.Model(inputs, model.layers[3].output).predict(images, verbose=0)
    ours = (images - np.asarray(got_mean)) / np.asarray(got_std)
    np.testing.assert_allclose(ours, stem, rtol=1e-5, atol=1e-5)


def test_weight_files_load_like_the_model(b0_224, tmp_path):
    expected = from_keras(b0_224, 'b0')
    for filename in ('b0.weights.h5', 'b0.keras', 'legacy.h5'):
        path = tmp_path / filename
        if filename.endswith('.weights.h5'):
            b0_224.save_weights(path)
        else:
            b0_224.save(path)
        got = from_keras(path, 'b0')
        jax.tree.map(np.testing.assert_array_equal, got, expected)
    with pytest.raises(ValueError, match='efficientnet-b1|EfficientNetB1'):
        from_keras(tmp_path / 'b0.weights.h5', 'b1')


def test_skip_head_matches_keras_pooled_features(b0_224):
    variables = from_keras(b0_224, 'b0', skip_head=True)
    assert 'classifier' not in variables['params']
    pooled = keras.Model(b0_224.input, b0_224.get_layer('avg_pool').output)
    images = random_images(224, seed=102, batch=1)
    reference = pooled(images, training=False).numpy()
    ours = our_logits('b0', variables, images, b0_224, num_classes=0)
    assert relative_difference(ours, reference) < TOLERANCE


def test_mismatches_are_errors(b0_224):
    # B1 repeats stage 1 twice: block1b_* and the extra blocks of later stages are absent.
    with pytest.raises(
        WeightsMismatchError, match=r'128 missing: blocks_1/dw_bn/bias \(needs block1b_bn/beta\)'
    ):
        from_keras(b0_224, 'b1')
    with pytest.raises(
        WeightsMismatchError,
        match=r'classifier/kernel expects 1280x10.*'
        r'num_classes',
    ):
        from_keras(b0_224, 'b0', num_classes=10)
    from_keras(b0_224, 'b0', num_classes=1000)  # the matching count is fine
    with pytest.raises(ValueError, match='keras.applications has no efficientnet-lite0'):
        from_keras(__file__, 'lite0')
    with pytest.raises(FileNotFoundError, match='not found'):
        from_keras('/nonexistent/b0.weights.h5', 'b0')
