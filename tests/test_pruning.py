"""Magnitude pruning: the schedule is tfmot's PolynomialDecay (its own code, run here), the
masks are tfmot's top-k rule (its TensorFlow ops), and training reaches the exact sparsity,
keeps it in the EMA weights and in checkpoints."""

import importlib.util
import os

import jax
import numpy as np
import pytest

import input_pipeline
from configs import smoke
from training import checkpoint, config_resolve, sharding
from training import pruning as pruning_lib
from training import run as run_lib


def _tfmot_schedule_module():
    """tfmot's pruning_schedule.py, loaded from the installed package without its __init__
    (which imports tf_keras; the schedule itself needs only TensorFlow). requirements-dev.txt
    says how tfmot is installed."""
    spec = importlib.util.find_spec('tensorflow_model_optimization')
    assert spec is not None, 'tensorflow-model-optimization is not installed (make setup)'
    root = spec.submodule_search_locations[0]
    path = os.path.join(root, 'python', 'core', 'sparsity', 'keras', 'pruning_schedule.py')
    module_spec = importlib.util.spec_from_file_location('tfmot_pruning_schedule', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    'initial,final,begin,end,power,frequency',
    [(0.0, 0.5, 0, 1000, 3, 100), (0.1, 0.9, 20, 517, 3, 7), (0.0, 0.75, 5, 6, 2, 1)],
)
def test_schedule_equals_tfmot_polynomial_decay(initial, final, begin, end, power, frequency):
    tfmot = _tfmot_schedule_module()
    theirs = tfmot.PolynomialDecay(initial, final, begin, end, power=power, frequency=frequency)
    ours = pruning_lib.PolynomialDecay(initial, final, begin, end, power, frequency)
    assert not ours.problems()
    steps = np.arange(0, end + 2 * frequency + 3)
    should, sparsity = zip(*(theirs(int(s)) for s in steps))
    np.testing.assert_array_equal(np.asarray(ours.should_update(steps)), np.array(should))
    np.testing.assert_allclose(
        np.asarray(ours.sparsity(steps)), np.array(sparsity), rtol=1e-6, atol=1e-7
    )


def _tfmot_mask(w: np.ndarray, sparsity: float) -> np.ndarray:
    """tfmot 0.8.1 ``pruning_impl.Pruning._update_mask``, its TensorFlow ops."""
    import tensorflow as tf

    abs_w = tf.math.abs(w)
    k = tf.cast(
        tf.math.maximum(tf.math.round(tf.cast(tf.size(abs_w), tf.float32) * (1 - sparsity)), 1),
        tf.int32,
    )  # noqa: E501
    values, indices = tf.math.top_k(tf.reshape(abs_w, [-1]), k=tf.size(abs_w))
    threshold, pos = tf.gather(values, k - 1), tf.gather(indices, k - 1)
    mask = tf.math.logical_or(
        abs_w >= threshold,
        tf.reshape(
            tf.one_hot(pos, depth=tf.size(abs_w), on_value=True, off_value=False, dtype=tf.bool),
            abs_w.shape,
        ),  # noqa: E501
    )
    return mask.numpy()


@pytest.mark.parametrize('sparsity', [0.0, 0.5, 0.65625, 0.9, 0.999])
def test_masks_equal_tfmot_top_k(rng, sparsity):
    for shape in [(3, 3, 16, 24), (3, 3, 1, 40), (37, 10), (1, 1, 5, 3)]:
        w = rng.normal(size=shape).astype(np.float32)
        w.flat[::7] = 0.25  # ties at many magnitudes
        ours = np.asarray(pruning_lib.topk_mask(w, sparsity))
        np.testing.assert_array_equal(ours, _tfmot_mask(w, sparsity), err_msg=f'{shape}')


def _config():
    c = smoke.get_config()
    c.optim.warmup_epochs = 0.0
    c.pruning.enabled = True
    c.pruning.initial_sparsity = 0.0
    c.pruning.final_sparsity = 0.75
    c.pruning.begin_step = 0
    c.pruning.end_step = 2
    c.pruning.frequency = 1
    return c


@pytest.mark.slow
def test_training_reaches_exact_sparsity_in_weights_ema_and_checkpoint(tmp_path):
    config = _config()
    mesh = sharding.create_mesh(1, devices=jax.devices()[:2])
    run = run_lib.create_run(config, mesh=mesh)
    it = input_pipeline.create_train_iterator(config.data, global_batch_size=16, seed=0)
    state = run.init_state(0)
    for _ in range(4):  # masks at updates 0, 1, 2 (sparsity 0, 0.65625, 0.75); then kept
        state, _ = run.train_step(state, sharding.global_batch(next(it), mesh))
    host = jax.device_get(state)
    masks = pruning_lib.sparsity_of(host.params, host.prune_masks)
    from flax import traverse_util

    flat_masks = traverse_util.flatten_dict(host.prune_masks)
    names = {'/'.join(k) for k in flat_masks}
    assert 'classifier/kernel' in names and any('dw_conv' in n for n in names)
    assert not any(n.endswith('bias') or '_bn' in n for n in names)
    for key, mask in flat_masks.items():
        n = mask.size
        k = max(int(np.round(n * 0.25)), 1)
        name = '/'.join(key)
        assert int(mask.sum()) == k, name
        for tree in (host.params, host.ema_params):
            w = traverse_util.flatten_dict(tree)[key]
            assert int(np.count_nonzero(w)) == k, name
            assert np.all(w[~mask] == 0), name
    assert masks['overall'] == pytest.approx(0.75, abs=0.01)

    ckpt = checkpoint.Checkpointer(str(tmp_path), keep_best=False, async_save=False)
    ckpt.save(4, state)
    ckpt.wait()
    restored, _ = ckpt.restore(run.abstract_state, run.state_shardings)
    ckpt.close()
    for a, b in zip(
        jax.tree.leaves(jax.device_get(restored.prune_masks)), jax.tree.leaves(host.prune_masks)
    ):  # noqa: E501
        np.testing.assert_array_equal(a, b)


def test_bad_pruning_config_is_one_line_before_compiling():
    c = _config()
    c.pruning.final_sparsity = 1.0
    c.pruning.end_step = -1
    info = lambda d: {'num_classes': 10, 'num_train': 64, 'num_eval': 40}  # noqa: E731
    with pytest.raises(config_resolve.ConfigError) as e:
        config_resolve.resolve(c, device_count=1, dataset_info_fn=info)
    assert 'config.pruning.final_sparsity must be in [0, 1)' in str(e.value)
    assert 'config.pruning.end_step must be an integer >= begin_step' in str(e.value)


def test_exports_keep_the_pruned_zeros():
    """A model pruned to 75% exported to ONNX and to float TFLite: BatchNorm folding scales
    each kernel by a non-zero factor per output channel, so every exported weight tensor holds
    as many exact zeros as the pruned kernels (read back from the files' own formats: ONNX
    initializers, the TFLite flatbuffer's constant buffers), and the export still computes the
    network's logits."""
    import onnx
    from flax import traverse_util
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    import efficientnet
    from inference import export as ex
    from tests.test_export import random_variables, reference_logits, relative_diff, task_images

    model = efficientnet.create_model('efficientnet-tiny', num_classes=10)
    variables = random_variables(model)
    masks = pruning_lib.update_masks(
        variables['params'], pruning_lib.init_masks(variables['params']), np.float32(0.75)
    )
    params = jax.device_get(pruning_lib.apply_masks(variables['params'], masks))
    variables = {**variables, 'params': params}
    kernels = [
        w for k, w in traverse_util.flatten_dict(params).items() if pruning_lib.is_prunable(k, w)
    ]
    zeros = sum(int(np.sum(w == 0)) for w in kernels)
    assert zeros == pytest.approx(0.75 * sum(w.size for w in kernels), rel=0.01)

    images = task_images(8, seed=5)[0]
    ref = reference_logits(model, variables, images, 'imagenet')
    proto = ex.build_onnx(model, variables)
    onnx_weights = [
        onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if len(t.dims) in (2, 4)
    ]
    data = ex.convert_tflite(model, variables)
    flat = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    tflite_weights = [  # the constant float32 tensors: those whose buffer holds data
        np.frombuffer(bytes(flat.buffers[t.buffer].data), np.float32)
        for t in flat.subgraphs[0].tensors
        if flat.buffers[t.buffer].data is not None
        and t.type == schema.TensorType.FLOAT32
        and len(t.shape) in (2, 4)
    ]
    for fmt, weights in (('onnx', onnx_weights), ('tflite', tflite_weights)):
        exported = sum(int(np.sum(w == 0)) for w in weights)
        assert exported == zeros, f'{fmt}: {exported} zeros exported, {zeros} pruned'
    assert relative_diff(ex.run_tflite(data, images)['logits'], ref) < 1e-4


def test_stacked_blocks_keep_a_mask_each():
    """With ``scan_blocks`` the train state holds a stage's repeated blocks stacked: each block
    still keeps its own top k, not the top k of the stack (the blocks here differ in scale, so
    one threshold for the stack would prune the small block away)."""
    rng = np.random.default_rng(0)
    w = (
        rng.normal(size=(3, 3, 3, 4, 8)).astype(np.float32)
        * np.array([1.0, 10.0, 0.1])[:, None, None, None, None]
    )
    params = {'blocks_3_to_5': {'expand_conv': {'kernel': w}}, 'head': {'kernel': w[0, 0, 0]}}
    masks = pruning_lib.update_masks(params, pruning_lib.init_masks(params), 0.5)
    got = np.asarray(masks['blocks_3_to_5']['expand_conv']['kernel'])
    for j in range(3):
        np.testing.assert_array_equal(got[j], pruning_lib.topk_mask(w[j], 0.5))
        assert got[j].sum() == w[j].size // 2
    whole = np.asarray(pruning_lib.topk_mask(w, 0.5))
    assert whole[2].sum() < got[2].sum()
    head = np.asarray(masks['head']['kernel'])
    np.testing.assert_array_equal(head, pruning_lib.topk_mask(w[0, 0, 0], 0.5))
