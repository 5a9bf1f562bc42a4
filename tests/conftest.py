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


@pytest.fixture(scope='module', autouse=True)
def _training_in_background(request):
    """When a test file that loads a real train.py workdir starts (``WORKDIR_TEST_FILES``; the
    tests named '*workdir*' come last there) and any such test is selected, the run they share
    starts training in the background, once per process, while the file's other tests run."""
    from tests import inference_fixtures

    if request.path.name in inference_fixtures.WORKDIR_TEST_FILES and (
        inference_fixtures.workdir_tests_selected(request.session.items)
    ):
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


# -- Scheduling over pytest-xdist workers (make test: --dist loadfile --no-loadscope-reorder).
# Each test file is one unit of work, so its module fixtures are computed once, except for two
# sets of files that share an expensive session-wide run and go to one worker together: the
# smoke config's reference run (``uninterrupted``) and the trained workdir of the inference
# tests. Units start longest first (from the durations `make test` lists), so that no long one
# starts last while the other worker idles; the rest keep pytest's order. A stale order costs
# balance only, never a result. (xdist's own grouping, --dist loadgroup, renames node ids in a
# way pytest 9 ignores; a scheduler whose unit is the file or its set works with both.)
_SHARED_RUNS = {
    'test_train_loop.py': 'reference run',
    'test_faults_checkpoint.py': 'reference run',
    'test_gcs.py': 'reference run',
    'test_eval_predict.py': 'trained workdir',
    'test_loading.py': 'trained workdir',
}
_LONGEST_FIRST = (
    'reference run',
    'test_sweep.py',
    'test_finetune.py',
    'test_model.py',
    'test_progressive.py',
    'test_noisy_student.py',
    'trained workdir',
    'test_faults_workers.py',
    'test_train_step.py',
    'test_input_distributed.py',
    'test_loss_scale.py',
    'test_pruning.py',
    'test_qat.py',
    'test_distill.py',
    'test_dropblock.py',
    'test_export.py',
)


def _unit(nodeid: str) -> str:
    """The unit of work of a test: its file, or the set of files it shares a run with."""
    name = os.path.basename(nodeid.split('::', 1)[0])
    return _SHARED_RUNS.get(name, name)


def pytest_collection_modifyitems(config, items):
    rank = {unit: i for i, unit in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_unit(item.nodeid), len(rank)))  # stable: file order


def pytest_xdist_make_scheduler(config, log):
    """With --dist loadfile: whole units of work (``_unit``) per worker, in collection order."""
    if config.getvalue('dist') != 'loadfile':
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    return UnitScheduling(config, log)
