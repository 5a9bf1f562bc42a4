"""The optimizer and schedule against TensorFlow's own tf.compat.v1 implementations, and the
weight-decay coverage."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from configs import base
from training import config_resolve, optim

tf = pytest.importorskip('tensorflow')


def _tf_official_lr(base_lr, step, warmup, decay_steps, factor):
    """The official efficientnet utils.build_learning_rate, written with tf.compat.v1 ops."""
    step = tf.constant(step, tf.int64)
    decayed = tf.compat.v1.train.exponential_decay(
        base_lr, step, decay_steps, factor, staircase=True
    )
    decayed = decayed() if callable(decayed) else decayed  # eager mode returns a callable
    warm = base_lr * tf.cast(step, tf.float32) / tf.cast(warmup, tf.float32)
    return float(tf.where(step < warmup, warm, decayed))


def test_schedule_matches_tf_exponential_decay_staircase():
    base_lr, warmup, decay_steps = 0.256, 5, 3
    ours = optim.create_learning_rate_schedule(
        base_lr, kind='exponential', warmup_steps=warmup, decay_steps=decay_steps, decay_factor=0.97
    )
    for step in range(25):
        want = _tf_official_lr(base_lr, step, warmup, decay_steps, 0.97)
        np.testing.assert_allclose(float(ours(step)), want, rtol=1e-6, err_msg=f'step {step}')
    # Counted from step 0: right after warmup the rate already carries floor(5 / 3) = 1 decay.
    np.testing.assert_allclose(float(ours(5)), base_lr * 0.97, rtol=1e-6)
    assert float(ours(0)) == 0.0


def test_cosine_schedule_endpoints():
    s = optim.create_learning_rate_schedule(1.0, kind='cosine', warmup_steps=10, total_steps=100)
    np.testing.assert_allclose(
        [float(s(5)), float(s(50)), float(s(100))], [0.5, 0.5, 0.0], atol=1e-6
    )


def test_tf1_rmsprop_matches_tf_compat_v1_over_several_steps(rng):
    """Ten updates with the warmup + staircase schedule: same weights as TF's RMSPropOptimizer
    (eps inside the sqrt, rms slot initialised to 1, lr inside the momentum)."""
    base_lr, warmup, decay_steps, n = 0.1, 3, 2, 10
    w0 = rng.normal(size=(4, 3)).astype(np.float32)
    grads = rng.normal(size=(n, 4, 3)).astype(np.float32) * np.float32(3.0)

    step_var = tf.Variable(0, dtype=tf.int64)
    var = tf.Variable(w0)
    lr = lambda: _tf_official_lr(base_lr, int(step_var.numpy()), warmup, decay_steps, 0.97)
    tf_opt = tf.compat.v1.train.RMSPropOptimizer(lr, decay=0.9, momentum=0.9, epsilon=1e-3)
    schedule = optim.create_learning_rate_schedule(
        base_lr, warmup_steps=warmup, decay_steps=decay_steps
    )
    tx = optim.tf1_rmsprop(schedule, decay=0.9, momentum=0.9, eps=1e-3)
    params = jnp.asarray(w0)
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(n):
        tf_opt.apply_gradients([(tf.constant(grads[t]), var)])
        step_var.assign_add(1)
        updates, opt_state = update(jnp.asarray(grads[t]), opt_state)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(
            np.asarray(params), var.numpy(), rtol=1e-5, atol=1e-6, err_msg=f'after update {t + 1}'
        )
    assert not np.allclose(np.asarray(params), w0)


def _b0_variables():
    config = base.get_config()
    model = config_resolve.build_model(config, 1000)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))


def test_weight_decay_covers_everything_but_batchnorm():
    v = _b0_variables()
    mask = optim.weight_decay_mask(v['params'], v['batch_stats'])
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    excluded = sorted(k for k, m in flat.items() if not m)
    covered = sorted(k for k, m in flat.items() if m)
    # Exactly the BatchNorm scale/bias pairs are excluded: 49 BNs in B0 (stem, head, and
    # 2 or 3 per block) -> 98 leaves.
    assert all(("_bn']" in k) and k.endswith(("['scale']", "['bias']")) for k in excluded)
    assert len(excluded) == 2 * 49
    # Conv kernels, SE convs with their biases and the dense head are covered.
    assert "['stem_conv']['kernel']" in covered
    assert "['blocks_3']['se']['reduce']['bias']" in covered
    assert "['blocks_3']['se']['expand']['kernel']" in covered
    assert "['classifier']['kernel']" in covered and "['classifier']['bias']" in covered
    n_cov = sum(
        int(np.prod(x.shape))
        for x, m in zip(jax.tree.leaves(v['params']), jax.tree.leaves(mask))
        if m
    )
    n_all = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v['params']))
    assert n_all == 5_288_548  # docs/reference.md §1
    n_stats = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v['batch_stats']))
    assert n_all - n_cov == n_stats  # (scale, bias) pairs mirror the (mean, var) pairs
    # The penalty is tf.nn.l2_loss summed: sum(w^2) / 2.
    params = {'a': {'kernel': jnp.full((2, 3), 2.0)}, 'bn': {'scale': jnp.ones(3)}}
    mask = optim.weight_decay_mask(params, {'bn': {'mean': jnp.zeros(3)}})
    assert float(optim.l2_penalty(params, mask)) == pytest.approx(12.0)


def _optim_config(**kw):
    c = ConfigDict(base.get_config().optim.to_dict())
    c.update(kw)
    return c


def test_decoupled_decay_clipping_and_accumulation():
    params = {'w': jnp.array([1.0, -2.0]), 'bn': jnp.array([3.0])}
    mask = {'w': True, 'bn': False}
    zero = jax.tree.map(jnp.zeros_like, params)
    tx = optim.create_optimizer(
        _optim_config(weight_decay=0.1, weight_decay_mode='decoupled'), lambda s: 0.5, mask
    )
    u, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(u['w'], [-0.05, 0.1])  # -lr * wd * w
    np.testing.assert_allclose(u['bn'], [0.0])

    tx = optim.create_optimizer(_optim_config(grad_clip_norm=1.0, momentum=0.0), lambda s: 1.0)
    g = {'w': jnp.array([30.0, 40.0]), 'bn': jnp.array([0.0])}
    u, _ = tx.update(g, tx.init(params), params)
    expected = -np.array([0.6, 0.8]) / np.sqrt(0.9 + 0.1 * np.array([0.36, 0.64]) + 1e-3)
    np.testing.assert_allclose(u['w'], expected, rtol=1e-6)

    # Accumulating k micro-batches == one update with their mean gradient.
    tx1 = optim.create_optimizer(_optim_config(), lambda s: 0.1)
    tx3 = optim.create_optimizer(_optim_config(grad_accum_steps=3), lambda s: 0.1)
    gs = [{'w': jnp.array([1.0, 2.0]) * i, 'bn': jnp.array([i * 1.0])} for i in (1, 2, 6)]
    s3 = tx3.init(params)
    for i, gi in enumerate(gs):
        u3, s3 = tx3.update(gi, s3, params)
        if i < 2:
            assert float(jnp.abs(u3['w']).sum()) == 0.0
    mean_g = jax.tree.map(lambda *x: sum(x) / 3, *gs)
    u1, _ = tx1.update(mean_g, tx1.init(params), params)
    np.testing.assert_allclose(u3['w'], u1['w'], rtol=1e-6)
