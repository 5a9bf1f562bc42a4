"""efficientnet/layers.py against independent implementations: the depthwise convolutions
(XLA, unrolled, the C++ CPU kernels) against each other and TensorFlow's and PyTorch's padding,
the pointwise and stem convolutions against autodiff and XLA, BatchNorm (with its activation,
and with the squeeze-excite after it: the fused CPU kernels and the XLA form) against Keras and
TensorFlow."""

import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientnet import cpu_kernels, layers
from efficientnet.model import SqueezeExcite


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
    g = lambda impl: jax.jit(
        jax.grad(lambda x, w: jnp.sum(jnp.sin(f(impl)(x, w))), argnums=(0, 1))
    )(x, w)
    for a, b in zip(g('xla'), g(impl)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_cpu_kernels_are_used_on_cpu_and_can_be_turned_off():
    assert layers.resolve_depthwise_impl('auto') == 'cpu_kernel'  # these tests run on CPU
    assert layers.resolve_depthwise_impl('auto', jnp.bfloat16) == 'unrolled'  # float32 only
    jaxpr = str(
        jax.make_jaxpr(lambda x, w: layers.depthwise_conv(x, w, 1, 'same', 'auto'))(
            jnp.ones((1, 5, 5, 4)), jnp.ones((3, 3, 1, 4))
        )
    )
    assert 'efficientnet_cpu_depthwise_forward' in jaxpr
    code = (
        'from efficientnet import layers; r = layers.resolve_depthwise_impl; '
        "print(r('auto'), r('cpu_kernel'))"
    )
    out = subprocess.run(
        [sys.executable, '-c', code],
        capture_output=True,
        text=True,
        env={**os.environ, 'EFFICIENTNET_CPU_KERNELS': '0'},
    )
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
        return jax.lax.conv_general_dilated(
            x, w, (2, 2), layers._pads(x, 3, 2, padding), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
        )

    ours = lambda x, w: conv.apply({'params': {'kernel': w}}, x)
    np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
    g = lambda f: jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))(x, w)
    for a, b in zip(g(ours), g(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    'kernel,padding,size', [(3, 'same', 9), (5, 'same', 8), (2, 'same', 7), (3, 'symmetric', 6)]
)
def test_stride1_conv_gradients_match_autodiff_and_stay_canonical_in_a_scan(kernel, padding, size):
    """On CPU a stride-1 convolution's backward pass is written out
    (``layers.conv_stride1_cpu``): the gradients equal autodiff's, and inside a scan (a scanned
    block) every convolution of the compiled gradient keeps the NHWC/HWIO form XLA:CPU's fast
    convolution runs. Autodiff's own gradient there has other forms, 9-21x slower."""
    kx, kw = jax.random.split(jax.random.key(kernel))
    x = jax.random.normal(kx, (2, size, size, 24))  # kernel**2 * 24 > 64: not the stem's path
    w = jax.random.normal(kw, (3, kernel, kernel, 24, 24)) * 0.1
    conv = layers.Conv2D(24, kernel, 1, padding=padding)
    ours = lambda x, k: conv.apply({'params': {'kernel': k}}, x)

    def ref(x, k):
        pads = layers._pads(x, kernel, 1, padding)
        return jax.lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=layers._NHWC)

    np.testing.assert_allclose(ours(x, w[0]), ref(x, w[0]), rtol=1e-5, atol=1e-5)
    g = lambda f: jax.grad(lambda x, k: jnp.sum(jnp.sin(f(x, k))), argnums=(0, 1))(x, w[0])
    for a, b in zip(g(ours), g(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    def scanned(f):
        body = lambda c, k: (jnp.tanh(f(c, k)) + c, None)
        return lambda w, x: jax.lax.scan(body, x, w)[0].sum()

    def labels(f):
        hlo = jax.jit(jax.grad(scanned(f), argnums=(0, 1))).lower(w, x).compile().as_text()
        return {m for m in re.findall(r'convolution\(.*?dim_labels=(\S+?),', hlo)}

    assert labels(ours) == {'b01f_01io->b01f'}
    assert labels(ref) != {'b01f_01io->b01f'}  # what the written-out gradient avoids
    for a, b in zip(
        jax.grad(scanned(ours), argnums=(0, 1))(w, x), jax.grad(scanned(ref), argnums=(0, 1))(w, x)
    ):  # three blocks deep: float32 rounding of differently ordered sums, relative to the scale
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


def test_same_padding_matches_tensorflow():
    tf = pytest.importorskip('tensorflow')
    rng = np.random.default_rng(0)
    for size, k, s in [(10, 3, 2), (9, 5, 2), (8, 5, 1), (7, 3, 2)]:
        x = rng.normal(size=(1, size, size, 4)).astype(np.float32)
        w = rng.normal(size=(k, k, 4, 1)).astype(np.float32)
        ref = tf.nn.depthwise_conv2d(x, w, (1, s, s, 1), 'SAME').numpy()
        for impl in ('xla', 'unrolled', 'cpu_kernel'):
            ours = layers.depthwise_conv(
                jnp.asarray(x), jnp.asarray(w.transpose(0, 1, 3, 2)), s, 'same', impl
            )
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
        ref = (
            torch.nn.functional.conv2d(
                torch.from_numpy(x.transpose(0, 3, 1, 2)),
                torch.from_numpy(w.transpose(3, 2, 0, 1)),
                stride=s,
                padding=k // 2,
                groups=4,
            )
            .numpy()
            .transpose(0, 2, 3, 1)
        )
        for impl in ('xla', 'unrolled', 'cpu_kernel'):
            ours = layers.depthwise_conv(jnp.asarray(x), jnp.asarray(w), s, 'symmetric', impl)
            np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


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
    v = {
        'params': {'scale': gamma, 'bias': beta},
        'batch_stats': {'mean': np.zeros(4, np.float32), 'var': np.ones(4, np.float32)},
    }
    y, upd = ours.apply(v, x, mutable=['batch_stats'])
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(upd['batch_stats']['mean'], ref.moving_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(upd['batch_stats']['var'], ref.moving_variance.numpy(), rtol=1e-5)
    # Inference uses the moving statistics.
    v2 = {'params': v['params'], 'batch_stats': upd['batch_stats']}
    np.testing.assert_allclose(
        layers.BatchNorm().apply(v2, x), ref(x, training=False), rtol=1e-4, atol=1e-4
    )


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
        v = {
            'params': {'scale': scale, 'bias': bias},
            'batch_stats': {'mean': jnp.zeros(5), 'var': jnp.ones(5)},
        }
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
        v, x, mutable=['batch_stats']
    )
    grouped, upd = layers.BatchNorm(use_running_average=False, group_size=4).apply(
        v, x, mutable=['batch_stats']
    )
    (a, ua), (b, ub) = whole(x[:4]), whole(x[4:])
    np.testing.assert_allclose(grouped, np.concatenate([a, b]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        upd['batch_stats']['mean'],
        (ua['batch_stats']['mean'] + ub['batch_stats']['mean']) / 2,
        rtol=1e-6,
    )
    # Gradients of the grouped layer equal those of each group normalised on its own.
    w = jax.random.normal(jax.random.key(2), x.shape)
    loss = lambda bn, x: jnp.sum(bn.apply(v, x, mutable=['batch_stats'])[0] * w[: len(x)])
    g_grouped = jax.grad(loss, argnums=1)(
        layers.BatchNorm(use_running_average=False, group_size=4), x
    )
    whole_bn = layers.BatchNorm(use_running_average=False)
    g_a = jax.grad(lambda x: jnp.sum(whole_bn.apply(v, x, mutable=['batch_stats'])[0] * w[:4]))(
        x[:4]
    )
    g_b = jax.grad(lambda x: jnp.sum(whole_bn.apply(v, x, mutable=['batch_stats'])[0] * w[4:]))(
        x[4:]
    )
    np.testing.assert_allclose(g_grouped, np.concatenate([g_a, g_b]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match='groups of 3'):
        layers.BatchNorm(use_running_average=False, group_size=3).apply(
            v, x, mutable=['batch_stats']
        )


@pytest.fixture(params=['cpu_kernels', 'xla'])
def bn_form(request, monkeypatch):
    """Each BatchNorm test below runs twice: with the fused C++ kernels (the CPU default in
    float32) and with them turned off (the XLA form every other backend runs)."""
    if request.param == 'xla':
        monkeypatch.setattr(cpu_kernels, 'usable', lambda dtype: False)
    else:
        assert cpu_kernels.usable(jnp.float32)
    return request.param


def _tf_batch_norm(tf, x, gamma, beta, groups):
    """Training-mode BatchNorm in TensorFlow ops, each group of examples on its own statistics;
    returns the output and the per-group means and variances."""
    outs, means, variances = [], [], []
    for part in tf.split(x, groups):
        mean, var = tf.nn.moments(part, axes=[0, 1, 2])
        outs.append(tf.nn.batch_normalization(part, mean, var, beta, gamma, 1e-3))
        means.append(mean)
        variances.append(var)
    return tf.concat(outs, 0), tf.reduce_mean(means, 0), tf.reduce_mean(variances, 0)


@pytest.mark.parametrize('activation', [None, 'swish', 'relu', 'relu6'])
@pytest.mark.parametrize('group_size', [None, 3])
def test_batchnorm_activation_matches_tensorflow(bn_form, activation, group_size):
    """BatchNorm(activation=...) in training: output, moving statistics and the gradients of x,
    scale and bias against TensorFlow's ops and autodiff. 40 channels: the kernels' whole
    16-lane blocks and a tail."""
    tf = pytest.importorskip('tensorflow')
    rng = np.random.default_rng(7)
    x = rng.normal(1.5, 2.0, size=(6, 5, 4, 40)).astype(np.float32)
    w = rng.normal(size=x.shape).astype(np.float32)
    gamma, beta = rng.normal(size=40).astype(np.float32), rng.normal(size=40).astype(np.float32)
    groups = 6 // (group_size or 6)
    tf_act = {None: tf.identity, 'swish': tf.nn.swish, 'relu': tf.nn.relu, 'relu6': tf.nn.relu6}
    xt, gt, bt = tf.constant(x), tf.constant(gamma), tf.constant(beta)
    with tf.GradientTape() as tape:
        tape.watch([xt, gt, bt])
        y_ref, mean_ref, var_ref = _tf_batch_norm(tf, xt, gt, bt, groups)
        y_ref = tf_act[activation](y_ref)
        loss = tf.reduce_sum(tf.sin(y_ref) * w)
    grads_ref = tape.gradient(loss, [xt, gt, bt])

    bn = layers.BatchNorm(use_running_average=False, group_size=group_size, activation=activation)
    stats = {'mean': jnp.zeros(40), 'var': jnp.ones(40)}

    def ours(x, scale, bias):
        v = {'params': {'scale': scale, 'bias': bias}, 'batch_stats': stats}
        y, upd = bn.apply(v, x, mutable=['batch_stats'])
        return jnp.sum(jnp.sin(y) * w), (y, upd['batch_stats'])

    (_, (y, upd)), grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True))(
        x, gamma, beta
    )
    np.testing.assert_allclose(y, y_ref.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(upd['mean'], 0.01 * mean_ref.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(upd['var'], 0.99 + 0.01 * var_ref.numpy(), rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads_ref):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-4)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda *a: ours(*a)[0]))(x, gamma, beta))
    assert ('efficientnet_cpu_act_grad_sums' in jaxpr) == (bn_form == 'cpu_kernels')


@pytest.mark.parametrize('group_size', [None, 2])
def test_batchnorm_swish_squeeze_excite_matches_tensorflow(bn_form, group_size):
    """MBConv's depthwise BatchNorm, swish and squeeze-excite (``BatchNorm(...)(x,
    squeeze_excite=...)``, one custom gradient on CPU) against the same computation in
    TensorFlow: the output, the moving statistics and every gradient (x, BatchNorm's scale
    and bias, both 1x1 convolutions' kernels and biases)."""
    tf = pytest.importorskip('tensorflow')
    rng = np.random.default_rng(11)
    n, c, r = 4, 40, 10
    x = rng.normal(0.5, 2.0, size=(n, 6, 5, c)).astype(np.float32)
    w = rng.normal(size=x.shape).astype(np.float32)
    p = {
        'scale': rng.normal(size=c),
        'bias': rng.normal(size=c),
        'wr': rng.normal(size=(c, r)) * 0.3,
        'br': rng.normal(size=r) * 0.1,
        'we': rng.normal(size=(r, c)) * 0.3,
        'be': rng.normal(size=c) * 0.1,
    }
    p = {k: v.astype(np.float32) for k, v in p.items()}
    groups = n // (group_size or n)
    tp = {k: tf.constant(v) for k, v in p.items()}
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch([xt, *tp.values()])
        y, mean_ref, var_ref = _tf_batch_norm(tf, xt, tp['scale'], tp['bias'], groups)
        y = tf.nn.swish(y)
        s = tf.nn.swish(tf.reduce_mean(y, axis=[1, 2]) @ tp['wr'] + tp['br'])
        y_ref = y * tf.sigmoid(s @ tp['we'] + tp['be'])[:, None, None, :]
        loss = tf.reduce_sum(tf.sin(y_ref) * w)
    grads_ref = tape.gradient(loss, [xt, *tp.values()])

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            se = SqueezeExcite(r, 'swish', name='se')
            bn = layers.BatchNorm(
                use_running_average=False, group_size=group_size, activation='swish', name='bn'
            )
            return bn(x, squeeze_excite=se)

    stats = {'bn': {'mean': jnp.zeros(c), 'var': jnp.ones(c)}}

    def ours(x, q):
        params = {
            'bn': {'scale': q['scale'], 'bias': q['bias']},
            'se': {
                'reduce': {'kernel': q['wr'][None, None], 'bias': q['br']},
                'expand': {'kernel': q['we'][None, None], 'bias': q['be']},
            },
        }
        y, upd = Block().apply({'params': params, 'batch_stats': stats}, x, mutable=['batch_stats'])
        return jnp.sum(jnp.sin(y) * w), (y, upd['batch_stats']['bn'])

    (_, (y, upd)), (gx, gp) = jax.jit(jax.value_and_grad(ours, argnums=(0, 1), has_aux=True))(x, p)
    np.testing.assert_allclose(y, y_ref.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(upd['mean'], 0.01 * mean_ref.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(upd['var'], 0.99 + 0.01 * var_ref.numpy(), rtol=1e-5, atol=1e-6)
    for a, b in zip([gx, *(gp[k] for k in p)], grads_ref):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-4)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda *a: ours(*a)[0]))(x, p))
    assert ('efficientnet_cpu_act_grad_sums' in jaxpr) == (bn_form == 'cpu_kernels')
