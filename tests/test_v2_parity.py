"""EfficientNetV2 logits against two independent implementations, through every weight reader:
keras.applications EfficientNetV2* (``from_keras`` on the model and its .weights.h5 / .keras /
.h5 files), timm's tf_efficientnetv2_* (``from_torch`` on its state dict, a .pth and a
.safetensors file) and an official google/automl TF checkpoint (``from_tf_checkpoint``),
written here with the official variable names from the Keras oracle's weights.

Each oracle gets random weights with non-trivial BatchNorm statistics and biases. V2-B0 runs in
float32 with freely random statistics, at 224 px and at the odd 193 px (TF SAME pads the odd
pixel on the bottom/right at every stride). In the deeper V2-S freely random statistics blow the
activations up by orders of magnitude, and float32 rounding with them (the two oracles then
differ from each other by ~1e-3); its statistics are instead measured by the oracle on the test
batch and then perturbed by a few percent ("mild"), so every tensor still matters.

Every variant, B0-B3, S, M, L and XL, also runs in float64 (``scripts/v2_parity.py``, which
prints the whole table) with freely random statistics: ours, Keras and timm agree to ~1e-15
for B0-B3, ~1e-10 for S, and 1e-7..1e-5 for M (there the activations reach ~1e6 and even
float64 is ill-conditioned; see the script's docstring). The tests here run B0-B3, S and M
against both oracles and the oracles against each other; L and XL (119M and 208M parameters)
only in the script.
"""

import functools

import jax
import keras
import numpy as np
import pytest

from efficientnet import arch, create_model
from efficientnet.normalization import NORMALIZATIONS
from efficientnet.weights import (
    from_keras,
    from_tf_checkpoint,
    from_torch,
    keras_input_normalization,
)
from scripts import v2_parity
from scripts.timm_import import import_timm
from tests.test_weights_keras import randomise, relative_difference
from tests.test_weights_tf import write_checkpoint

TOLERANCE = 1e-4  # max |ours - oracle| / max |oracle|


@functools.lru_cache
def jitted_apply(name: str, num_classes: int = 1000):
    return jax.jit(create_model(name, num_classes=num_classes, depthwise_impl='xla').apply)


def normalised(name: str, images: np.ndarray) -> np.ndarray:
    mean, std = NORMALIZATIONS[arch.get_variant(name).normalization]
    return ((images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(
        np.float32
    )


def ours(name: str, variables, images: np.ndarray) -> np.ndarray:
    """Our logits of raw [0, 255] images, normalised by the variant's input contract."""
    return np.asarray(jitted_apply(name)(variables, normalised(name, images)))


def random_images(res: int, seed: int, batch: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 255.0, (batch, res, res, 3)).astype(np.float32)


# ------------------------------------------------------------------------------ keras oracle


def keras_v2(suffix: str, res: int, seed: int, weights=None) -> keras.Model:
    """keras.applications.EfficientNetV2<suffix> at ``res`` px with its built-in preprocessing
    (raw [0, 255] input); random weights unless ``weights`` (a get_weights list) are given."""
    keras.utils.set_random_seed(seed)
    cls = getattr(keras.applications, 'EfficientNetV2' + suffix.upper())
    model = cls(weights=None, input_shape=(res, res, 3), classifier_activation=None)
    if weights is None:
        randomise(model, seed)
    else:
        model.set_weights(weights)
    return model


def calibrate_keras(model: keras.Model, images: np.ndarray, seed: int) -> None:
    """Moving statistics = the statistics of this batch (one training-mode pass with momentum
    0), then perturbed mildly: mean + 0.1 sd * N(0, 1), variance * U(0.8, 1.25)."""
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in bns:
        layer.momentum = 0.0
    model(images, training=True)
    rng = np.random.default_rng(seed)
    for layer in bns:
        gamma, beta, mean, var = layer.get_weights()
        mean = mean + 0.1 * np.sqrt(var) * rng.normal(size=mean.shape)
        var = var * rng.uniform(0.8, 1.25, var.shape)
        layer.set_weights([gamma, beta, mean, var])
        layer.momentum = 0.9


@pytest.fixture(scope='module')
def keras_b0():
    """V2-B0 at 224 px and the same weights at 193 px, with logits of a batch at each size."""
    model = keras_v2('b0', 224, seed=1)
    odd = keras_v2('b0', 193, seed=1, weights=model.get_weights())
    out = {}
    for res, m in ((224, model), (193, odd)):
        images = random_images(res, seed=res)
        out[res] = (images, m(images, training=False).numpy())
    return model, out


def test_keras_preprocessing_is_our_input_contract(keras_b0):
    mean, std = keras_input_normalization(keras_b0[0])
    want_mean, want_std = NORMALIZATIONS['imagenet']
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5)
    np.testing.assert_allclose(std, want_std, rtol=1e-5)


@pytest.mark.parametrize('res', [224, 193])
def test_keras_b0_logits(keras_b0, res):
    model, batches = keras_b0
    images, reference = batches[res]
    variables = from_keras(model, 'efficientnetv2-b0')
    diff = relative_difference(ours('efficientnetv2-b0', variables, images), reference)
    print(f'keras efficientnetv2-b0 @ {res}px float32: max relative logit difference {diff:.2e}')
    assert diff < TOLERANCE


def test_keras_weight_file(keras_b0, tmp_path):
    """A V2 .weights.h5 file (the reader builds the V2 class; .keras and legacy .h5 go through
    the same code as V1's, tests/test_weights_keras.py)."""
    model = keras_b0[0]
    path = tmp_path / 'v2b0.weights.h5'
    model.save_weights(path)
    jax.tree.map(
        np.testing.assert_array_equal, from_keras(path, 'v2-b0'), from_keras(model, 'v2-b0')
    )
    with pytest.raises(ValueError, match='keras.applications has no efficientnetv2-xl'):
        from_keras(path, 'v2-xl')
    with pytest.raises(ValueError, match='EfficientNetV2B1'):
        from_keras(path, 'v2-b1')


# ------------------------------------------------------------------------------- timm oracle


def timm_v2(suffix: str, seed: int):
    """timm's tf_efficientnetv2_<suffix> (TF SAME padding, BatchNorm epsilon 1e-3) with random
    BatchNorm statistics and biases."""
    import torch

    timm = import_timm()
    torch.manual_seed(seed)
    net = timm.create_model(f'tf_efficientnetv2_{suffix}', pretrained=False).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, c)))
                m.bias.copy_(torch.from_numpy(rng.normal(0.0, 0.2, c)))
                m.running_mean.copy_(torch.from_numpy(rng.normal(0.0, 0.2, c)))
                m.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, c)))
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.from_numpy(rng.normal(0.0, 0.1, m.bias.shape)))
    return net


def timm_logits(net, x_nhwc: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def calibrate_timm(net, x_nhwc: np.ndarray, seed: int) -> None:
    """As ``calibrate_keras``: running statistics of this batch, then perturbed mildly."""
    import torch

    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.momentum = 1.0
    net.train()
    timm_logits(net, x_nhwc)
    net.eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for m in bns:
            var = m.running_var.numpy()
            m.running_mean.add_(torch.from_numpy(0.1 * np.sqrt(var) * rng.normal(size=var.shape)))
            m.running_var.mul_(torch.from_numpy(rng.uniform(0.8, 1.25, var.shape)))
            m.momentum = 0.1


@pytest.fixture(scope='module')
def timm_b0():
    return timm_v2('b0', seed=2)


@pytest.mark.parametrize('res', [224, 193])
def test_timm_b0_logits(timm_b0, res):
    images = random_images(res, seed=res + 1)
    reference = timm_logits(timm_b0, normalised('v2-b0', images))
    variables = from_torch(timm_b0.state_dict(), 'efficientnetv2-b0')
    diff = relative_difference(ours('efficientnetv2-b0', variables, images), reference)
    print(f'timm efficientnetv2-b0 @ {res}px float32: max relative logit difference {diff:.2e}')
    assert diff < TOLERANCE


def test_timm_files_and_skip_head(timm_b0, tmp_path):
    import torch
    from safetensors.torch import save_file

    state = timm_b0.state_dict()
    expected = from_torch(state, 'v2-b0')
    torch.save(state, tmp_path / 'v2b0.pth')
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / 'model.safetensors'))
    for path in (tmp_path / 'v2b0.pth', tmp_path / 'model.safetensors'):
        jax.tree.map(np.testing.assert_array_equal, from_torch(str(path), 'v2-b0'), expected)
    backbone = from_torch(state, 'v2-b0', skip_head=True)
    assert 'classifier' not in backbone['params']
    images = random_images(64, seed=5)
    timm_b0.reset_classifier(0)  # pooled features
    try:
        reference = timm_logits(timm_b0, normalised('v2-b0', images))
    finally:
        timm_b0.reset_classifier(1000)
    features = np.asarray(
        jitted_apply('efficientnetv2-b0', 0)(backbone, normalised('v2-b0', images))
    )
    assert relative_difference(features, reference) < TOLERANCE


# ------------------------------------------------- an official TF checkpoint (google/automl)

# Keras layer -> the official scope inside blocks_N (effnetv2_model.py numbers conv2d and
# tpu_batch_normalization in creation order within a block).
_MBCONV = {
    'expand_conv': 'conv2d',
    'expand_bn': '{bn}',
    'dwconv2': 'depthwise_conv2d',
    'bn': '{bn}_1',
    'se_reduce': 'se/conv2d',
    'se_expand': 'se/conv2d_1',
    'project_conv': 'conv2d_1',
    'project_bn': '{bn}_2',
}
_FUSED = {
    'expand_conv': 'conv2d',
    'expand_bn': '{bn}',
    'project_conv': 'conv2d_1',
    'project_bn': '{bn}_1',
}
_FUSED_NO_EXPAND = {'project_conv': 'conv2d', 'project_bn': '{bn}'}
_TOP = {
    'stem_conv': 'stem/conv2d',
    'stem_bn': 'stem/{bn}',
    'top_conv': 'head/conv2d',
    'top_bn': 'head/{bn}',
    'predictions': 'head/dense',
}


def official_v2_tensors(model: keras.Model, bn: str = 'tpu_batch_normalization') -> dict:
    names = {layer.name for layer in model.layers}
    blocks, out = [], {}
    for layer in model.layers:
        if not layer.weights or isinstance(layer, keras.layers.Normalization):
            continue
        if layer.name.startswith('block'):
            block, part = layer.name.split('_', 1)
            if block not in blocks:
                blocks.append(block)
            if f'{block}_dwconv2' in names:
                table = _MBCONV
            elif f'{block}_expand_conv' in names:
                table = _FUSED
            else:
                table = _FUSED_NO_EXPAND
            scope = f'blocks_{blocks.index(block)}/{table[part]}'
        else:
            part, scope = layer.name, _TOP[layer.name]
        for w in layer.weights:
            var = 'depthwise_kernel' if part == 'dwconv2' else w.name
            out[f'{scope.format(bn=bn)}/{var}'] = np.asarray(w.numpy())
    return out


def test_official_checkpoint(keras_b0, tmp_path):
    model, batches = keras_b0
    images, reference = batches[193]
    rng = np.random.default_rng(3)
    tensors = {'global_step': np.array(7, np.int64)}
    for name, value in official_v2_tensors(model).items():
        key = f'efficientnetv2-b0/{name}'
        tensors[key] = (value * rng.uniform(0.5, 1.5, value.shape)).astype(np.float32)
        tensors[f'{key}/ExponentialMovingAverage'] = value
    prefix = write_checkpoint(str(tmp_path / 'model.ckpt'), tensors)
    variables = from_tf_checkpoint(prefix, 'v2-b0')
    # The official names of the three block kinds, read into ours.
    stats = variables['batch_stats']
    np.testing.assert_array_equal(
        stats['blocks_0']['project_bn']['var'],
        tensors['efficientnetv2-b0/blocks_0/tpu_batch_normalization/moving_variance/'
                'ExponentialMovingAverage'],
    )  # fmt: skip
    np.testing.assert_array_equal(
        variables['params']['blocks_1']['project_conv']['kernel'],
        tensors['efficientnetv2-b0/blocks_1/conv2d_1/kernel/ExponentialMovingAverage'],
    )
    diff = relative_difference(ours('efficientnetv2-b0', variables, images), reference)
    print(f'official checkpoint efficientnetv2-b0 @ 193px: max relative difference {diff:.2e}')
    assert diff < TOLERANCE
    with pytest.raises(ValueError, match='holds efficientnetv2-b0 .*not efficientnetv2-b1'):
        from_tf_checkpoint(prefix, 'v2-b1')


# ------------------------------------------------------- V2-S against both, mild statistics


@pytest.mark.slow
def test_s_logits_against_keras_and_timm():
    """V2-S at 129 px (odd: 65, 33, 17, 9, 5 px deeper down) in float32, batch 4."""
    res = 129
    images = random_images(res, seed=11, batch=4)
    k = keras_v2('s', res, seed=12)
    calibrate_keras(k, images, seed=13)
    mean, std = keras_input_normalization(k)
    np.testing.assert_allclose(mean, NORMALIZATIONS['v2'][0], rtol=1e-6)  # x / 128 - 1
    np.testing.assert_allclose(std, NORMALIZATIONS['v2'][1], rtol=1e-6)
    reference = k(images, training=False).numpy()
    diff = relative_difference(ours('v2-s', from_keras(k, 'v2-s'), images), reference)
    print(f'keras efficientnetv2-s @ {res}px float32, mild BN: max relative difference {diff:.2e}')
    assert diff < TOLERANCE

    net = timm_v2('s', seed=14)
    calibrate_timm(net, normalised('v2-s', images), seed=15)
    reference = timm_logits(net, normalised('v2-s', images))
    diff = relative_difference(
        ours('v2-s', from_torch(net.state_dict(), 'v2-s'), images), reference
    )
    print(f'timm efficientnetv2-s @ {res}px float32, mild BN: max relative difference {diff:.2e}')
    assert diff < TOLERANCE


# -------------------------------------------- every variant in float64, free statistics


@pytest.mark.slow
@pytest.mark.parametrize('suffix', ['b0', 'b1', 'b2', 'b3', 's', 'm'])
def test_float64_logits_against_keras_and_timm(suffix):
    """65 px (odd at every stride), batch 2, float64 throughout; L and XL: scripts/v2_parity.py.
    On B0 two negative controls: one BatchNorm's gamma and beta swapped, and the input shifted
    by one pixel, must both miss by far more than the tolerance."""
    d = v2_parity.compare(suffix, controls=suffix == 'b0')
    print(f'efficientnetv2-{suffix} @ 65px float64: {d}')
    assert d.keys() >= {'timm', 'keras', 'keras_vs_timm'}
    for key in ('timm', 'keras', 'keras_vs_timm'):
        assert d[key] < TOLERANCE, key
    if suffix == 'b0':
        assert d['control_swapped_bn'] > 100 * TOLERANCE
        assert d['control_shifted'] > 100 * TOLERANCE
