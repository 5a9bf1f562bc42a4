"""The EfficientNet module (efficientnet/model.py) and create_model: stochastic depth,
initialisers, bfloat16 compute, endpoints, training-mode state and input checks.

Logit parity with Keras and efficientnet_pytorch lives in test_weights_*.py; the architecture
tables in test_arch.py, the layers in test_layers.py.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficientnet
from efficientnet import arch
from efficientnet.model import drop_path, scan_runs, stacked_name
from training.compilation import CPU_INIT_COMPILER_OPTIONS


@pytest.fixture(scope='module')
def tiny():
    """The test-only tiny variant and one set of its variables (init compiles once per module:
    XLA's CPU compile of the per-parameter random draws dominates small-model start-up)."""
    model = efficientnet.create_model('tiny', num_classes=10)
    x = jnp.zeros((1, 32, 32, 3))
    return model, jax.jit(model.init)(jax.random.key(1), x)


def test_model_depthwise_impls_agree_end_to_end(tiny):
    _, v = tiny
    x = jax.random.normal(jax.random.key(0), (2, 40, 40, 3))
    a = efficientnet.create_model('tiny', num_classes=10, depthwise_impl='xla')
    for impl in ('unrolled', 'cpu_kernel'):
        b = efficientnet.create_model('tiny', num_classes=10, depthwise_impl=impl)
        np.testing.assert_allclose(
            jax.jit(a.apply)(v, x), jax.jit(b.apply)(v, x), rtol=1e-4, atol=1e-5
        )


def test_drop_path_is_per_example_and_rescaled():
    x = jnp.ones((20000, 2, 2, 3))
    y = drop_path(x, 0.8, jax.random.key(0))
    per_example = np.asarray(y).reshape(20000, -1)
    assert set(np.unique(per_example).round(6)) <= {0.0, 1.25}
    assert (per_example == per_example[:, :1]).all()  # one draw per example
    assert abs(per_example[:, 0].mean() - 1.0) < 0.02  # expectation preserved
    assert abs((per_example[:, 0] > 0).mean() - 0.8) < 0.01


def test_stochastic_depth_only_in_training_and_residual_blocks(tiny):
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))

    def run(model, train, k):
        @jax.jit
        def f(v, k):
            rngs = {'dropout': jax.random.key(k)}
            if train:
                return model.apply(v, x, train=True, rngs=rngs, mutable=['batch_stats'])[0]
            return model.apply(v, x, rngs=rngs)

        return f(v, k)

    model = efficientnet.create_model('tiny', num_classes=10, dropout_rate=0.0)
    v = tiny[1]
    np.testing.assert_array_equal(run(model, False, 1), run(model, False, 5))
    assert not np.allclose(run(model, True, 1), run(model, True, 2))
    no_sd = efficientnet.create_model('tiny', num_classes=10, dropout_rate=0.0, drop_path_rate=0.0)
    np.testing.assert_allclose(run(no_sd, True, 1), run(no_sd, True, 2), rtol=1e-6)


def test_initialisers_match_recipe(tiny):
    p = tiny[1]['params']
    last = f'blocks_{len(tiny[0].blocks) - 1}'
    dw = np.asarray(p[last]['dw_conv']['kernel'])  # (3, 3, 1, 288)
    assert dw.shape == (3, 3, 1, 288)
    # fan_out = kh*kw per group; flax's variance_scaling would give a std sqrt(288) too small.
    assert dw.std() == pytest.approx(math.sqrt(2 / 9), rel=0.05)
    head = np.asarray(p['head_conv']['kernel'])  # (1, 1, 80, 320)
    assert head.std() == pytest.approx(math.sqrt(2 / 320), rel=0.03)
    proj = np.asarray(p[last]['project_conv']['kernel'])  # (1, 1, 288, 80)
    assert proj.std() == pytest.approx(math.sqrt(2 / 80), rel=0.03)
    stem = np.asarray(p['stem_conv']['kernel'])  # (3, 3, 3, 8): fan_out 72
    assert stem.std() == pytest.approx(math.sqrt(2 / 72), rel=0.15)
    # Untruncated normal: values beyond 2.5 sigma exist (a truncated normal would have none).
    assert (np.abs(head) > 2.5 * math.sqrt(2 / 320)).mean() > 0.005
    dense = np.asarray(p['classifier']['kernel'])  # (320, 10)
    bound = 1 / math.sqrt(10)
    assert np.abs(dense).max() <= bound and np.abs(dense).max() > 0.98 * bound
    assert dense.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform
    assert not np.asarray(p['classifier']['bias']).any()
    assert not np.asarray(p[last]['se']['reduce']['bias']).any()
    bn = p[last]['dw_bn']
    assert (np.asarray(bn['scale']) == 1).all() and not np.asarray(bn['bias']).any()


def test_bfloat16_inference_close_to_float32(tiny):
    x = jax.random.normal(jax.random.key(0), (4, 64, 64, 3))
    f32 = efficientnet.create_model('tiny', num_classes=10)
    bf16 = efficientnet.create_model('tiny', num_classes=10, dtype=jnp.bfloat16)
    v = tiny[1]
    # Non-trivial BN statistics so activations are not all near zero.
    stats = jax.jit(
        lambda v: f32.apply(
            v, x, train=True, rngs={'dropout': jax.random.key(2)}, mutable=['batch_stats']
        )[1]['batch_stats']
    )(v)
    v = {'params': v['params'], 'batch_stats': stats}
    a = jax.jit(f32.apply)(v, x)
    b = jax.jit(bf16.apply)(v, x)
    assert b.dtype == jnp.float32  # logits stay float32
    assert jax.tree.leaves(jax.tree.map(lambda t: t.dtype, v['params']))[0] == jnp.float32
    err = np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(a)).max()
    assert err < 0.05, err  # stated tolerance: 5% of the largest logit
    assert np.corrcoef(np.asarray(a).ravel(), np.asarray(b).ravel())[0, 1] > 0.999


def test_endpoints_and_features():
    x = jnp.zeros((1, 64, 64, 3))
    model = efficientnet.create_model('b0')
    v = jax.eval_shape(model.init, jax.random.key(0), x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, return_endpoints=True), v, x)
    assert [out[f'reduction_{k}'].shape[1] for k in range(1, 6)] == [32, 16, 8, 4, 2]
    assert [out[f'reduction_{k}'].shape[-1] for k in range(1, 6)] == [16, 24, 40, 112, 320]
    assert out['logits'].shape == (1, 1000)
    feats = efficientnet.create_model('b0', num_classes=0)
    vf = jax.eval_shape(feats.init, jax.random.key(0), x)
    assert jax.eval_shape(feats.apply, vf, x).shape == (1, 1280)
    assert 'classifier' not in vf['params']
    backbone = efficientnet.create_model('b3', features_only=True)
    vb = jax.eval_shape(backbone.init, jax.random.key(0), x)
    eps = jax.eval_shape(backbone.apply, vb, x)
    assert sorted(eps) == [f'reduction_{k}' for k in range(1, 6)]
    assert 'head_conv' not in vb['params']


def test_training_updates_batch_stats_and_dropout_needs_rng(tiny):
    model, v = tiny
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    _, upd = jax.jit(
        lambda v: model.apply(
            v, x, train=True, rngs={'dropout': jax.random.key(2)}, mutable=['batch_stats']
        )
    )(v)
    before = v['batch_stats']['stem_bn']['mean']
    after = upd['batch_stats']['stem_bn']['mean']
    assert not np.allclose(before, after)
    with pytest.raises(Exception, match='dropout'):
        jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=['batch_stats']), v)


def test_api_and_bad_input():
    assert efficientnet.list_models()[0] == 'efficientnet-b0'
    assert len(efficientnet.list_models()) == 23  # 10 EfficientNet, 5 Lite, 8 EfficientNetV2
    info = efficientnet.model_info('b4')
    assert info['resolution'] == 380 and info['crop_fraction'] == pytest.approx(380 / 412)
    assert info['mean'] == pytest.approx((0.485 * 255, 0.456 * 255, 0.406 * 255))
    with pytest.raises(ValueError, match='efficientnet-b0'):
        efficientnet.create_model('efficientnet-b9')
    with pytest.raises(ValueError, match='unknown EfficientNet variant'):
        efficientnet.model_info('resnet50')
    with pytest.raises(TypeError, match='unknown option'):
        efficientnet.create_model('b0', widht=2)
    with pytest.raises(ValueError, match='padding'):
        efficientnet.create_model('b0', padding='valid')
    with pytest.raises(ValueError, match='depthwise_impl'):
        efficientnet.create_model('b0', depthwise_impl='cuda')
    with pytest.raises(ValueError, match='num_classes'):
        efficientnet.create_model('b0', num_classes=-1)
    with pytest.raises(ValueError, match='drop_path_rate'):
        efficientnet.create_model('b0', drop_path_rate=1.5)
    model = efficientnet.create_model('tiny')
    assert efficientnet.create_model('tiny').variant.name not in efficientnet.list_models()
    with pytest.raises(ValueError, match='rank 4'):
        model.init(jax.random.key(0), jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match='3 colour channels'):
        model.init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match='3 colour channels'):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))


def test_scaling_overrides_build_the_scaled_member():
    """create_model's width/depth/resolution overrides: B0 scaled by B4's coefficients is B4
    (19,341,616 trainable parameters in the paper's table), under its own name."""
    model = efficientnet.create_model('b0', width=1.4, depth=1.8, resolution=380)
    assert model.variant.name == 'efficientnet-b0-w1.4-d1.8'
    assert model.variant.resolution == 380
    assert model.variant.crop_fraction == pytest.approx(380 / 412)
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 380, 380, 3))))
    assert sum(x.size for x in jax.tree.leaves(v['params'])) == 19_341_616
    same = efficientnet.create_model('b0', resolution=256)
    assert same.variant.name == 'efficientnet-b0' and same.variant.width == 1.0
    with pytest.raises(ValueError, match='width must be a positive number'):
        efficientnet.create_model('b0', width=0)
    with pytest.raises(ValueError, match='resolution must be a positive int'):
        efficientnet.create_model('b0', resolution=22.5)


def _train_loss(model, variables, x, labels):
    """``params -> (loss, (logits, batch_stats))`` of a training-mode forward pass with dropout
    and stochastic depth drawn from a fixed key."""

    def loss_fn(params):
        logits, upd = model.apply(
            {'params': params, 'batch_stats': variables['batch_stats']},
            x,
            train=True,
            rngs={'dropout': jax.random.key(3)},
            mutable=['batch_stats'],
        )
        loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
        return loss, (logits, upd['batch_stats'])

    return loss_fn


@pytest.mark.slow  # two training-mode compiles: 19-26 s on 2 shared cores
def test_remat_keeps_parameters_and_gradients(tiny):
    """``remat=True`` rematerialises each block and changes nothing else: the same parameter
    tree (names and shapes: checkpoints and weight import/export are shared), and the same
    loss, logits, batch statistics and gradients (within float32 rounding) in a training step
    with dropout, stochastic depth and batch statistics. The tiny variant (width 0.25, depth
    0.5) has residual blocks, so stochastic depth is drawn inside the rematerialised blocks."""
    plain, v = tiny
    remat = efficientnet.create_model('tiny', num_classes=10, remat=True)
    with pytest.raises(ValueError, match='remat must be True or False'):
        efficientnet.create_model('tiny', remat='yes')
    assert any(s.has_residual and s.survival < 1 for s in remat.blocks)
    x = jax.random.normal(jax.random.key(0), (4, 48, 48, 3))
    labels = jnp.arange(4) % 10
    v_remat = jax.eval_shape(remat.init, jax.random.key(1), x[:1])
    paths = lambda t: [(jax.tree_util.keystr(k), a.shape) for k, a in jax.tree.leaves_with_path(t)]
    assert paths(v_remat) == paths(v)

    plain_loss, remat_loss = _train_loss(plain, v, x, labels), _train_loss(remat, v, x, labels)
    # Remat is in the program: one rematerialised call per block (none without it), so the
    # equalities below compare two different programs.
    count = lambda fn: sum(
        e.primitive.name in ('remat2', 'checkpoint') for e in jax.make_jaxpr(fn)(v['params']).eqns
    )
    assert (count(plain_loss), count(remat_loss)) == (0, len(remat.blocks))
    # Equal within float32 rounding, not bit for bit: remat puts an optimisation barrier
    # around each block, so XLA fuses and orders the float32 sums of the recomputed forward
    # and of the backward pass differently (measured: loss 1 ulp apart, gradients within
    # 2e-6 of the largest gradient). Another stochastic-depth draw moves them by O(1).
    step = lambda fn: jax.jit(jax.value_and_grad(fn, has_aux=True))(v['params'])
    (loss, (logits, stats)), grads = step(plain_loss)
    (loss_r, (logits_r, stats_r)), grads_r = step(remat_loss)
    for ours, ref in ((loss_r, loss), (logits_r, logits), (stats_r, stats), (grads_r, grads)):
        atol = 1e-5 * max(float(np.abs(a).max()) for a in jax.tree.leaves(ref))
        jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=atol), ours, ref)


def test_scan_runs_group_each_stages_repeats_behind_its_first_block():
    """Whatever the depth, a stage is its first block plus one run of its repeats, so the
    number of block bodies XLA compiles is at most two per stage (B0's 16 blocks form 12 runs,
    B7's 55 form 14); endpoints always end a run."""
    for name in ('b0', 'b7', 'lite4', 'tiny'):
        blocks = efficientnet.create_model(name).blocks
        ends = arch.endpoint_blocks(blocks)
        runs = scan_runs(blocks, ends)
        assert [b for run in runs for b in run] == blocks
        stages = sorted({b.stage for b in blocks})
        for s in stages:
            in_stage = [run for run in runs if run[0].stage == s]
            assert len(in_stage) <= 2 and len(in_stage[0]) == 1
            assert all(b.stage == s for r in in_stage for b in r)
        assert len(runs) <= 2 * len(stages)
        assert all(i == run[-1].index for run in runs for i in ends if i in {b.index for b in run})


@pytest.mark.slow  # four training-mode compiles of a small model: 1-2 minutes on 2 cores
def test_scanned_blocks_keep_variables_outputs_and_gradients():
    """``scan_blocks=True`` changes the program, not the model: initialisation gives the same
    per-block variables bit for bit (so checkpoints and weight files load either way),
    variables move between the two models in both directions with the same eval logits, and a
    training step with dropout gives the same loss, logits, batch statistics and gradients
    within float32 rounding, with remat too. With stochastic depth each scanned block draws
    the key it draws unscanned, so the same examples are dropped: a different draw moves the
    results by O(1); here they agree within 1e-3 (dividing by a traced rate instead of a
    constant rounds differently, and training-mode BatchNorm over 4 examples amplifies it).
    Depth 1.0 gives the tiny width stages of 2 and 3 repeats, each scanned."""
    make = lambda **kw: efficientnet.create_model('tiny', num_classes=10, depth=1.0, **kw)
    plain, scanned, both = make(), make(scan_blocks=True), make(scan_blocks=True, remat=True)
    with pytest.raises(ValueError, match='scan_blocks must be True, False or None'):
        efficientnet.create_model('tiny', scan_blocks=1)
    runs = scan_runs(plain.blocks, arch.endpoint_blocks(plain.blocks))
    long_runs = [r for r in runs if len(r) > 1]
    assert len(long_runs) >= 3 and all(b.has_residual and b.survival < 1 for b in long_runs[0])
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    labels = jnp.arange(4) % 10
    init = lambda m: jax.jit(m.init, compiler_options=dict(CPU_INIT_COMPILER_OPTIONS))
    v = init(plain)(jax.random.key(1), x[:1])
    v_scanned = init(scanned)(jax.random.key(1), x[:1])
    jax.tree.map(np.testing.assert_array_equal, v_scanned, v)
    assert jax.tree.structure(v_scanned) == jax.tree.structure(v)

    def close(ours, ref, rtol):
        atol = rtol * max(float(np.abs(a).max()) for a in jax.tree.leaves(ref))
        check = functools.partial(np.testing.assert_allclose, rtol=rtol, atol=atol)
        jax.tree.map(check, ours, ref)

    eval_plain, eval_scanned = (
        jax.jit(functools.partial(m.apply, train=False)) for m in (plain, scanned)
    )
    close(eval_scanned(v, x), eval_plain(v, x), 1e-6)  # unscanned variables, scanned model
    close(eval_plain(v_scanned, x), eval_scanned(v_scanned, x), 1e-6)  # and the other way
    # The train state's layout: each run of repeats stacked, converted back without loss; the
    # scanned model computes the same from it, the unscanned one refuses it in one line.
    stacked = efficientnet.stack_blocks(v, efficientnet.stacked_runs(scanned))
    assert [k for k in stacked['params'] if '_to_' in k] == [stacked_name(r) for r in long_runs]
    assert efficientnet.stacked_runs(plain) == []
    back = efficientnet.unstack_blocks(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(v)
    jax.tree.map(np.testing.assert_array_equal, back, v)
    close(eval_scanned(stacked, x), eval_plain(v, x), 1e-6)
    with pytest.raises(ValueError, match=r'stacked .*efficientnet.unstack_blocks'):
        plain.apply(stacked, x)

    step = lambda fn: jax.jit(jax.value_and_grad(fn, has_aux=True))(v['params'])
    count = lambda fn: sum(e.primitive.name == 'scan' for e in jax.make_jaxpr(fn)(v['params']).eqns)
    # Without stochastic depth, scanned and rematerialised: the same within float32 rounding.
    no_depth = [make(drop_path_rate=0.0), make(drop_path_rate=0.0, scan_blocks=True, remat=True)]
    losses = [_train_loss(m, v, x, labels) for m in no_depth]
    assert [count(fn) for fn in losses] == [0, len(long_runs)]  # one scan per long run
    close(step(losses[1]), step(losses[0]), 1e-5)
    # With it: each scanned block draws the key it draws unscanned.
    losses = [_train_loss(m, v, x, labels) for m in (plain, scanned, both)]
    assert [count(fn) for fn in losses] == [0, len(long_runs), len(long_runs)]
    close(step(losses[1]), step(losses[0]), 1e-3)
    # From the stacked layout: the same loss, and gradients and statistics stacked the same way.
    (loss_s, (logits_s, stats_s)), grads_s = jax.jit(
        jax.value_and_grad(_train_loss(scanned, stacked, x, labels), has_aux=True)
    )(stacked['params'])
    (loss_p, (logits_p, stats_p)), grads_p = step(losses[0])
    per_block = efficientnet.unstack_blocks
    close((loss_s, logits_s, per_block(stats_s), per_block(grads_s)),
          (loss_p, logits_p, stats_p, grads_p), 1e-3)  # fmt: skip
