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
