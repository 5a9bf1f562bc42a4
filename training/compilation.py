"""Compilation settings that cut the time to the first step.

Two levers (``scripts/benchmark_train.py`` reports the time to the first step cold and warm;
the measured figures, dated, are in docs/benchmarks.md):

* **The persistent compilation cache.** On CPU most of the time to the first step goes into
  compiling the state initialisation (one threefry hash per parameter tensor) and the train
  step; a second run of the same configuration (a resume after preemption, a rerun, a sweep
  over values that do not change shapes) loads both from disk in a fraction of that time.
* **LLVM optimisation level 1 for the state initialisation on CPU.** The program runs once, so
  its own speed hardly matters; at ``xla_backend_optimization_level=1`` it compiles markedly
  faster and gives bit-identical values (``tests/test_train_step.py`` checks this). Level 0
  would compile faster still but changes the initial values (up to 1.2% relative). The train
  step keeps XLA's default level: level 1 compiles it a little faster at the same speed, but
  its results differ from the default level's in the last bits. GPU and TPU keep XLA's
  defaults.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

# XLA:CPU options for the state initialisation (see the module docstring).
CPU_INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 1}

_events: dict[str, int] = {}
_listening = False


def init_compiler_options(mesh: Any) -> dict[str, Any] | None:
    """``jax.jit``'s ``compiler_options`` for the state initialisation on ``mesh``."""
    cpu = mesh.devices.flat[0].platform == 'cpu'
    return dict(CPU_INIT_COMPILER_OPTIONS) if cpu else None


def _record(event: str, **kwargs: Any) -> None:
    del kwargs
    if event.startswith('/jax/compilation_cache/'):
        name = event.rsplit('/', 1)[-1]
        _events[name] = _events.get(name, 0) + 1


DEFAULT_CACHE_DIR = '~/.cache/efficientnet_jax/xla'


def enable_persistent_cache(path: str | None = 'auto') -> str | None:
    """Sets JAX's persistent compilation cache and returns the directory in use (None: off).

    ``'auto'``: ``$JAX_COMPILATION_CACHE_DIR`` if set, else ``DEFAULT_CACHE_DIR``. ``''`` or
    None: off. Anything else: that directory. It is created with mode 0700: the cache holds
    executable code, so it must not be writable by others. Takes effect even after something
    has been compiled (later programs use it).
    """
    global _listening
    if not _listening:
        jax.monitoring.register_event_listener(_record)
        _listening = True
    if path == 'auto':
        path = os.environ.get('JAX_COMPILATION_CACHE_DIR') or DEFAULT_CACHE_DIR
    if path:
        path = os.path.abspath(os.path.expanduser(path))
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as e:
            raise ValueError(
                f'compilation cache directory {path!r} cannot be created ({e}); '
                'set config.compilation_cache_dir to a writable directory or to '
                "'' to turn the cache off"
            ) from None
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update('jax_compilation_cache_dir', path or None)
    compilation_cache.reset_cache()  # in case something compiled before this call
    logging.info('persistent compilation cache: %s', path or 'off')
    return path or None


def cache_stats() -> dict[str, int]:
    """Counts since ``enable_persistent_cache``: ``compile_requests_use_cache`` (programs
    looked up) and ``cache_hits`` (programs loaded instead of compiled)."""
    return {k: _events.get(k, 0) for k in ('compile_requests_use_cache', 'cache_hits')}
