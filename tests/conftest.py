"""Shared test setup. Runs before any test module imports jax."""

import os

# Eight host devices so mesh and sharding code runs on CPU; must precede the jax import.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('KERAS_BACKEND', 'tensorflow')  # Keras oracles build faster on TF

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope='session')
def tools_env(tmp_path_factory) -> dict:
    """Environment for train.py and script subprocesses: one CPU device (faster to compile than
    the suite's eight) and a compilation cache shared by every test of the session."""
    env = dict(os.environ)
    env.update(
        {
            'XLA_FLAGS': '',
            'JAX_PLATFORMS': 'cpu',
            'JAX_COMPILATION_CACHE_DIR': str(tmp_path_factory.getbasetemp() / 'tools_jax_cache'),
            'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
            'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
            'TF_CPP_MIN_LOG_LEVEL': '2',
        }
    )
    return env


@pytest.fixture(scope='session', autouse=True)
def _training_in_background(request):
    """When any test that loads a real train.py workdir is selected (those named '*workdir*' in
    the inference test files; they come last there), the run they share trains in the
    background from the start of the session."""
    from tests import inference_fixtures

    if inference_fixtures.workdir_tests_selected(request.session.items):
        inference_fixtures.start_training()


@pytest.fixture(scope='session')
def train_env(tmp_path_factory) -> dict:
    """Environment for the smoke train.py runs (tests/test_train_loop.py, tests/test_gcs.py):
    eight CPU devices, and a compilation cache that only the first run pays to fill."""
    from tests.test_train_loop import ROOT

    env = dict(os.environ)
    env.update(
        {
            'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
            'JAX_PLATFORMS': 'cpu',
            'JAX_COMPILATION_CACHE_DIR': str(tmp_path_factory.mktemp('jax_cache')),
            'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
            'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
            'TF_CPP_MIN_LOG_LEVEL': '2',
            'PYTHONPATH': ROOT,
        }
    )
    return env


@pytest.fixture(scope='session')
def uninterrupted(train_env, tmp_path_factory):
    """The reference: the smoke config trained in one go on local disk, (workdir, process)."""
    from tests.test_train_loop import _train

    workdir = str(tmp_path_factory.mktemp('uninterrupted'))
    return workdir, _train(train_env, workdir)


@pytest.fixture(scope='session')
def gcs_emulator(tmp_path_factory):
    """An offline GCS (tests/gcs_emulator.py) for the session: `.env` to merge into the
    environment of a subprocess under test (never into this process's), `.make_bucket(name)`,
    `.list_objects(bucket, prefix)`, `.read_object(bucket, name)`. A missing emulator binary
    fails the test with the command that installs it; it is not skipped."""
    from tests.gcs_emulator import GcsEmulator, binary_path

    try:
        binary_path()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    with GcsEmulator(tmp_path_factory.mktemp('gcs_emulator')) as emulator:
        yield emulator
