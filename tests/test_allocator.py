"""training/allocator.py: train.py and the benchmarks re-execute under tcmalloc when it is
installed (``make setup`` installs it), keeping PID, arguments and environment."""

import os
import subprocess
import sys

import pytest

from training import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = (
    'import os, sys; print("pid", os.getpid(), sys.argv[1:], flush=True); '
    'from training import allocator; allocator.use_tcmalloc(); '
    'print("after", os.getpid(), allocator.name(), sys.argv[1:])'
)


def _run(**env_changes):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ('LD_PRELOAD', 'EFFICIENTNET_TCMALLOC_REEXEC')
    }
    env.update(env_changes, PYTHONPATH=ROOT)
    p = subprocess.run(
        [sys.executable, '-c', SCRIPT, 'x', '--y=1'],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


@pytest.mark.skipif(
    allocator.find_tcmalloc() is None,
    reason='libtcmalloc-minimal4 is not installed (make setup installs it)',
)
def test_reexecutes_under_tcmalloc_once_keeping_pid_and_arguments():
    lines = _run()
    pids = [line.split()[1] for line in lines if line.startswith('pid')]
    assert len(pids) == 2 and pids[0] == pids[1]  # ran twice: before and after the exec
    assert lines[-1] == f"after {pids[0]} tcmalloc ['x', '--y=1']"


def test_switch_off_keeps_the_system_allocator():
    lines = _run(EFFICIENTNET_TCMALLOC='0')
    assert len([line for line in lines if line.startswith('pid')]) == 1
    assert lines[-1].split()[2] == 'system'
    assert 'EFFICIENTNET_TCMALLOC=0' in _describe_with_switch_off()


def _describe_with_switch_off():
    env = dict(os.environ, EFFICIENTNET_TCMALLOC='0', PYTHONPATH=ROOT)
    env.pop('LD_PRELOAD', None)
    return subprocess.run(
        [sys.executable, '-c', 'from training import allocator; print(allocator.describe())'],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
