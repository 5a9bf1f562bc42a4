"""Faults around checkpoints, caused for real: damaged files (flipped bytes, truncated, deleted,
unreadable metadata), a kill -9 in the middle of a save, a save that fails (RLIMIT_FSIZE, a real
EFBIG from the kernel), a run whose state diverges. Each test says what must survive and checks
it: the newest good checkpoint, a resume bit-identical to the uninterrupted reference run
(``uninterrupted`` in tests/conftest.py, shared with tests/test_train_loop.py), the damaged
files kept on disk.

The in-process tests drive ``training.checkpoint.Checkpointer`` with a small sharded state on
the suite's 8 CPU devices; the others run train.py on the smoke config in subprocesses that share
the reference run's compiled programs (SIGTERM and the non-finite loss are in
tests/test_train_loop.py).
"""

import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from efficientnet.weights import train_state
from tests.test_train_loop import ROOT, _assert_same_state, _cmd
from training import checkpoint as ckpt_lib
from training.state import TrainState

# -- an independent digest ----------------------------------------------------------------


def _numpy_digest(x: np.ndarray) -> tuple[int, int]:
    """train_state's two 32-bit hashes, computed with Python integers element by element."""
    m = 2**32

    def fmix(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) % m
        h ^= h >> 13
        h = (h * 0xC2B2AE35) % m
        return h ^ (h >> 16)

    words = np.ascontiguousarray(x).view(np.uint32).reshape(-1)
    h1 = h2 = 0
    for i, w in enumerate(int(w) for w in words):
        h1 = (h1 + fmix(w ^ fmix((i + 0x9E3779B9) % m))) % m
        h2 = (h2 + w * (2 * i + 1)) % m
    return h1, h2


def test_digest_matches_a_plain_python_hash_on_any_sharding(rng):
    """The digest is a function of the values only: the same on one device and sharded over
    eight (its sums wrap, so order does not matter), equal to the same hash computed with
    Python integers, and changed by a flip of any one bit."""
    x = rng.standard_normal((16, 6)).astype(np.float32)
    want = _numpy_digest(x)
    one = np.asarray(jax.jit(train_state.digests)([jnp.asarray(x)]))
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec('data')))
    eight = train_state.device_digests([sharded])
    assert tuple(int(v) for v in one[0, :2]) == want
    np.testing.assert_array_equal(one, eight)
    assert one[0, 2] == 1  # finite
    for pos in (0, 37, x.size - 1):
        y = x.copy().reshape(-1)
        y.view(np.uint32)[pos] ^= 1 << (pos % 32)
        other = np.asarray(jax.jit(train_state.digests)([jnp.asarray(y.reshape(x.shape))]))
        assert (other[0, 0] != one[0, 0]) and (other[0, 1] != one[0, 1])
    nan = x.copy()
    nan[3, 2] = np.nan
    assert np.asarray(jax.jit(train_state.digests)([jnp.asarray(nan)]))[0, 2] == 0


def test_digests_of_arrays_hashed_together_equal_their_own_digests(rng):
    """``digests`` hashes the arrays of one shape, dtype and sharding as one stacked array
    (``leaf_groups``): each row still equals the plain hash of its own array, in leaf order,
    here with repeated shapes in several dtypes, shardings and a NaN among them."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
    rows = NamedSharding(mesh, PartitionSpec('data'))
    xs = [rng.standard_normal((8, 3)).astype(np.float32) for _ in range(5)]
    xs[3][1, 1] = np.nan
    tree = {
        'a': [jnp.asarray(x) for x in xs[:3]],
        'b': [jax.device_put(x, rows) for x in xs[3:]],  # same shape, another sharding
        'c': [jnp.asarray(x[:, :2].copy()) for x in xs],
        'd': jnp.asarray(xs[0], jnp.bfloat16),
    }
    leaves = jax.tree.leaves(tree)
    groups = train_state.leaf_groups(leaves, key=lambda x: x.sharding)
    assert sorted(len(g) for g in groups) == [1, 2, 3, 5]
    got = train_state.device_digests(tree)
    for i, leaf in enumerate(leaves):
        own = np.asarray(jax.jit(train_state.digests)([jnp.asarray(np.asarray(leaf))]))[0]
        np.testing.assert_array_equal(got[i], own)
        if leaf.dtype == np.float32:
            assert tuple(int(v) for v in got[i, :2]) == _numpy_digest(np.asarray(leaf))
    assert got[:, 2].tolist() == [1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1]


# -- the Checkpointer with a small state ---------------------------------------------------


def _mesh():
    return jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'fsdp'))


def _state(seed: float) -> TrainState:
    """A small TrainState (optax namedtuples in the optimizer state, like the real one) with
    values that depend on ``seed``, sharded over the 8-device mesh."""
    mesh = _mesh()
    params = {
        # Random values: incompressible, so TensorStore stores them raw (as it does trained
        # weights) and flipped bytes decode without an error; over 1 KiB, so in a data file.
        'conv': {'kernel': jnp.asarray(np.random.default_rng(0).normal(size=(512, 256))) + seed},
        'head': {'bias': jnp.arange(6.0) * seed},
    }
    stats = {'bn': {'mean': jnp.ones(4) * seed, 'var': jnp.ones(4)}}
    state = TrainState(
        step=jnp.asarray(int(seed), jnp.int32),
        params=params,
        batch_stats=stats,
        opt_state=optax.adam(1e-3).init(params),
        ema_params=jax.tree.map(lambda a: a * 0.5, params),
        ema_batch_stats=stats,
    )

    def place(a):
        spec = PartitionSpec('data') if a.ndim and a.shape[0] % 4 == 0 else PartitionSpec()
        return jax.device_put(a, NamedSharding(mesh, spec))

    return jax.tree.map(place, state)


def _abstract_and_shardings():
    state = _state(1.0)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    return abstract, jax.tree.map(lambda a: a.sharding, state)


def _saved_workdir(tmp_path, steps=(1, 2, 3), keep=3):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=keep, keep_best=False)
    for s in steps:
        ckpt.save(s, _state(float(s)), data_state={'step': s})
    ckpt.close()
    return str(tmp_path)


def _array_files(step_dir):
    """TensorStore's OCDBT files of the step: b-tree nodes and array data, under state/d/ and
    state/ocdbt.process_<i>/d/ (arrays too big to sit inline in a node stay in the latter)."""
    return [
        os.path.join(d, f)
        for d, _, names in os.walk(os.path.join(step_dir, 'state'))
        if os.path.basename(d) == 'd'
        for f in names
    ]


def _largest_array_file(step_dir):
    return max(_array_files(step_dir), key=os.path.getsize)


def _flip(path, count=64, places=1):
    """Inverts ``count`` bytes at each of ``places`` points spread evenly over the file (one:
    its middle). In a train.py checkpoint one point may fall where nothing is read: a data file
    of TensorStore's OCDBT also holds the b-tree nodes each process wrote before orbax merged
    them into one tree, which the merged tree no longer references (a flip at the middle went
    undetected there once, and the state restored intact); several points make a hit certain."""
    data = bytearray(open(path, 'rb').read())
    for k in range(1, places + 1):
        at = len(data) * k // (places + 1)
        for i in range(at, min(at + count, len(data))):
            data[i] ^= 0xFF
    open(path, 'wb').write(bytes(data))


def _damage(step_dir, kind):
    if kind == 'flipped bytes':
        _flip(_largest_array_file(step_dir))
    elif kind == 'truncated array file':
        path = _largest_array_file(step_dir)
        os.truncate(path, os.path.getsize(path) // 2)
    elif kind == 'deleted array file':
        os.remove(_largest_array_file(step_dir))
    elif kind == 'unreadable array metadata':
        with open(os.path.join(step_dir, 'state', '_METADATA'), 'w') as f:
            f.write('{"tree_metadata": ')
    elif kind == 'unreadable step metadata':
        with open(os.path.join(step_dir, '_CHECKPOINT_METADATA'), 'w') as f:
            f.write('\x00garbage')
    elif kind == 'unreadable checksums':
        with open(os.path.join(step_dir, train_state.CHECKSUMS_ITEM, 'metadata'), 'w') as f:
            f.write('{"format": 1, "arr')
    elif kind == 'deleted checksums':
        os.remove(os.path.join(step_dir, train_state.CHECKSUMS_ITEM, train_state.CHECKSUMS_FILE))
    else:
        raise ValueError(kind)


def _assert_equal_trees(a, b):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), jax.tree_util.keystr(path))


# kind of damage -> the reason the step is set aside for (its new name: 3.skipped-<reason>).
# Flipped bytes in a data file of compressed array values decode without an error: only the
# checksums notice them (as they did not before, when training went on from garbage).
DAMAGE = {
    'flipped bytes': 'checksum',
    'truncated array file': 'unreadable',
    'deleted array file': 'unreadable',
    'unreadable array metadata': 'unreadable',
    'unreadable checksums': 'checksums',
    'deleted checksums': 'checksums',
}


@pytest.mark.parametrize('kind', DAMAGE)
def test_damaged_latest_step_is_set_aside_and_the_one_before_restored(tmp_path, caplog, kind):
    """Step 3 damaged: restoring returns step 2 exactly (with its data state) after one warning
    line that names step 3 and why; step 3's files stay on disk as 3.skipped-<why>, orbax no
    longer lists it, and the run can save step 3 again."""
    workdir = _saved_workdir(tmp_path)
    step_dir = os.path.join(workdir, 'checkpoints', '3')
    before = sorted(os.listdir(step_dir))
    _damage(step_dir, kind)
    abstract, shardings = _abstract_and_shardings()
    ckpt = ckpt_lib.Checkpointer(workdir, keep=3, keep_best=False)
    with caplog.at_level(logging.WARNING):
        state, data_state = ckpt.restore(abstract, shardings)
    _assert_equal_trees(state, _state(2.0))
    assert data_state == {'step': 2}
    lines = [r.getMessage() for r in caplog.records if 'skipped' in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith('checkpoint step 3 skipped: '), lines
    assert '\n' not in lines[0]
    if DAMAGE[kind] == 'checksum':
        # the data file holds both kernels, in the order their writes completed
        assert re.search('checksum mismatch: (ema_)?params/conv/kernel digest', lines[0])
    kept = [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.startswith('3.')]
    assert kept == [f'3.skipped-{DAMAGE[kind]}'], kept
    assert kept[0] in lines[0]
    if not kind.startswith('deleted'):
        assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', kept[0]))) == before
    assert ckpt.latest.all_steps() == [1, 2]
    ckpt.save(3, state)
    ckpt.close()
    assert sorted(ckpt_lib.Checkpointer(workdir, keep_best=False).latest.all_steps()) == [1, 2, 3]


def test_garbage_step_metadata_alone_does_not_discard_a_checkpoint_that_verifies(tmp_path):
    """orbax's _CHECKPOINT_METADATA (timestamps, item names) made unreadable: the arrays still
    match their checksums, so step 3 is restored, not set aside."""
    workdir = _saved_workdir(tmp_path)
    _damage(os.path.join(workdir, 'checkpoints', '3'), 'unreadable step metadata')
    ckpt = ckpt_lib.Checkpointer(workdir, keep=3, keep_best=False)
    state, data_state = ckpt.restore(*_abstract_and_shardings())
    ckpt.close()
    _assert_equal_trees(state, _state(3.0))
    assert data_state == {'step': 3}
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1', '2', '3']


def test_read_state_refuses_a_damaged_checkpoint(tmp_path):
    """The weights reader (eval, predict, export, init_from) verifies too: flipped bytes give
    an error that names the step directory, not silently wrong weights."""
    workdir = _saved_workdir(tmp_path, steps=(1,))
    step_dir = os.path.join(workdir, 'checkpoints', '1')
    good = train_state.read_state(os.path.join(step_dir, 'state'))
    _assert_equal_trees(
        [good['params'], good['ema_params']], [_state(1.0).params, _state(1.0).ema_params]
    )
    _flip(_largest_array_file(step_dir))
    with pytest.raises(
        ValueError, match=f'{step_dir} is damaged: (ema_)?params/conv/kernel digest'
    ):
        train_state.read_state(os.path.join(step_dir, 'state'))


def test_no_restorable_step_is_an_error_not_a_fresh_start(tmp_path):
    """Every step damaged: restore raises one CheckpointError naming them (nothing trains
    from step 0 silently), and every damaged step is still on disk."""
    workdir = _saved_workdir(tmp_path, steps=(1, 2))
    for s in (1, 2):
        _flip(_largest_array_file(os.path.join(workdir, 'checkpoints', str(s))))
    ckpt = ckpt_lib.Checkpointer(workdir, keep_best=False)
    with pytest.raises(ckpt_lib.CheckpointError, match='no checkpoint in .* restores: skipped'):
        ckpt.restore(*_abstract_and_shardings())
    names = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
    assert [n.split('.')[0] for n in names] == ['1', '2'] and all('skipped' in n for n in names)


def test_rotation_never_deletes_the_step_the_run_resumed_from(tmp_path):
    """keep=2: after resuming from (verified) step 3, three more saves rotate out the others
    but not step 3, the newest checkpoint known to be good; a restart that verifies step 6
    lets the next save rotate step 3 out."""
    workdir = _saved_workdir(tmp_path, steps=(1, 2, 3), keep=2)
    ckpt = ckpt_lib.Checkpointer(workdir, keep=2, keep_best=False)
    state, _ = ckpt.restore(*_abstract_and_shardings())
    for s in (4, 5, 6):
        ckpt.save(s, _state(float(s)))
    ckpt.close()
    assert ckpt_lib.Checkpointer(workdir, keep_best=False).latest.all_steps() == [3, 5, 6]
    again = ckpt_lib.Checkpointer(workdir, keep=2, keep_best=False)
    again.restore(*_abstract_and_shardings())
    again.save(7, _state(7.0))
    again.close()
    assert ckpt_lib.Checkpointer(workdir, keep_best=False).latest.all_steps() == [6, 7]


def test_non_finite_state_is_never_saved(tmp_path):
    """A NaN in the EMA (loss and parameters finite): save raises NonFiniteStateError naming
    the step and the array; nothing of that step is written, the previous step stays latest."""
    workdir = _saved_workdir(tmp_path, steps=(1,))
    ckpt = ckpt_lib.Checkpointer(workdir, keep_best=False)
    state = _state(2.0)
    bad = state.replace(
        ema_batch_stats={
            'bn': {
                'mean': state.ema_batch_stats['bn']['mean'] * jnp.nan,
                'var': state.ema_batch_stats['bn']['var'],
            }
        }
    )
    with pytest.raises(
        ckpt_lib.NonFiniteStateError,
        match=r'non-finite values at step 2 in ema_batch_stats/bn/mean: not saved.*\(step 1\)',
    ):
        ckpt.save(2, bad, data_state={'step': 2})
    ckpt.close()
    assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['1']


# -- train.py ------------------------------------------------------------------------------


def _copy(uninterrupted, tmp_path):
    workdir = str(tmp_path / 'run')
    shutil.copytree(uninterrupted[0], workdir)
    return workdir


def _run(env, workdir, *overrides, preexec_fn=None, timeout=420):
    return subprocess.run(
        _cmd(workdir, *overrides),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        preexec_fn=preexec_fn,
    )


@pytest.mark.slow
def test_flipped_bytes_in_the_latest_checkpoint_resume_from_the_one_before_exactly(
    train_env, uninterrupted, tmp_path
):
    """7 × 64 flipped bytes in step 8's largest array data file of a finished run: the rerun names
    step 8 as skipped (by the checksums when TensorStore decodes the damaged bytes without
    an error, by TensorStore when they hit its b-tree, which carries a CRC), resumes from step
    4 and ends with the uninterrupted run's state at step 8, bit for bit; the damaged step
    stays on disk as 8.skipped-<why>."""
    workdir = _copy(uninterrupted, tmp_path)
    _flip(_largest_array_file(os.path.join(workdir, 'checkpoints', '8')), places=7)
    p = _run(train_env, workdir)
    assert p.returncode == 0, p.stderr[-4000:]
    assert 'checkpoint step 8 skipped: ' in p.stderr, p.stderr[-4000:]
    assert 'resumed from step 4' in p.stderr
    kept = [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if 'skipped' in n]
    assert kept in (['8.skipped-checksum'], ['8.skipped-unreadable']), kept
    _assert_same_state(workdir, uninterrupted[0], 8)


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_save_resumes_exactly(train_env, uninterrupted, tmp_path):
    """SIGKILL while orbax is writing a step (its temporary directory exists, not yet renamed):
    the rerun resumes from the last complete step and ends bit-identical to the uninterrupted
    run at step 8."""
    workdir = str(tmp_path / 'run')
    ckpts = os.path.join(workdir, 'checkpoints')
    # Many epochs, so the kill surely lands mid-run; the first 8 steps are the 8-step run's.
    p = subprocess.Popen(
        _cmd(workdir, '--config.num_epochs=100'),
        env=train_env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen = None
    try:
        deadline = time.monotonic() + 420
        while seen is None and p.poll() is None and time.monotonic() < deadline:
            names = os.listdir(ckpts) if os.path.isdir(ckpts) else []
            tmp = [n for n in names if 'orbax-checkpoint-tmp' in n]
            if tmp:
                p.send_signal(signal.SIGKILL)
                seen = tmp[0]
            else:
                time.sleep(0.002)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert seen is not None, 'no save was seen in progress'
    assert p.returncode == -signal.SIGKILL
    killed_in = int(seen.split('.')[0])
    if killed_in > 8:
        pytest.skip(f'the machine was too slow: the kill landed in the save of step {killed_in}')
    second = _run(train_env, workdir, '--config.num_epochs=2')
    assert second.returncode == 0, second.stderr[-4000:]
    complete = killed_in - 4  # saves come every 4 steps
    if complete:
        assert f'resumed from step {complete}' in second.stderr, second.stderr[-3000:]
    _assert_same_state(workdir, uninterrupted[0], 8)


def _file_size_limit(limit):
    def apply():
        # Past the limit write() fails with EFBIG, as on a full disk, instead of the default
        # SIGXFSZ killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _assert_no_traceback_of_ours(stderr: str) -> None:
    """No traceback through the project's files. The libraries' own echoes of the failed write
    are allowed: orbax's writer loop stops at the first failed array write and asyncio logs
    the other writes' failures ("Task exception was never retrieved"), and tensorstore, whose
    remaining writes complete into that closed loop, prints ``RuntimeError: Event loop is
    closed`` from its C++ threads (past sys.excepthook, so the project cannot silence it)."""
    frames = re.findall(r'File "([^"]+)", line \d+', stderr)
    ours = [f for f in frames if f.startswith(ROOT) and 'site-packages' not in f]
    assert not ours, stderr[-4000:]


@pytest.mark.slow
def test_a_failing_save_stops_the_run_with_one_line_and_keeps_the_older_checkpoint(
    train_env, uninterrupted, tmp_path
):
    """A save that the kernel refuses (files limited by RLIMIT_FSIZE to half the state's
    largest array, so whichever TensorStore data file that array goes into, however the writes
    are split into files, passes the limit): the run stops with exit status 1 and one line
    naming the path and the cause, no traceback of ours; step 4, the checkpoint before it, is
    intact (it restores and verifies)."""
    workdir = _copy(uninterrupted, tmp_path)
    shutil.rmtree(os.path.join(workdir, 'checkpoints', '8'))
    shutil.rmtree(os.path.join(workdir, 'best'))
    state = train_state.read_state(os.path.join(workdir, 'checkpoints', '4', 'state'))
    biggest = max(np.asarray(x).nbytes for x in jax.tree.leaves(state))
    p = _run(train_env, workdir, preexec_fn=_file_size_limit(biggest // 2))
    assert p.returncode == 1, p.stderr[-4000:]
    # tensorstore's threads may print at any moment, even in the middle of our line
    errors = re.findall(r'error: saving the checkpoint[^\n]*', p.stderr)
    assert len(errors) == 1, p.stderr[-4000:]
    assert os.path.join(workdir, 'checkpoints', '8') in errors[0]
    assert 'File too large' in errors[0] and 'latest: step 4' in errors[0], errors[0]
    _assert_no_traceback_of_ours(p.stderr)
    assert [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit()] == ['4']
    _assert_same_state(workdir, uninterrupted[0], 4)  # read_state verifies its checksums


@pytest.mark.slow
def test_a_diverged_state_is_not_saved_and_the_run_stops_naming_the_step(
    train_env, uninterrupted, tmp_path
):
    """Resumed from step 8 with a learning rate that overflows float32: step 9's loss is still
    finite (computed before the update) but the state it leaves is not; the run stops at the
    step-9 save with exit status 1 and one line naming step 9 and an array; step 8 stays the
    latest checkpoint, unchanged."""
    workdir = _copy(uninterrupted, tmp_path)
    p = _run(train_env, workdir, '--config.total_steps=9', '--config.optim.base_learning_rate=1e40')
    assert p.returncode == 1, p.stderr[-4000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'non-finite values at step 9 in ' in errors[0], p.stderr[-3000:]
    assert 'stays the latest (step 8)' in errors[0]
    steps = [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit()]
    assert sorted(steps) == ['4', '8']
    _assert_same_state(workdir, uninterrupted[0], 8)
