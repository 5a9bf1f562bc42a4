"""The architecture against docs/reference.md §1-3 and against independent implementations.

Logit parity with Keras and efficientnet_pytorch lives in test_weights_*.py; this file covers
the tables, the formulas, the layers and the module's behaviour.
"""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficientnet
from efficientnet import arch, layers
from efficientnet.model import drop_path

# docs/reference.md §1: (stem, stage out-channels, head, repeats, blocks, params).
REFERENCE_TABLE = {
    'b0': (32, (16, 24, 40, 80, 112, 192, 320), 1280, (1, 2, 2, 3, 3, 4, 1), 16, 5_288_548),
    'b1': (32, (16, 24, 40, 80, 112, 192, 320), 1280, (2, 3, 3, 4, 4, 5, 2), 23, 7_794_184),
    'b2': (32, (16, 24, 48, 88, 120, 208, 352), 1408, (2, 3, 3, 4, 4, 5, 2), 23, 9_109_994),
    'b3': (40, (24, 32, 48, 96, 136, 232, 384), 1536, (2, 3, 3, 5, 5, 6, 2), 26, 12_233_232),
    'b4': (48, (24, 32, 56, 112, 160, 272, 448), 1792, (2, 4, 4, 6, 6, 8, 2), 32, 19_341_616),
    'b5': (48, (24, 40, 64, 128, 176, 304, 512), 2048, (3, 5, 5, 7, 7, 9, 3), 39, 30_389_784),
    'b6': (56, (32, 40, 72, 144, 200, 344, 576), 2304, (3, 6, 6, 8, 8, 11, 3), 45, 43_040_704),
    'b7': (64, (32, 48, 80, 160, 224, 384, 640), 2560, (4, 7, 7, 10, 10, 13, 4), 55, 66_347_960),
    'b8': (72, (32, 56, 88, 176, 248, 424, 704), 2816, (4, 8, 8, 11, 11, 15, 4), 61, 87.4e6),
    'l2': (136, (72, 104, 176, 344, 480, 824, 1376), 5504, (6, 11, 11, 16, 16, 22, 6), 88,
           480.3e6),
}
REFERENCE_SCALING = {  # (width, depth, resolution, dropout)
    'b0': (1.0, 1.0, 224, 0.2), 'b1': (1.0, 1.1, 240, 0.2), 'b2': (1.1, 1.2, 260, 0.3),
    'b3': (1.2, 1.4, 300, 0.3), 'b4': (1.4, 1.8, 380, 0.4), 'b5': (1.6, 2.2, 456, 0.4),
    'b6': (1.8, 2.6, 528, 0.5), 'b7': (2.0, 3.1, 600, 0.5), 'b8': (2.2, 3.6, 672, 0.5),
    'l2': (4.3, 5.3, 800, 0.5), 'lite0': (1.0, 1.0, 224, 0.2), 'lite1': (1.0, 1.1, 240, 0.2),
    'lite2': (1.1, 1.2, 260, 0.3), 'lite3': (1.2, 1.4, 280, 0.3), 'lite4': (1.4, 1.8, 300, 0.3),
}
PAPER_FLOPS_B = {'b0': 0.39, 'b1': 0.70, 'b2': 1.0, 'b3': 1.8, 'b4': 4.2, 'b5': 9.9, 'b6': 19,
                 'b7': 37}


@pytest.fixture(scope='module')
def tiny():
    """The test-only tiny variant and one set of its variables (init compiles once per module:
    XLA's CPU compile of the per-parameter random draws dominates small-model start-up)."""
    model = efficientnet.create_model('tiny', num_classes=10)
    x = jnp.zeros((1, 32, 32, 3))
    return model, jax.jit(model.init)(jax.random.key(1), x)


def param_count(model, res=32):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, res, res, 3))))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes['params']))


@pytest.mark.parametrize('name', list(REFERENCE_TABLE))
def test_architecture_table(name):
    stem, outs, head, repeats, blocks, params = REFERENCE_TABLE[name]
    v = arch.get_variant(name)
    assert (v.width, v.depth, v.resolution, v.dropout) == REFERENCE_SCALING[name]
    assert arch.stem_channels(v) == stem
    assert arch.head_channels(v) == head
    assert tuple(arch.stage_repeats(v)) == repeats
    specs = arch.build_blocks(v)
    assert len(specs) == blocks
    assert tuple(sorted({b.out_channels for b in specs})) == tuple(sorted(outs))
    got = param_count(efficientnet.create_model(name))
    if isinstance(params, int):
        assert got == params  # exact, B0-B7
    else:
        assert abs(got - params) / params < 0.001  # docs/reference.md §1 gives B8 and L2 to 0.1M


def test_b0_block_table_and_se_channels():
    specs = arch.build_blocks(arch.get_variant('b0'))
    stage_first = {}
    for b in specs:
        stage_first.setdefault(b.stage, b)
    # docs/reference.md §2: kernel, stride, expand, in, out of each stage's first block.
    table = [(3, 1, 1, 32, 16), (3, 2, 6, 16, 24), (5, 2, 6, 24, 40), (3, 2, 6, 40, 80),
             (5, 1, 6, 80, 112), (5, 2, 6, 112, 192), (3, 1, 6, 192, 320)]
    for s, row in enumerate(table):
        b = stage_first[s]
        assert (b.kernel, b.stride, b.expand, b.in_channels, b.out_channels) == row
    for b in specs:
        if b is not stage_first[b.stage]:
            assert b.stride == 1 and b.in_channels == b.out_channels and b.has_residual
    # SE reduces from the block's *input* channels: stage 2 block 1 has 16 in, 96 expanded, r=4.
    b = stage_first[1]
    assert (b.in_channels, b.expanded_channels, b.se_channels) == (16, 96, 4)
    assert specs[0].se_channels == 8


def test_round_filters_formula():
    assert arch.round_filters(32, 1.0) == 32
    assert arch.round_filters(32, 1.1) == 32   # 35.2 -> 32 (not below 0.9 * 35.2)
    assert arch.round_filters(40, 1.1) == 48   # 44 -> int(48) // 8 * 8 = 48
    assert arch.round_filters(24, 1.4) == 32   # 33.6 -> 32
    assert arch.round_filters(1280, 4.3) == 5504
    assert arch.round_filters(16, 0.1) == 8    # floor at the divisor
    assert arch.round_filters(12, 1.0) == 16   # 12 -> 16 rounds half up
    assert arch.round_repeats(3, 1.1) == 4 and arch.round_repeats(1, 3.1) == 4


def test_lite_variants():
    for i, (params_m, res) in enumerate([(4.652008, 224), (None, 240), (None, 260), (None, 280),
                                         (13.006568, 300)]):
        v = arch.get_variant(f'lite{i}')
        assert v.activation == 'relu6' and not v.use_se and v.resolution == res
        assert arch.stem_channels(v) == 32 and arch.head_channels(v) == 1280
        reps = arch.stage_repeats(v)
        assert reps[0] == 1 and reps[-1] == 1  # first and last stages unscaled
        assert all(b.se_channels == 0 for b in arch.build_blocks(v))
        if params_m:  # docs/reference.md §1: lite0 4.7M, lite4 13.0M
            assert round(param_count(efficientnet.create_model(f'lite{i}')) / 1e6, 1) == round(
                params_m, 1)
    assert efficientnet.model_info('lite0')['mean'] == (127.0,) * 3
    assert efficientnet.model_info('lite0')['std'] == (128.0,) * 3


def _torch_macs(name, res):
    """Multiply-adds of efficientnet_pytorch's network, counted by forward hooks on meta tensors."""
    torch = pytest.importorskip('torch')
    from efficientnet_pytorch import EfficientNet

    with torch.device('meta'):
        net = EfficientNet.from_name(f'efficientnet-{name}').eval()
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            total[0] += out.numel() * mod.in_channels // mod.groups * k
        elif isinstance(mod, torch.nn.Linear):
            total[0] += out.numel() * mod.in_features

    for m in net.modules():
        m.register_forward_hook(hook)
    with torch.no_grad():
        net(torch.zeros(1, 3, res, res, device='meta'))
    return total[0]


@pytest.mark.parametrize('name', list(PAPER_FLOPS_B))
def test_flops(name):
    from efficientnet.summary import count_flops

    res = arch.get_variant(name).resolution
    ours = count_flops(name)
    # An independent count over an independent implementation agrees to the multiply-add.
    assert ours == _torch_macs(name, res)
    rel = ours / (PAPER_FLOPS_B[name] * 1e9) - 1
    if name in ('b4', 'b5'):
        # The paper's 4.2B and 9.9B sit below what the published B4/B5 networks compute at 380
        # and 456 px (4.39B and 10.27B, confirmed above by efficientnet_pytorch; thop and other
        # counters report the same gap). We reproduce the networks, so these two are 3.7-4.6%
        # above the paper's rounded figures.
        assert 0.03 < rel < 0.05
    else:
        assert abs(rel) < 0.03


def test_summary_json_cli():
    import json

    out = subprocess.run([sys.executable, '-m', 'efficientnet.summary', '--json', '--models',
                          'b0', 'lite0'], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    assert rows['efficientnet-b0']['params'] == 5_288_548
    assert rows['efficientnet-b0']['resolution'] == 224
    assert abs(rows['efficientnet-b0']['flops'] - 0.386e9) < 1e6
    bad = subprocess.run([sys.executable, '-m', 'efficientnet.summary', '--models', 'b9'],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and 'unknown EfficientNet variant' in bad.stderr


@pytest.mark.parametrize('impl', ['unrolled', 'cpu_kernel'])
@pytest.mark.parametrize('kernel', [3, 5])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('padding', ['same', 'symmetric'])
@pytest.mark.parametrize('size', [(9, 9), (10, 7)])
def test_depthwise_implementations_agree(impl, kernel, stride, padding, size):
    # 88 channels: the C++ kernel's 64-wide and 16-wide register blocks and its scalar tail.
    channels = 88 if impl == 'cpu_kernel' else 6
    kx, kw = jax.random.split(jax.random.key(kernel * 10 + stride))
    x = jax.random.normal(kx, (2, *size, channels))
    w = jax.random.normal(kw, (kernel, kernel, 1, channels))

    def f(impl):
        return lambda x, w: layers.depthwise_conv(x, w, stride, padding, impl)

    y_xla, y_impl = f('xla')(x, w), jax.jit(f(impl))(x, w)
    assert y_xla.shape == y_impl.shape
    np.testing.assert_allclose(y_impl, y_xla, rtol=1e-5, atol=1e-5)
    g = lambda impl: jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(f(impl)(x, w))),
                                      argnums=(0, 1)))(x, w)
    for a, b in zip(g('xla'), g(impl)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_cpu_kernels_are_used_on_cpu_and_can_be_turned_off():
    assert layers.resolve_depthwise_impl('auto') == 'cpu_kernel'  # these tests run on CPU
    assert layers.resolve_depthwise_impl('auto', jnp.bfloat16) == 'unrolled'  # float32 only
    jaxpr = str(jax.make_jaxpr(lambda x, w: layers.depthwise_conv(x, w, 1, 'same', 'auto'))(
        jnp.ones((1, 5, 5, 4)), jnp.ones((3, 3, 1, 4))))
    assert 'efficientnet_cpu_depthwise_forward' in jaxpr
    code = ('from efficientnet import layers; r = layers.resolve_depthwise_impl; '
            "print(r('auto'), r('cpu_kernel'))")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         env={**os.environ, 'EFFICIENTNET_CPU_KERNELS': '0'})
    assert out.stdout.split() == ['unrolled', 'unrolled'], out.stderr


@pytest.mark.parametrize('cin,cout', [(8, 24), (24, 8)])
def test_pointwise_conv_gradients_match_autodiff(cin, cout):
    kx, kw = jax.random.split(jax.random.key(cin))
    x = jax.random.normal(kx, (2, 5, 6, cin))
    w = jax.random.normal(kw, (cin, cout))
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
    ours = jax.jit(jax.grad(loss(layers.pointwise_conv), argnums=(0, 1)))(x, w)
    ref = jax.grad(loss(jnp.dot), argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('padding', ['same', 'symmetric'])
def test_stem_conv_as_patches_matches_convolution(padding):
    """On CPU a 3x3 conv over 3 channels runs as gathered patches times a matrix; its value and
    gradients equal XLA's convolution."""
    kx, kw = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (2, 11, 10, 3))
    w = jax.random.normal(kw, (3, 3, 3, 8))
    conv = layers.Conv2D(8, 3, 2, padding=padding)

    def ref(x, w):
        return jax.lax.conv_general_dilated(x, w, (2, 2), layers._pads(x, 3, 2, padding),
                                            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    ours = lambda x, w: conv.apply({'params': {'kernel': w}}, x)
    np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
    g = lambda f: jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))(x, w)
    for a, b in zip(g(ours), g(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_same_padding_matches_tensorflow():
    tf = pytest.importorskip('tensorflow')
    rng = np.random.default_rng(0)
    for size, k, s in [(10, 3, 2), (9, 5, 2), (8, 5, 1), (7, 3, 2)]:
        x = rng.normal(size=(1, size, size, 4)).astype(np.float32)
        w = rng.normal(size=(k, k, 4, 1)).astype(np.float32)
        ref = tf.nn.depthwise_conv2d(x, w, (1, s, s, 1), 'SAME').numpy()
        for impl in ('xla', 'unrolled', 'cpu_kernel'):
            ours = layers.depthwise_conv(jnp.asarray(x), jnp.asarray(w.transpose(0, 1, 3, 2)), s,
                                         'same', impl)
            np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
        wc = rng.normal(size=(k, k, 4, 3)).astype(np.float32)
        ref = tf.nn.conv2d(x, wc, s, 'SAME').numpy()
        conv = layers.Conv2D(3, k, s)
        ours = conv.apply({'params': {'kernel': wc}}, x)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_symmetric_padding_matches_torch():
    torch = pytest.importorskip('torch')
    rng = np.random.default_rng(1)
    for size, k, s in [(10, 3, 2), (9, 5, 2), (8, 3, 1)]:
        x = rng.normal(size=(1, size, size, 4)).astype(np.float32)
        w = rng.normal(size=(k, k, 1, 4)).astype(np.float32)
        ref = torch.nn.functional.conv2d(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                         torch.from_numpy(w.transpose(3, 2, 0, 1)), stride=s,
                                         padding=k // 2, groups=4).numpy().transpose(0, 2, 3, 1)
        for impl in ('xla', 'unrolled', 'cpu_kernel'):
            ours = layers.depthwise_conv(jnp.asarray(x), jnp.asarray(w), s, 'symmetric', impl)
            np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_model_depthwise_impls_agree_end_to_end(tiny):
    _, v = tiny
    x = jax.random.normal(jax.random.key(0), (2, 40, 40, 3))
    a = efficientnet.create_model('tiny', num_classes=10, depthwise_impl='xla')
    for impl in ('unrolled', 'cpu_kernel'):
        b = efficientnet.create_model('tiny', num_classes=10, depthwise_impl=impl)
        np.testing.assert_allclose(jax.jit(a.apply)(v, x), jax.jit(b.apply)(v, x), rtol=1e-4,
                                   atol=1e-5)


def test_stochastic_depth_ramp():
    specs = arch.build_blocks(arch.get_variant('b0'))
    n = len(specs)
    for b in specs:
        assert b.survival == pytest.approx(1 - 0.2 * b.index / n)
    assert specs[0].survival == 1.0
    assert specs[-1].survival == pytest.approx(0.8125)
    b7 = arch.build_blocks(arch.get_variant('b7'))
    assert b7[-1].survival == pytest.approx(1 - 0.2 * 54 / 55)


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
    no_sd = efficientnet.create_model('tiny', num_classes=10, dropout_rate=0.0,
                                      drop_path_rate=0.0)
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


def test_batchnorm_matches_keras():
    keras = pytest.importorskip('keras')
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(8, 5, 5, 4)).astype(np.float32)
    ref = keras.layers.BatchNormalization(momentum=0.99, epsilon=1e-3)
    ref.build(x.shape)
    gamma, beta = rng.normal(size=4).astype(np.float32), rng.normal(size=4).astype(np.float32)
    ref.set_weights([gamma, beta, np.zeros(4, np.float32), np.ones(4, np.float32)])
    y_ref = np.asarray(ref(x, training=True))
    ours = layers.BatchNorm(use_running_average=False)
    v = {'params': {'scale': gamma, 'bias': beta},
         'batch_stats': {'mean': np.zeros(4, np.float32), 'var': np.ones(4, np.float32)}}
    y, upd = ours.apply(v, x, mutable=['batch_stats'])
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(upd['batch_stats']['mean'], ref.moving_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(upd['batch_stats']['var'], ref.moving_variance.numpy(), rtol=1e-5)
    # Inference uses the moving statistics.
    v2 = {'params': v['params'], 'batch_stats': upd['batch_stats']}
    np.testing.assert_allclose(layers.BatchNorm().apply(v2, x), ref(x, training=False),
                               rtol=1e-4, atol=1e-4)


def test_batchnorm_gradients_match_tensorflow():
    """The hand-written BatchNorm backward pass against TensorFlow's autodiff of Keras's layer."""
    keras = pytest.importorskip('keras')
    tf = pytest.importorskip('tensorflow')
    rng = np.random.default_rng(3)
    x = rng.normal(1.0, 2.0, size=(6, 4, 4, 5)).astype(np.float32)
    w = rng.normal(size=x.shape).astype(np.float32)  # a loss that weights every output
    gamma, beta = rng.normal(size=5).astype(np.float32), rng.normal(size=5).astype(np.float32)
    ref = keras.layers.BatchNormalization(momentum=0.99, epsilon=1e-3)
    ref.build(x.shape)
    ref.set_weights([gamma, beta, np.zeros(5, np.float32), np.ones(5, np.float32)])
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(tf.sin(ref(xt, training=True)) * w)
    gx_ref, gg_ref, gb_ref = tape.gradient(loss, [xt, ref.gamma, ref.beta])

    def ours(x, scale, bias):
        v = {'params': {'scale': scale, 'bias': bias},
             'batch_stats': {'mean': jnp.zeros(5), 'var': jnp.ones(5)}}
        y, _ = layers.BatchNorm(use_running_average=False).apply(v, x, mutable=['batch_stats'])
        return jnp.sum(jnp.sin(y) * w)

    gx, gg, gb = jax.grad(ours, argnums=(0, 1, 2))(x, gamma, beta)
    np.testing.assert_allclose(gx, gx_ref.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gg, gg_ref.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gb, gb_ref.numpy(), rtol=1e-4, atol=1e-5)


def test_batchnorm_groups():
    x = jax.random.normal(jax.random.key(0), (8, 3, 3, 5)) * 2 + 1
    v = layers.BatchNorm(use_running_average=False).init(jax.random.key(1), x)
    whole = lambda x: layers.BatchNorm(use_running_average=False).apply(
        v, x, mutable=['batch_stats'])
    grouped, upd = layers.BatchNorm(use_running_average=False, group_size=4).apply(
        v, x, mutable=['batch_stats'])
    (a, ua), (b, ub) = whole(x[:4]), whole(x[4:])
    np.testing.assert_allclose(grouped, np.concatenate([a, b]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upd['batch_stats']['mean'],
                               (ua['batch_stats']['mean'] + ub['batch_stats']['mean']) / 2,
                               rtol=1e-6)
    # Gradients of the grouped layer equal those of each group normalised on its own.
    w = jax.random.normal(jax.random.key(2), x.shape)
    loss = lambda bn, x: jnp.sum(bn.apply(v, x, mutable=['batch_stats'])[0] * w[:len(x)])
    g_grouped = jax.grad(loss, argnums=1)(
        layers.BatchNorm(use_running_average=False, group_size=4), x)
    whole_bn = layers.BatchNorm(use_running_average=False)
    g_a = jax.grad(lambda x: jnp.sum(whole_bn.apply(v, x, mutable=['batch_stats'])[0] * w[:4]))(
        x[:4])
    g_b = jax.grad(lambda x: jnp.sum(whole_bn.apply(v, x, mutable=['batch_stats'])[0] * w[4:]))(
        x[4:])
    np.testing.assert_allclose(g_grouped, np.concatenate([g_a, g_b]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match='groups of 3'):
        layers.BatchNorm(use_running_average=False, group_size=3).apply(
            v, x, mutable=['batch_stats'])


def test_bfloat16_inference_close_to_float32(tiny):
    x = jax.random.normal(jax.random.key(0), (4, 64, 64, 3))
    f32 = efficientnet.create_model('tiny', num_classes=10)
    bf16 = efficientnet.create_model('tiny', num_classes=10, dtype=jnp.bfloat16)
    v = tiny[1]
    # Non-trivial BN statistics so activations are not all near zero.
    stats = jax.jit(lambda v: f32.apply(v, x, train=True, rngs={'dropout': jax.random.key(2)},
                                        mutable=['batch_stats'])[1]['batch_stats'])(v)
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
    _, upd = jax.jit(lambda v: model.apply(v, x, train=True, rngs={'dropout': jax.random.key(2)},
                                           mutable=['batch_stats']))(v)
    before = v['batch_stats']['stem_bn']['mean']
    after = upd['batch_stats']['stem_bn']['mean']
    assert not np.allclose(before, after)
    with pytest.raises(Exception, match='dropout'):
        jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=['batch_stats']), v)


def test_api_and_bad_input():
    assert efficientnet.list_models()[0] == 'efficientnet-b0'
    assert len(efficientnet.list_models()) == 15
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
