"""The Makefile's accelerator installs (``make setup-tpu``, ``make setup-cuda CUDA=12|13``): bad
input stops before anything is created, with the fix in the message. That the requirement sets
themselves resolve is checked by ``make check-accel-reqs`` in CI (.ci/check-accel-requirements)."""

import glob
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A real interpreter older than jax 0.10.2's minimum (3.11), where the machine has one.
OLD_PYTHONS = sorted(glob.glob('/root/.pyenv/versions/3.10.*/bin/python3')) + [
    p for p in ('/usr/bin/python3.10', '/usr/bin/python3.9') if os.path.exists(p)
]


def _make(venv: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ['make', '--no-print-directory', *args, f'VENV={venv}'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize('cuda', ['11', 'cuda12', ''])
def test_setup_cuda_refuses_an_unknown_cuda_version(tmp_path, cuda):
    venv = tmp_path / 'venv'
    p = _make(str(venv), 'setup-cuda', f'CUDA={cuda}')
    assert p.returncode != 0
    assert f'CUDA={cuda} is neither 12 nor 13' in p.stderr, p.stderr
    assert 'make setup-cuda CUDA=13' in p.stderr
    assert not venv.exists()


@pytest.mark.skipif(not OLD_PYTHONS, reason='no Python older than 3.11 on this machine')
def test_setup_tpu_refuses_a_python_older_than_jax_needs(tmp_path):
    venv = tmp_path / 'venv'
    p = _make(str(venv), 'setup-tpu', f'PY={OLD_PYTHONS[0]}')
    assert p.returncode != 0
    assert 'jax 0.10.2 needs Python 3.11 or newer' in p.stderr, p.stderr
    assert 'rerun with PY=python3.11' in p.stderr
    assert not venv.exists()
