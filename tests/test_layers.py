"""efficientnet/layers.py against independent implementations: the depthwise convolutions
(XLA, unrolled, the C++ CPU kernels) against each other and TensorFlow's and PyTorch's padding,
the pointwise and stem convolutions against autodiff and XLA, BatchNorm against Keras and
TensorFlow."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientnet import layers


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
