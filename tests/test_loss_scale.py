"""float16 with dynamic loss scaling: the scale follows Keras's LossScaleOptimizer step by step,
a real overflow skips the whole update, and the scale is checkpointed so that a resume is
exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import input_pipeline
from configs import smoke
from training import checkpoint, config_resolve, sharding
from training import loss_scale as loss_scale_lib
from training import run as run_lib

# Per step, the factor on the input: 1e38 makes loss * 2**15 overflow float32 (a real inf).
INPUTS = [1.0, 1.0, 1e38, 1.0, 1.0, 1.0, 1.0, 1.0, 1e38, 1e38, 1.0, 1.0, 1.0, 1.0]


def test_scale_and_skips_follow_keras_loss_scale_optimizer():
    """Same gradients through Keras (TensorFlow backend) and through training.loss_scale with
    growth every 3 finite steps: the same scale after every step and the same skipped steps."""
    import keras
    import tensorflow as tf

    growth = 3
    var = keras.Variable(np.float32(1.0))
    opt = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1), initial_scale=2.0**15, dynamic_growth_steps=growth
    )
    ours = loss_scale_lib.create(2.0**15, growth)
    step = jax.jit(lambda ls, p, x: ls.value_and_grad(lambda p: p * x)(p))
    p = jnp.float32(1.0)
    for i, x in enumerate(INPUTS):
        with tf.GradientTape() as tape:
            scaled = opt.scale_loss(var * np.float32(x))
        opt.apply([tape.gradient(scaled, var)], [var])
        ours, finite, _, grad = step(ours, p, jnp.float32(x))
        p = jnp.where(finite, p - 0.1 * grad, p)
        assert float(ours.scale) == float(opt.dynamic_scale.numpy()), f'step {i}'
        np.testing.assert_allclose(float(p), float(var.numpy()), rtol=1e-6, err_msg=f'step {i}')
        assert bool(finite) == (x < 1e30), f'step {i}'
    assert float(ours.scale) == 2.0**14  # three halvings, two doublings


def _config(**loss_scale):
    c = smoke.get_config()
    c.optim.warmup_epochs = 0.0
    c.model.compute_dtype = 'float16'
    c.loss_scale.mode = 'dynamic'
    for k, v in loss_scale.items():
        c.loss_scale[k] = v
    return c


def _batches(config, n):
    it = input_pipeline.create_train_iterator(
        config.data, global_batch_size=config.batch_size, seed=0
    )
    return [next(it) for _ in range(n)]


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope='module')
def fp16_run():
    # 2**15 overflows float16 on the fresh smoke model's first steps (the scale settles at
    # 2**12 there); 2**8 stays finite, so the overflow below is the only one.
    config = _config(growth_interval=2, initial_scale=2.0**8)
    mesh = sharding.create_mesh(1, devices=jax.devices()[:2])
    run = run_lib.create_run(config, mesh=mesh)
    return config, mesh, run


@pytest.mark.slow  # float16 compiles slowly on CPU
def test_real_overflow_skips_params_optimizer_ema_and_statistics(fp16_run):
    config, mesh, run = fp16_run
    b0, b1 = _batches(config, 2)
    state = run.init_state(0)
    assert float(state.loss_scale.scale) == 2.0**8
    state, m = run.train_step(state, sharding.global_batch(b0, mesh))
    assert float(m['grads_finite']) == 1.0
    before = _host(state)
    # Images at 1e30 overflow float16 in the first convolution: inf/NaN in the real gradient.
    huge = dict(b1, image=b1['image'].astype(np.float32) * 1e30)
    state, m = run.train_step(state, sharding.global_batch(huge, mesh))
    after = _host(state)
    assert float(m['grads_finite']) == 0.0
    assert float(after.loss_scale.scale) == 2.0**7  # halved
    assert int(after.loss_scale.fin_steps) == 0
    assert int(after.step) == int(before.step) + 1
    for field in ('params', 'batch_stats', 'opt_state', 'ema_params', 'ema_batch_stats'):
        pairs = zip(jax.tree.leaves(getattr(after, field)), jax.tree.leaves(getattr(before, field)))
        for a, b in pairs:
            np.testing.assert_array_equal(a, b, err_msg=field)
    # The next finite step updates again.
    state, m = run.train_step(state, sharding.global_batch(b1, mesh))
    assert float(m['grads_finite']) == 1.0
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), _host(state.params), after.params)
    assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.slow
def test_scale_is_checkpointed_and_resume_is_exact(fp16_run, tmp_path):
    """Three steps in one go == two steps, save, restore, one step, bit for bit (the scale
    doubles after step 2: growth every 2 finite steps)."""
    config, mesh, run = fp16_run
    batches = [sharding.global_batch(b, mesh) for b in _batches(config, 3)]
    state = run.init_state(0)
    for b in batches:
        state, _ = run.train_step(state, b)
    straight = _host(state)
    assert float(straight.loss_scale.scale) == 2.0**9
    assert int(straight.loss_scale.fin_steps) == 1

    state = run.init_state(0)
    for b in batches[:2]:
        state, _ = run.train_step(state, b)
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep_best=False, async_save=False)
    ckpt.save(2, state)
    ckpt.wait()
    restored, _ = ckpt.restore(run.abstract_state, run.state_shardings)
    ckpt.close()
    assert float(restored.loss_scale.scale) == 2.0**9
    restored, _ = run.train_step(restored, batches[2])
    resumed = _host(restored)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(a, b)


def test_bad_loss_scale_config_is_one_line_before_compiling():
    c = _config(mode='static')
    info = lambda d: {'num_classes': 10, 'num_train': 64, 'num_eval': 40}
    with pytest.raises(config_resolve.ConfigError, match=r'config.loss_scale.mode must be one'):
        config_resolve.resolve(c, device_count=1, dataset_info_fn=info)
