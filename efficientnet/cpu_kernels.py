"""Depthwise-convolution kernels for XLA's CPU backend (XLA FFI custom calls, C++).

XLA:CPU runs a grouped convolution, and the reductions of the depthwise weight gradient, far
below what the hardware allows; ``csrc/cpu_kernels.cc`` does the same arithmetic in one
vectorised pass per direction. The shared library is built with the system C++ compiler
against the XLA FFI headers that ship with jaxlib:

    python -m efficientnet.cpu_kernels          # build (``make setup`` runs it) and self-check

and, when missing, built on first use (a few seconds). Where no compiler is available the
kernels are reported unavailable and ``depthwise_impl='auto'`` falls back to the unrolled XLA
form; nothing else changes.

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
}
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise(x: jax.Array, kernel: jax.Array, stride: int, pads: tuple) -> jax.Array:
    """Depthwise convolution of float32 NHWC ``x`` with a (k, k, 1, C) kernel, padded by
    ``pads`` ((top, bottom), (left, right)); the same sum as ``lax.conv_general_dilated``
    with ``feature_group_count=C``."""
    return _forward(x, kernel, stride, pads)[0]


def _forward(x, kernel, stride, pads):
    k = kernel.shape[0]
    xp = jnp.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
    out_h = (xp.shape[1] - k) // stride + 1
    out_w = (xp.shape[2] - k) // stride + 1
    w = kernel[:, :, 0, :]
    y = jax.ffi.ffi_call(
        _PREFIX + 'depthwise_forward',
        jax.ShapeDtypeStruct((x.shape[0], out_h, out_w, x.shape[3]), x.dtype),
        vmap_method='sequential',
    )(xp, w, stride=np.int64(stride))
    return y, (xp, w, x.shape)


def _backward(stride, pads, res, g):
    xp, w, x_shape = res
    dx, dw_per_example = jax.ffi.ffi_call(
        _PREFIX + 'depthwise_backward',
        (
            jax.ShapeDtypeStruct(x_shape, xp.dtype),
            jax.ShapeDtypeStruct((x_shape[0],) + w.shape, xp.dtype),
        ),
        vmap_method='sequential',
    )(
        xp,
        w,
        g,
        stride=np.int64(stride),
        pad_top=np.int64(pads[0][0]),
        pad_left=np.int64(pads[1][0]),
    )
    return dx, jnp.sum(dw_per_example, axis=0)[:, :, None, :]


depthwise.defvjp(_forward, _backward)


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
