"""from_tf_checkpoint on checkpoints written with the official tensorflow/tpu variable names.

The weights come from a randomised keras.applications EfficientNetB0, which is also the
oracle: the checkpoint is written with tf.compat.v1's Saver in graph mode, as the official
training did, with the oracle's values in the ExponentialMovingAverage copies and different
values in the raw variables, plus the optimizer slots and global_step training leaves behind.
"""

import functools

import jax
import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet import create_model
from efficientnet.weights import WeightsMismatchError, from_tf_checkpoint
from tests.test_weights_keras import randomise

SCOPE = 'efficientnet-b0'
RES = 64
TOLERANCE = 1e-4  # max |ours - keras| / max |keras|

# Keras layer -> official scope. Inside a block tf.layers numbers conv2d and
# tpu_batch_normalization in call order, so blocks without an expand conv shift by one.
_TOP = {
    'stem_conv': 'stem/conv2d',
    'stem_bn': 'stem/{bn}',
    'top_conv': 'head/conv2d',
    'top_bn': 'head/{bn}',
    'predictions': 'head/dense',
}
_EXPANDED = {
    'expand_conv': 'conv2d',
    'expand_bn': '{bn}',
    'dwconv': 'depthwise_conv2d',
    'bn': '{bn}_1',
    'se_reduce': 'se/conv2d',
    'se_expand': 'se/conv2d_1',
    'project_conv': 'conv2d_1',
    'project_bn': '{bn}_2',
}
_NOT_EXPANDED = {
    'dwconv': 'depthwise_conv2d',
    'bn': '{bn}',
    'se_reduce': 'se/conv2d',
    'se_expand': 'se/conv2d_1',
    'project_conv': 'conv2d',
    'project_bn': '{bn}_1',
}


def official_tensors(
    model: keras.Model, bn: str = 'tpu_batch_normalization'
) -> dict[str, np.ndarray]:
    """The Keras model's weights under the official names (without the scope)."""
    names = {layer.name for layer in model.layers}
    blocks, out = [], {}
    for layer in model.layers:
        if not layer.weights or isinstance(layer, keras.layers.Normalization):
            continue
        if layer.name.startswith('block'):
            block, part = layer.name.split('_', 1)  # 'block2a', 'expand_conv'
            if block not in blocks:
                blocks.append(block)
            table = _EXPANDED if f'{block}_expand_conv' in names else _NOT_EXPANDED
            scope = f'blocks_{blocks.index(block)}/{table[part]}'
        else:
            part, scope = layer.name, _TOP[layer.name]
        for w in layer.weights:
            var = 'depthwise_kernel' if part == 'dwconv' else w.name
            out[f'{scope.format(bn=bn)}/{var}'] = np.asarray(w.numpy())
    return out


def write_checkpoint(prefix: str, tensors: dict[str, np.ndarray]) -> str:
    """Saves ``tensors`` under exactly these names with a graph-mode tf.compat.v1 Saver."""
    graph = tf.Graph()
    with graph.as_default():
        variables = {
            name: tf.compat.v1.Variable(value, name=f'v{i}')
            for i, (name, value) in enumerate(tensors.items())
        }
        saver = tf.compat.v1.train.Saver(var_list=variables)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            return saver.save(sess, prefix)


def keras_oracle() -> keras.Model:
    keras.utils.set_random_seed(7)  # the same conv kernels every run (Keras draws them)
    model = keras.applications.EfficientNetB0(
        weights=None, input_shape=(RES, RES, 3), classifier_activation=None
    )
    randomise(model, 7)  # non-trivial BatchNorm statistics and biases
    return model


@pytest.fixture(scope='module')
def oracle():
    model = keras_oracle()
    images = np.random.default_rng(8).uniform(0, 255, (2, RES, RES, 3)).astype(np.float32)
    return model, images, model(images, training=False).numpy()


@pytest.fixture(scope='module')
def ema_checkpoint(oracle, tmp_path_factory):
    """Raw variables perturbed, EMA copies exact, plus RMSProp slots and global_step."""
    model = oracle[0]
    rng = np.random.default_rng(9)
    tensors = {'global_step': np.array(12345, np.int64)}
    for name, value in official_tensors(model).items():
        # Scaled, so raw variances stay positive and the logits stay finite but differ.
        raw = (value * rng.uniform(0.5, 1.5, value.shape)).astype(np.float32)
        tensors[f'{SCOPE}/{name}'] = raw
        tensors[f'{SCOPE}/{name}/ExponentialMovingAverage'] = value
        if name.endswith('kernel'):
            tensors[f'{SCOPE}/{name}/RMSProp'] = np.ones_like(value)
            tensors[f'{SCOPE}/{name}/RMSProp_1'] = np.zeros_like(value)
    directory = tmp_path_factory.mktemp('ema')
    return write_checkpoint(str(directory / 'model.ckpt'), tensors), tensors


@functools.lru_cache
def apply_fn():
    return jax.jit(create_model('b0', depthwise_impl='xla').apply)


def logits(variables, images):
    # keras.applications with weights=None only divides by 255 (test_weights_keras checks
    # keras_input_normalization on this stem).
    return np.asarray(apply_fn()(variables, images / np.float32(255.0)))


def relative_difference(ours, reference) -> float:
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def test_ema_checkpoint_matches_keras(oracle, ema_checkpoint):
    _, images, reference = oracle
    prefix, _ = ema_checkpoint
    variables = from_tf_checkpoint(prefix, 'b0')
    diff = relative_difference(logits(variables, images), reference)
    print(f'tf checkpoint b0 @ {RES}px: max relative logit difference {diff:.2e}')
    assert diff < TOLERANCE
    # The directory works too (the Saver wrote its 'checkpoint' state file).
    from_dir = from_tf_checkpoint(prefix.rsplit('/', 1)[0], 'efficientnet-b0')
    jax.tree.map(np.testing.assert_array_equal, from_dir, variables)


def test_use_ema_false_takes_the_raw_variables(oracle, ema_checkpoint):
    _, images, reference = oracle
    prefix, tensors = ema_checkpoint
    variables = from_tf_checkpoint(prefix, 'b0', use_ema=False)
    np.testing.assert_array_equal(
        variables['params']['stem_conv']['kernel'], tensors[f'{SCOPE}/stem/conv2d/kernel']
    )
    np.testing.assert_array_equal(
        variables['batch_stats']['blocks_1']['dw_bn']['var'],
        tensors[f'{SCOPE}/blocks_1/tpu_batch_normalization_1/moving_variance'],
    )
    assert relative_difference(logits(variables, images), reference) > 1e-2


def test_plain_batch_normalization_names_without_ema(oracle, tmp_path):
    """Checkpoints trained off-TPU name BatchNorm 'batch_normalization' and may lack EMA."""
    model, images, reference = oracle
    tensors = {
        f'{SCOPE}/{k}': v for k, v in official_tensors(model, bn='batch_normalization').items()
    }
    prefix = write_checkpoint(str(tmp_path / 'model.ckpt'), tensors)
    variables = from_tf_checkpoint(prefix, 'b0')
    assert relative_difference(logits(variables, images), reference) < TOLERANCE


def test_mismatches_are_errors(oracle, ema_checkpoint, tmp_path):
    prefix, _ = ema_checkpoint
    with pytest.raises(ValueError, match='holds efficientnet-b0 .*not efficientnet-b1'):
        from_tf_checkpoint(prefix, 'b1')
    with pytest.raises(WeightsMismatchError, match='classifier/kernel expects 1280x10'):
        from_tf_checkpoint(prefix, 'b0', num_classes=10)
    assert 'classifier' not in from_tf_checkpoint(prefix, 'b0', skip_head=True)['params']

    tensors = {f'{SCOPE}/{k}': v for k, v in official_tensors(oracle[0]).items()}
    del tensors[f'{SCOPE}/blocks_0/tpu_batch_normalization_1/moving_mean']
    tensors[f'{SCOPE}/blocks_0/conv2d_2/kernel'] = np.zeros((1, 1, 16, 16), np.float32)
    tensors[f'{SCOPE}/blocks_5/se/conv2d/bias'] = np.zeros(7, np.float32)
    bad = write_checkpoint(str(tmp_path / 'bad.ckpt'), tensors)
    with pytest.raises(WeightsMismatchError) as error:
        from_tf_checkpoint(bad, 'b0')
    message = str(error.value)
    assert (
        '1 missing: blocks_0/project_bn/mean (needs blocks_0/tpu_batch_normalization_1/moving_mean)'
    ) in message
    assert '1 unexpected: blocks_0/conv2d_2/kernel' in message
    assert (
        '1 shape mismatches: blocks_5/se/reduce/bias expects 10 but blocks_5/se/conv2d/bias gives 7'
    ) in message

    with pytest.raises(FileNotFoundError, match='checkpoint not found'):
        from_tf_checkpoint(str(tmp_path / 'absent.ckpt'), 'b0')
    no_model = write_checkpoint(
        str(tmp_path / 'other.ckpt'), {'resnet/conv1/kernel': np.zeros((3, 3, 3, 8), np.float32)}
    )
    with pytest.raises(ValueError, match='expected one EfficientNet scope'):
        from_tf_checkpoint(no_model, 'b0')
