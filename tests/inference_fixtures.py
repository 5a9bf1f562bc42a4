"""Shared by the inference tests (test_loading.py, test_eval_predict.py): random weights of the
right tree, and one real train.py run whose workdir the workdir tests load.

The run trains in the background from the start of the session when any workdir test is
selected (conftest.py's ``_training_in_background``); ``trained_workdir`` waits for it.
"""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

import efficientnet
from tests import input_fixtures as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKDIR_CLASSES = 3
WORKDIR_CLASS_NAMES = ('apple', 'banana', 'cherry')
WORKDIR_TEST_FILES = ('test_loading.py', 'test_eval_predict.py')  # tests that use the run


def random_variables(name: str, num_classes: int, seed: int) -> dict:
    """Random float32 variables of the right tree, scaled so that activations neither vanish
    nor saturate (numpy draws: jitting the real initialisers costs more compile time than
    these tests need). BatchNorm statistics are non-trivial, so a dropped collection shows."""
    model = efficientnet.create_model(name, num_classes=num_classes, depthwise_impl='xla')
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        leaf = path[-1].key
        if leaf == 'kernel':  # He fan-in scaling; a depthwise kernel (k, k, 1, C) has fan-in k*k
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(s.shape[:-1])), s.shape)
        if leaf in ('scale', 'var'):
            return rng.uniform(0.8, 1.2, s.shape)
        return rng.normal(0.0, 0.05, s.shape)  # biases and means

    return jax.tree_util.tree_map_with_path(
        lambda p, s: draw(p, s).astype(np.float32), dict(shapes)
    )


def _workdir_paths() -> tuple[str, str, str]:
    # Shared through a directory named by the process id, not a module global, so that the
    # state survives this module being imported under two names.
    root = os.path.join(tempfile.gettempdir(), f'test_loading_workdir_{os.getpid()}')
    return root, os.path.join(root, 'workdir'), os.path.join(root, 'images')


def start_training() -> None:
    """Starts (once per test process) a real two-step train.py run of the smoke config on a
    generated JPEG folder of 3 classes, in the background; ``trained_workdir`` waits for it."""
    root, workdir, folder = _workdir_paths()
    if os.path.exists(os.path.join(root, 'started')):
        return
    shutil.rmtree(root, ignore_errors=True)
    fx.write_image_folder(folder, num_classes=WORKDIR_CLASSES, per_class=6, size=(40, 56))
    for c, name in enumerate(WORKDIR_CLASS_NAMES):  # names a fallback could not produce
        os.rename(os.path.join(folder, f'class_{c}'), os.path.join(folder, name))
    # One device compiles faster than the eight conftest.py gives this process.
    env = dict(
        os.environ,
        XLA_FLAGS='--xla_force_host_platform_device_count=1',
        TF_CPP_MIN_LOG_LEVEL='2',
        JAX_PLATFORMS='cpu',
    )
    train = [
        sys.executable, os.path.join(ROOT, 'train.py'),
        f'--config={os.path.join(ROOT, "configs", "smoke.py")}', f'--workdir={workdir}',
        '--config.data.name=folder', f'--config.data.folder={folder}',
        f'--config.data.num_classes={WORKDIR_CLASSES}', '--config.batch_size=8',
        '--config.total_steps=2', '--config.checkpoint.every_steps=1',
    ]  # fmt: skip
    log = os.path.join(root, 'train.log')
    # The shell leaves a marker either way, so any importer of this module can wait on it.
    script = (
        f'{shlex.join(train)} > {shlex.quote(log)} 2>&1 && touch {root}/done || touch {root}/failed'
    )
    proc = subprocess.Popen(['sh', '-c', script], cwd=ROOT, env=env)
    open(os.path.join(root, 'started'), 'w').close()

    def cleanup():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(cleanup)


def trained_workdir(timeout: float = 600.0) -> tuple[str, str]:
    """(workdir, image folder) of the run ``start_training`` began, once it has finished."""
    start_training()
    root, workdir, folder = _workdir_paths()
    deadline = time.monotonic() + timeout
    while not os.path.exists(os.path.join(root, 'done')):
        if os.path.exists(os.path.join(root, 'failed')) or time.monotonic() > deadline:
            with open(os.path.join(root, 'train.log')) as f:
                pytest.fail('the train.py run for the workdir tests failed:\n' + f.read()[-3000:])
        time.sleep(0.5)
    return workdir, folder


def training_log() -> str:
    """The path of the run's train.py output (stdout and stderr)."""
    return os.path.join(_workdir_paths()[0], 'train.log')


def workdir_tests_selected(items) -> bool:
    """Whether any of ``items`` (the session's selected tests) needs the trained workdir: the
    tests with 'workdir' in their name in ``WORKDIR_TEST_FILES``."""
    return any('workdir' in item.name and item.path.name in WORKDIR_TEST_FILES for item in items)
