"""Runs the command under tcmalloc when it is installed: CPU training steps are faster.

XLA:CPU allocates each step's temporaries (about 1 GB for B0 at batch 16) afresh. glibc's
malloc serves every block over 32 MB with a new ``mmap``, so each step page-faults and zeroes
all of that memory again; tcmalloc keeps it (``scripts/benchmark_train.py`` measures the gain;
figures in docs/benchmarks.md). PyTorch gains from it too, so the benchmark gives both
frameworks the same allocator.

``use_tcmalloc()`` is called first thing by ``train.py`` and the benchmark scripts, before
anything heavy is imported: if ``libtcmalloc_minimal.so.4`` (Debian/Ubuntu package
``libtcmalloc-minimal4``, installed by ``make setup``) is found and not yet loaded, it
re-executes the same command line with the library in ``LD_PRELOAD``. The process keeps its
PID, arguments and environment. ``EFFICIENTNET_TCMALLOC=0`` keeps the system allocator.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

ENV_SWITCH = 'EFFICIENTNET_TCMALLOC'
_GUARD = 'EFFICIENTNET_TCMALLOC_REEXEC'  # set across the re-exec: never loop


def find_tcmalloc() -> str | None:
    """The tcmalloc library's name for LD_PRELOAD, or None when it is not installed."""
    if not sys.platform.startswith('linux'):
        return None
    return ctypes.util.find_library('tcmalloc_minimal') or ctypes.util.find_library('tcmalloc')


def loaded() -> bool:
    """Whether tcmalloc is mapped into this process."""
    try:
        with open('/proc/self/maps') as f:
            return 'libtcmalloc' in f.read()
    except OSError:
        return False


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, '1').strip().lower() not in ('0', 'false', 'no', 'off')


def use_tcmalloc() -> None:
    """Re-executes this process under tcmalloc if it is installed, enabled and not loaded yet;
    otherwise returns and changes nothing."""
    if not enabled() or os.environ.get(_GUARD) or loaded():
        return
    lib = find_tcmalloc()
    if lib is None:
        return
    env = dict(os.environ)
    env['LD_PRELOAD'] = ':'.join(p for p in (lib, env.get('LD_PRELOAD')) if p)
    env[_GUARD] = '1'
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def name() -> str:
    return 'tcmalloc' if loaded() else 'system'


def describe() -> str:
    """One phrase for the run log: which allocator this process uses, and how to change it."""
    if loaded():
        return f'tcmalloc (set {ENV_SWITCH}=0 for the system allocator)'
    if not enabled():
        return f'system ({ENV_SWITCH}=0)'
    return (
        'system (install libtcmalloc-minimal4, e.g. with `make setup`, for ~35% faster CPU steps)'
        if find_tcmalloc() is None
        else 'system'
    )
