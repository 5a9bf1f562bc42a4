"""Kernels for XLA's CPU backend (XLA FFI custom calls, C++): the depthwise convolution, and
training-mode BatchNorm fused with its activation (and with the squeeze-excite after it).

XLA:CPU runs a grouped convolution, and the reductions of the depthwise weight gradient, far
below what the hardware allows; ``csrc/cpu_kernels.cc`` does the same arithmetic in one
vectorised pass per direction. Training-mode BatchNorm, the activation after it and
squeeze-excite were about a dozen memory passes over each activation in XLA:CPU's program
(reductions, normalisation, activation, pooling, gating and their gradients); the kernels read
the activations twice each way (three times forward with squeeze-excite). They run on XLA's
own thread pool.

The shared library is built with the system C++ compiler against the XLA FFI headers that ship
with jaxlib:

    python -m efficientnet.cpu_kernels          # build (``make setup`` runs it) and self-check

and, when missing, built on first use (a few seconds). Where no compiler is available the
kernels are reported unavailable: ``depthwise_impl='auto'`` falls back to the unrolled XLA
form and BatchNorm to its XLA form; nothing else changes.

The custom calls carry no sharding rule: under jit over several devices XLA gathers their
operands (results stay correct; the multi-device CPU meshes of the tests are the only place
that happens).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import subprocess
import sys
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc', 'cpu_kernels.cc')
_TARGETS = {
    'depthwise_forward': 'EfficientNetDepthwiseForward',
    'depthwise_backward': 'EfficientNetDepthwiseBackward',
    'bn_stats': 'EfficientNetBnStats',
    'affine_act': 'EfficientNetAffineAct',
    'affine_act_pool': 'EfficientNetAffineActPool',
    'act_grad_sums': 'EfficientNetActGradSums',
    'bn_act_dx': 'EfficientNetBnActDx',
}
# The activations the BatchNorm kernels apply (None: none), as csrc/cpu_kernels.cc numbers them.
ACTIVATIONS = {None: 0, 'swish': 1, 'relu': 2, 'relu6': 3}
_PREFIX = 'efficientnet_cpu_'
_lock = threading.Lock()
_state: dict = {}


def library_path() -> str:
    """Where the compiled kernels live: next to the source, or under $EFFICIENTNET_KERNEL_DIR
    (for read-only installs). The file name carries the jaxlib version (the FFI headers are
    compiled in) and a hash of the source, so an edited source is rebuilt."""
    import hashlib

    import jaxlib

    with open(_SOURCE, 'rb') as f:
        digest = hashlib.sha1(f.read()).hexdigest()[:12]
    directory = os.environ.get('EFFICIENTNET_KERNEL_DIR') or os.path.dirname(_SOURCE)
    return os.path.join(directory, f'_cpu_kernels_jaxlib{jaxlib.__version__}_{digest}.so')


def build(force: bool = False) -> str:
    """Compiles the kernels (atomically: a concurrent build or a failure never leaves a
    half-written library). Returns the library path; raises RuntimeError with the compiler's
    message on failure."""
    path = library_path()
    if os.path.exists(path) and not force:
        return path
    cxx = os.environ.get('CXX', 'c++')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(path))
    os.close(fd)
    cmd = [
        cxx,
        '-O3',
        '-march=native',
        '-std=c++17',
        '-shared',
        '-fPIC',
        '-w',
        '-I',
        jax.ffi.include_dir(),
        _SOURCE,
        '-o',
        tmp,
        '-lpthread',
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        os.remove(tmp)
        raise RuntimeError(f'no C++ compiler ({cxx}): {e}') from e
    if proc.returncode:
        os.remove(tmp)
        raise RuntimeError(f'building {_SOURCE} failed:\n{proc.stderr[-2000:]}')
    os.replace(tmp, path)
    return path


def available() -> bool:
    """True when the kernels are loaded and registered with XLA (building them if needed).
    Set EFFICIENTNET_CPU_KERNELS=0 to turn them off."""
    if os.environ.get('EFFICIENTNET_CPU_KERNELS', '1') == '0':
        return False
    with _lock:
        if 'ok' not in _state:
            try:
                lib = ctypes.cdll.LoadLibrary(build())
                for short, symbol in _TARGETS.items():
                    jax.ffi.register_ffi_target(
                        _PREFIX + short, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu'
                    )
                _state['lib'] = lib
                _state['ok'] = True
            except (RuntimeError, OSError, AttributeError) as e:
                logging.warning(
                    'efficientnet: CPU depthwise kernels unavailable (%s); using '
                    'the unrolled XLA form',
                    str(e).splitlines()[0],
                )
                _state['ok'] = False
        return _state['ok']


def usable(dtype) -> bool:
    """Whether the kernels serve this computation: the CPU backend, float32, and the library
    built and loaded."""
    return jax.default_backend() == 'cpu' and jnp.dtype(dtype) == jnp.float32 and available()


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise(x: jax.Array, kernel: jax.Array, stride: int, pads: tuple) -> jax.Array:
    """Depthwise convolution of float32 NHWC ``x`` with a (k, k, 1, C) kernel, padded by
    ``pads`` ((top, bottom), (left, right)); the same sum as ``lax.conv_general_dilated``
    with ``feature_group_count=C``."""
    return _forward(x, kernel, stride, pads)[0]


def _call(name, out_shapes, *args, **attrs):
    """One of the kernels on float32 arrays; integer attributes."""
    outs = jax.ffi.ffi_call(
        _PREFIX + name,
        [jax.ShapeDtypeStruct(s, jnp.float32) for s in out_shapes],
        vmap_method='sequential',
    )(*args, **{k: np.int64(v) for k, v in attrs.items()})
    return outs[0] if len(outs) == 1 else outs


def _out_size(size, k, stride, pad):
    return (size + sum(pad) - k) // stride + 1


def _geometry(stride, pads):
    return dict(stride=stride, pad_top=pads[0][0], pad_left=pads[1][0])


def _forward(x, kernel, stride, pads):
    n, h, w, c = x.shape
    k = kernel.shape[0]
    out = (n, _out_size(h, k, stride, pads[0]), _out_size(w, k, stride, pads[1]), c)
    y = _call('depthwise_forward', [out], x, kernel[:, :, 0, :], **_geometry(stride, pads))
    return y, (x, kernel[:, :, 0, :])


def _backward(stride, pads, res, g):
    x, w = res
    dx, dw = _call('depthwise_backward', [x.shape, w.shape], x, w, g, **_geometry(stride, pads))
    return dx, dw[:, :, None, :]


depthwise.defvjp(_forward, _backward)


def _bn_coefficients(x, scale, bias, epsilon, group_blocks):
    """Per-group statistics of x [B, R, C] and the per-block (mean, inv, a, b), z = x * a + b."""
    blocks, _, c = x.shape
    groups = blocks // group_blocks
    mean, var = _call('bn_stats', [(groups, c)] * 2, x, group_blocks=group_blocks)
    inv = jax.lax.rsqrt(var + epsilon)
    a = inv * scale
    per_block = [jnp.repeat(v, group_blocks, axis=0) for v in (mean, inv, a, bias - mean * a)]
    return mean, var, per_block


def _group_sums(v, group_blocks):
    """[B, C] -> [G, C]: the sum over each group's blocks."""
    return v.reshape(-1, group_blocks, v.shape[-1]).sum(axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_act(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, activation: str | None
):
    """Training-mode BatchNorm of float32 ``x`` [G, M, C] (G groups of M rows each normalised
    by its own statistics) followed by ``activation`` (a key of ``ACTIVATIONS``). Returns
    ``(act((x - mean) * rsqrt(var + epsilon) * scale + bias), mean, var)`` with the biased
    per-group statistics of shape [G, C]; the statistics carry no gradient (they feed only
    the moving averages)."""
    return _bn_forward(x, scale, bias, epsilon, activation)[0]


def _bn_forward(x, scale, bias, epsilon, activation):
    mean, var, (m, inv, a, b) = _bn_coefficients(x, scale, bias, epsilon, 1)
    act = ACTIVATIONS[activation]
    y = _call('affine_act', [x.shape], x, a, b, a, act=act, gated=0)  # (no gate: a, unread)
    return (y, mean, var), (x, m, inv, a, b)


def _bn_backward(epsilon, activation, res, cts):
    x, mean, inv, a, b = res
    act = ACTIVATIONS[activation]
    sums = _call(
        'act_grad_sums', [(x.shape[0], 2, x.shape[2])], x, cts[0], a, b, mean, inv, act=act, se=0
    )
    k1, k2 = sums[:, 0] / x.shape[1], sums[:, 1] / x.shape[1]
    # se=0: the gate and u arguments are not read (a stands in for them)
    dx = _call('bn_act_dx', [x.shape], x, cts[0], a, b, mean, inv, k1, k2, a, a, act=act, se=0)
    return dx, sums[:, 1].sum(0), sums[:, 0].sum(0)


batch_norm_act.defvjp(_bn_forward, _bn_backward)


def _se_gate(pooled, w_reduce, b_reduce, w_expand, b_expand, activation):
    """Squeeze-and-excitation's gate from the spatial means [N, C]: the two 1x1 convolutions
    (as matrices), the activation between them, the sigmoid."""
    from efficientnet.layers import activation_fn

    act = activation_fn(activation)
    return jax.nn.sigmoid(act(pooled @ w_reduce + b_reduce) @ w_expand + b_expand)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def batch_norm_act_se(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    w_reduce: jax.Array,
    b_reduce: jax.Array,
    w_expand: jax.Array,
    b_expand: jax.Array,
    epsilon: float,
    activation: str | None,
    se_activation: str,
    group_blocks: int,
):
    """Training-mode BatchNorm of float32 ``x`` [N, P, C] (N examples of P pixels; groups of
    ``group_blocks`` consecutive examples share statistics), the activation, then
    squeeze-and-excitation with the given matrices and biases (``se_activation`` between them).
    Returns ``(output, mean, var)`` as ``batch_norm_act``. The gradient is written out: two
    passes over x and the output gradient, the gate's gradient folded into BatchNorm's sums."""
    return _bn_se_forward(
        x,
        scale,
        bias,
        w_reduce,
        b_reduce,
        w_expand,
        b_expand,
        epsilon,
        activation,
        se_activation,
        group_blocks,
    )[0]


def _bn_se_forward(
    x, scale, bias, wr, br, we, be, epsilon, activation, se_activation, group_blocks
):
    n, p, c = x.shape
    mean, var, (m, inv, a, b) = _bn_coefficients(x, scale, bias, epsilon, group_blocks)
    act = ACTIVATIONS[activation]
    pooled = _call('affine_act_pool', [(n, c)], x, a, b, act=act) / p
    gate = _se_gate(pooled, wr, br, we, be, se_activation)
    y = _call('affine_act', [x.shape], x, a, b, gate, act=act, gated=1)
    return (y, mean, var), (x, m, inv, a, b, pooled, gate, wr, br, we, be)


def _bn_se_backward(epsilon, activation, se_activation, group_blocks, res, cts):
    x, mean, inv, a, b, pooled, gate, wr, br, we, be = res
    n, p, c = x.shape
    act = ACTIVATIONS[activation]
    g = cts[0]
    sums = _call('act_grad_sums', [(n, 5, c)], x, g, a, b, mean, inv, act=act, se=1)
    d_gate, s_a, s_b, s_c, s_d = (sums[:, i] for i in range(5))
    _, gate_vjp = jax.vjp(lambda *v: _se_gate(*v, se_activation), pooled, wr, br, we, be)
    d_pooled, dwr, dbr, dwe, dbe = gate_vjp(d_gate)
    u = d_pooled / p  # each pixel's share of the spatial mean's gradient
    # BatchNorm's sums of gz = (g * gate + u) * act'(z), per example, from the kernel's terms.
    t1 = _group_sums(gate * s_a + u * s_b, group_blocks)
    t2 = _group_sums(gate * s_c + u * s_d, group_blocks)
    rows = group_blocks * p
    k1, k2 = (jnp.repeat(t / rows, group_blocks, axis=0) for t in (t1, t2))
    dx = _call('bn_act_dx', [x.shape], x, g, a, b, mean, inv, k1, k2, gate, u, act=act, se=1)
    return dx, t2.sum(0), t1.sum(0), dwr, dbr, dwe, dbe


batch_norm_act_se.defvjp(_bn_se_forward, _bn_se_backward)


def _self_check() -> float:
    """Max abs difference of value and gradients against XLA's grouped convolution."""
    x = jax.random.normal(jax.random.key(0), (2, 11, 9, 8))
    kern = jax.random.normal(jax.random.key(1), (5, 5, 1, 8))
    pads = ((1, 2), (1, 2))

    def ref(x, kern):
        return jax.lax.conv_general_dilated(
            x, kern, (2, 2), pads, feature_group_count=8, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
        )

    worst = 0.0
    for f in (ref, lambda x, kern: depthwise(x, kern, 2, pads)):
        y, vjp = jax.vjp(f, x, kern)
        outs = (y, *vjp(jnp.ones_like(y)))
        if f is ref:
            expected = outs
        else:
            worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(outs, expected))
    return worst


def main() -> int:
    try:
        path = build(force='--force' in sys.argv)
    except RuntimeError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    if not available():
        print(f'error: built {path} but could not load it', file=sys.stderr)
        return 1
    err = _self_check()
    print(f'{path}: ok (max abs difference from XLA grouped conv {err:.2e})')
    return 0 if err < 1e-4 else 1


if __name__ == '__main__':
    sys.exit(main())
