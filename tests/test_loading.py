"""inference.loading.load_model: every weights format round-trips, with the eval facts that go
with it, and bad sources fail with clear messages.

Oracles: efficientnet_pytorch and keras.applications networks (their own forward passes), the
arrays a real train.py run saved (read with orbax directly), and numpy normalisation.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import efficientnet
from efficientnet import arch, normalization
from efficientnet.weights import WeightsMismatchError, save_variables
from inference.class_names import class_names
from inference.loading import detect_format, load_model
from tests.inference_fixtures import (
    WORKDIR_CLASS_NAMES,
    WORKDIR_CLASSES,
    random_variables,
    trained_workdir,
)

TINY = 'efficientnet-tiny'


def read_arrays(state_dir: str) -> dict:
    """The saved TrainState, read with orbax directly (not through efficientnet.weights)."""
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(state_dir)


def normalised(images: np.ndarray, mean, std) -> np.ndarray:
    return ((images.astype(np.float32) - np.float32(mean)) / np.float32(std)).astype(np.float32)


def assert_trees_equal(a, b) -> None:
    fa, ta = jax.tree.flatten(a)
    fb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------------- msgpack


@pytest.mark.parametrize(
    'name, normalization, interpolation',
    [(TINY, 'imagenet', 'bicubic'), ('efficientnet-lite-tiny', 'lite', 'bilinear')],
)
def test_msgpack_round_trip(tmp_path, name, normalization, interpolation):
    variables = random_variables(name, 7, seed=1)
    path = tmp_path / 'w.msgpack'
    save_variables(path, variables, name)
    loaded = load_model(str(path), depthwise_impl='xla')
    assert (loaded.name, loaded.format, loaded.num_classes) == (name, 'msgpack', 7)
    assert (loaded.resolution, loaded.crop_fraction) == (32, None)
    assert loaded.effective_crop_fraction == 0.5  # 32 / (32 + 32)
    assert (loaded.normalization, loaded.interpolation) == (normalization, interpolation)
    assert_trees_equal(loaded.variables, variables)
    images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    variant = arch.get_variant(name)
    model = efficientnet.create_model(name, num_classes=7, depthwise_impl='xla')
    expected = jax.jit(model.apply)(variables, normalised(images, variant.mean, variant.std))
    np.testing.assert_allclose(loaded.logits(images), expected, rtol=1e-5, atol=1e-5)


def test_msgpack_without_head_gives_features(tmp_path):
    variables = random_variables(TINY, 7, seed=3)
    del variables['params']['classifier']
    save_variables(tmp_path / 'backbone.msgpack', variables, TINY)
    loaded = load_model(str(tmp_path / 'backbone.msgpack'), depthwise_impl='xla')
    assert loaded.num_classes == 0
    head = arch.head_channels(arch.get_variant(TINY))
    assert loaded.logits(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, head)


def test_normalization_override(tmp_path):
    save_variables(tmp_path / 'w.msgpack', random_variables(TINY, 4, seed=4), TINY)
    loaded = load_model(str(tmp_path / 'w.msgpack'), normalization='advprop', depthwise_impl='xla')
    assert loaded.normalization == 'advprop'
    with pytest.raises(ValueError, match='normalization must be one of'):
        load_model(str(tmp_path / 'w.msgpack'), normalization='caffe')


# ------------------------------------------------------------------------------------- torch


@pytest.fixture(scope='module')
def torch_tiny(tmp_path_factory):
    """efficientnet_pytorch scaled to efficientnet-tiny's coefficients (width 0.25, depth 0.5),
    with random BatchNorm statistics, saved as a training script would (wrapped, DataParallel
    prefixes)."""
    import efficientnet_pytorch
    import torch

    from tests.test_weights_torch import randomise

    torch.manual_seed(5)
    net = efficientnet_pytorch.EfficientNet.from_name(
        'efficientnet-b0',
        width_coefficient=0.25,
        depth_coefficient=0.5,
        image_size=32,
        num_classes=6,
    )
    randomise(net, 5)
    net.eval()
    path = tmp_path_factory.mktemp('torch') / 'tiny.pth'
    torch.save({'state_dict': {'module.' + k: v for k, v in net.state_dict().items()}}, path)
    return net, str(path)


def test_torch_round_trip_matches_efficientnet_pytorch(torch_tiny):
    import torch

    net, path = torch_tiny
    loaded = load_model(path, model='tiny', depthwise_impl='xla')
    assert (loaded.name, loaded.format, loaded.num_classes) == (TINY, 'torch', 6)
    assert (loaded.normalization, loaded.interpolation) == ('imagenet', 'bicubic')
    images = np.random.default_rng(6).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    x = normalised(images, normalization.IMAGENET_MEAN, normalization.IMAGENET_STD)
    with torch.no_grad():
        expected = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    ours = loaded.logits(images)
    assert np.max(np.abs(ours - expected)) / np.max(np.abs(expected)) < 1e-4


def test_torch_needs_model_and_the_right_one(torch_tiny):
    _, path = torch_tiny
    with pytest.raises(ValueError, match='pass the model name'):
        load_model(path)
    with pytest.raises(WeightsMismatchError, match=r'^loading torch weights .* as b0: .*missing'):
        load_model(path, model='b0')
    with pytest.raises(ValueError, match='unknown EfficientNet variant'):
        load_model(path, model='b99')


# ------------------------------------------------------------------------------- keras and tf


def test_keras_file_round_trip(tmp_path):
    import keras

    from efficientnet.weights import from_keras
    from tests.test_weights_keras import randomise

    # keras.applications publishes B0-B7 only, so the file is a (randomised) B0.
    model = keras.applications.EfficientNetB0(weights=None, input_shape=(64, 64, 3))
    randomise(model, 9)
    path = str(tmp_path / 'b0.weights.h5')
    model.save_weights(path)
    assert detect_format(path) == 'keras'
    loaded = load_model(path, model='efficientnet-b0')
    assert (loaded.name, loaded.format, loaded.num_classes) == ('efficientnet-b0', 'keras', 1000)
    assert (loaded.resolution, loaded.normalization) == (224, 'imagenet')
    assert_trees_equal(loaded.variables, from_keras(model, 'b0'))  # the library's own oracle
    np.testing.assert_array_equal(  # and one tensor read straight from the Keras layer
        loaded.variables['params']['classifier']['kernel'],
        model.get_layer('predictions').get_weights()[0],
    )
    with pytest.raises(ValueError, match='keras weights do not record'):
        load_model(path)


def keras_tiny(num_classes: int):
    """keras.applications' EfficientNet builder at efficientnet-tiny's coefficients."""
    from keras.src.applications.efficientnet import EfficientNet

    from tests.test_weights_keras import randomise

    model = EfficientNet(
        0.25,
        0.5,
        32,
        0.1,
        name='tiny',
        weights=None,
        input_shape=(32, 32, 3),
        classes=num_classes,
        classifier_activation=None,
    )
    randomise(model, 13)
    return model


def test_tf_checkpoint_round_trip_takes_the_ema(tmp_path):
    from tests.test_weights_tf import official_tensors, write_checkpoint

    oracle = keras_tiny(num_classes=8)
    tensors = official_tensors(oracle)
    saved = {}
    for name, value in tensors.items():
        saved[f'efficientnet-tiny/{name}/ExponentialMovingAverage'] = value
        saved[f'efficientnet-tiny/{name}'] = np.zeros_like(value)  # the raw weights differ
    write_checkpoint(str(tmp_path / 'model.ckpt'), saved)
    assert detect_format(str(tmp_path)) == 'tf'
    assert detect_format(str(tmp_path / 'model.ckpt')) == 'tf'
    ema = load_model(str(tmp_path), model='tiny', depthwise_impl='xla')
    assert (ema.name, ema.format, ema.num_classes) == (TINY, 'tf', 8)
    images = np.random.default_rng(10).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    # weights=None Keras only divides by 255 (Normalization stays the identity until adapted):
    # fed 255 * normalised images it computes what our 'imagenet' normalisation gives ours.
    x = 255.0 * normalised(images, normalization.IMAGENET_MEAN, normalization.IMAGENET_STD)
    expected = np.asarray(oracle(x, training=False))
    ours = ema.logits(images)
    assert np.max(np.abs(ours - expected)) / np.max(np.abs(expected)) < 1e-4
    raw = load_model(str(tmp_path / 'model.ckpt'), model='tiny', use_ema=False)
    assert not np.any(raw.variables['params']['classifier']['kernel'])
    # The '.index' file, and a directory without the 'checkpoint' state file, name it too.
    os.remove(tmp_path / 'checkpoint')
    for source in (str(tmp_path / 'model.ckpt.index'), str(tmp_path)):
        assert_trees_equal(load_model(source, model='tiny').variables, ema.variables)
    with pytest.raises(ValueError, match=r'loading tf weights .* as b1: .*holds efficientnet-tiny'):
        load_model(str(tmp_path), model='b1')


# ------------------------------------------------------------------------------------ errors


def test_missing_and_unrecognised_sources(tmp_path):
    missing = str(tmp_path / 'nothing.pth')
    with pytest.raises(FileNotFoundError, match='nothing.pth'):
        load_model(missing, model='b0')
    with pytest.raises(FileNotFoundError, match='nothing.pth'):
        load_model(missing, model='b0', fmt='torch')
    with pytest.raises(ValueError, match='unknown weights format'):
        load_model(str(tmp_path), fmt='onnx')
    (tmp_path / 'notes.txt').write_text('hello')
    with pytest.raises(ValueError, match='cannot tell the format'):
        load_model(str(tmp_path / 'notes.txt'))
    with pytest.raises(ValueError, match='neither a training workdir'):
        load_model(str(tmp_path))
    empty_workdir = tmp_path / 'run'
    (empty_workdir / 'checkpoints').mkdir(parents=True)
    (empty_workdir / 'config.json').write_text(
        json.dumps(
            {
                'config': {
                    'model': {'name': 'b0', 'width': None, 'depth': None},
                    'data': {'num_classes': 10},
                }
            }
        )
    )
    with pytest.raises(FileNotFoundError, match='holds no finished checkpoint'):
        load_model(str(empty_workdir))


def test_msgpack_name_must_agree(tmp_path):
    path = tmp_path / 'tiny.msgpack'
    save_variables(path, random_variables(TINY, 5, seed=12), TINY)
    with pytest.raises(
        ValueError,
        match=r"loading msgpack .* model='b0' but the file holds "
        'efficientnet-tiny',
    ):
        load_model(str(path), model='b0')
    assert load_model(str(path), model='tiny', depthwise_impl='xla').name == TINY
    with pytest.raises(ValueError, match="num_classes=10 but the file's classifier has 5"):
        load_model(str(path), num_classes=10)


# ----------------------------------------------------------------------------------- workdir


@pytest.mark.filterwarnings('ignore:Sharding info not provided')
def test_workdir_takes_the_best_ema_checkpoint():
    workdir, folder = trained_workdir()
    assert detect_format(workdir) == 'workdir'
    loaded = load_model(workdir, depthwise_impl='xla')
    with open(os.path.join(workdir, 'config.json')) as f:
        saved = json.load(f)
    config = saved['config']
    assert loaded.format == 'workdir'
    assert loaded.name == 'efficientnet-b0-w0.25-d0.25'  # smoke.py's width/depth overrides
    assert loaded.num_classes == WORKDIR_CLASSES
    assert loaded.resolution == config['data']['resolution'] == 32
    assert loaded.crop_fraction == config['data']['crop_fraction']
    # config.data.normalization None means the variant's, which the run resolved and recorded.
    assert config['data']['normalization'] is None
    assert loaded.normalization == saved['derived']['normalization'] == 'imagenet'
    assert loaded.interpolation == config['data']['interpolation']
    best = os.listdir(os.path.join(workdir, 'best'))
    assert len(best) == 1 and loaded.step == int(best[0])
    state = read_arrays(os.path.join(workdir, 'best', best[0], 'state'))
    assert_trees_equal(loaded.variables['params'], state['ema_params'])
    assert_trees_equal(loaded.variables['batch_stats'], state['ema_batch_stats'])
    assert class_names(loaded) == list(WORKDIR_CLASS_NAMES)

    raw = load_model(workdir, use_ema=False, depthwise_impl='xla')
    assert_trees_equal(raw.variables['params'], state['params'])

    # An independent build of the same network: B0's table at width = depth = 0.25.
    variant = arch.Variant('custom', 0.25, 0.25, 32, 0.2)
    model = efficientnet.EfficientNet(variant, num_classes=WORKDIR_CLASSES, depthwise_impl='xla')
    images = np.random.default_rng(11).integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    expected = jax.jit(model.apply)(
        {'params': state['ema_params'], 'batch_stats': state['ema_batch_stats']},
        normalised(images, normalization.IMAGENET_MEAN, normalization.IMAGENET_STD),
    )
    np.testing.assert_allclose(loaded.logits(images), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings('ignore:Sharding info not provided')
def test_workdir_step_directory_and_model_checks():
    workdir, _ = trained_workdir()
    step1 = os.path.join(workdir, 'checkpoints', '1')
    loaded = load_model(step1, depthwise_impl='xla')
    assert loaded.step == 1
    state = read_arrays(os.path.join(step1, 'state'))
    assert_trees_equal(loaded.variables['params'], state['ema_params'])
    assert load_model(workdir, model='b0', depthwise_impl='xla').num_classes == WORKDIR_CLASSES
    with pytest.raises(ValueError, match=r"model='b3' but the workdir trained efficientnet-b0"):
        load_model(workdir, model='b3')
    with pytest.raises(ValueError, match='num_classes=1000 but the workdir trained 3'):
        load_model(workdir, num_classes=1000)
