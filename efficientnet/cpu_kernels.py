"""Kernels for XLA's CPU backend (XLA FFI custom calls, C++): the depthwise convolution and
training-mode BatchNorm fused with its activation.

XLA:CPU runs a grouped convolution, and the reductions of the depthwise weight gradient, far
below what the hardware allows; ``csrc/cpu_kernels.cc`` does the same arithmetic in one
vectorised pass per direction. Training-mode BatchNorm and the activation after it were about
ten memory passes over each activation in XLA:CPU's program (reductions, normalisation,
activation and their gradients); the fused kernels make three forward and two backward.

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
    'bn_act_forward': 'EfficientNetBnActForward',
    'bn_act_backward': 'EfficientNetBnActBackward',
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


def _forward(x, kernel, stride, pads):
    k = kernel.shape[0]
    out_h = (x.shape[1] + sum(pads[0]) - k) // stride + 1
    out_w = (x.shape[2] + sum(pads[1]) - k) // stride + 1
    w = kernel[:, :, 0, :]
    y = jax.ffi.ffi_call(
        _PREFIX + 'depthwise_forward',
        jax.ShapeDtypeStruct((x.shape[0], out_h, out_w, x.shape[3]), x.dtype),
        vmap_method='sequential',
    )(x, w, **_geometry(stride, pads))
    return y, (x, w)


def _geometry(stride, pads):
    return dict(
        stride=np.int64(stride), pad_top=np.int64(pads[0][0]), pad_left=np.int64(pads[1][0])
    )


def _backward(stride, pads, res, g):
    x, w = res
    dx, dw = jax.ffi.ffi_call(
        _PREFIX + 'depthwise_backward',
        (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(w.shape, x.dtype)),
        vmap_method='sequential',
    )(x, w, g, **_geometry(stride, pads))
    return dx, dw[:, :, None, :]


depthwise.defvjp(_forward, _backward)


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
    g, _, c = x.shape
    stats = jax.ShapeDtypeStruct((g, c), jnp.float32)
    y, mean, var = jax.ffi.ffi_call(
        _PREFIX + 'bn_act_forward',
        (jax.ShapeDtypeStruct(x.shape, jnp.float32), stats, stats),
        vmap_method='sequential',
    )(x, scale, bias, act=np.int64(ACTIVATIONS[activation]), epsilon=np.float32(epsilon))
    return (y, mean, var), (x, scale, bias, mean, var)


def _bn_backward(epsilon, activation, res, cts):
    x, scale, bias, mean, var = res
    vec = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
    return jax.ffi.ffi_call(
        _PREFIX + 'bn_act_backward',
        (jax.ShapeDtypeStruct(x.shape, jnp.float32), vec, vec),
        vmap_method='sequential',
    )(
        x,
        scale,
        bias,
        mean,
        var,
        cts[0],
        act=np.int64(ACTIVATIONS[activation]),
        epsilon=np.float32(epsilon),
    )


batch_norm_act.defvjp(_bn_forward, _bn_backward)


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
