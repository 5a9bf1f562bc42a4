"""train.py end to end, in subprocesses and in-process: the smoke config (steps, checkpoints,
evals, a resume that ends bit-identical to an uninterrupted run), two processes through
jax.distributed against one 8-device process, and a bad command line failing before anything
compiles.

The subprocesses share a persistent compilation cache, so only the first run of each program
pays for XLA compilation.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import smoke
from efficientnet.weights import train_state
from scripts import plot_metrics
from tests.test_eval_predict import assert_eval_agrees_with_training_log
from training import allocator, compilation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def env(train_env):
    return train_env  # conftest.py: shared with tests/test_gcs.py, like the reference run


def _cmd(workdir, *overrides):
    return [
        sys.executable,
        os.path.join(ROOT, 'train.py'),
        '--config=' + os.path.join(ROOT, 'configs', 'smoke.py'),
        f'--workdir={workdir}',
        *overrides,
    ]


def _train(env, workdir, *overrides, timeout=420):
    p = subprocess.run(
        _cmd(workdir, *overrides),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert p.returncode == 0, f'train.py failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}'
    return p


def _final_line(stdout):
    return [line for line in stdout.splitlines() if line.strip()][-1]


def _load(workdir, step):
    return train_state.read_state(os.path.join(workdir, 'checkpoints', str(step), 'state'))


def test_smoke_run_trains_checkpoints_evaluates(uninterrupted):
    workdir, p = uninterrupted
    assert _final_line(p.stdout).startswith('Final eval top-1: ')
    log = p.stderr
    assert 'step 8/8' in log and 'ETA' in log and 'img/s' in log
    if allocator.find_tcmalloc():  # train.py re-executes itself under it (make setup installs it)
        assert 'memory allocator: tcmalloc' in log
    assert log.count('eval at step') == 2 and 'on 40 examples' in log
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')))[-1] == '8'
    assert os.listdir(os.path.join(workdir, 'best'))  # the best-by-top-1 checkpoint
    with open(os.path.join(workdir, 'checkpoints', '8', 'data', 'metadata')) as f:  # the stream
        assert json.load(f) == {
            'version': 2, 'step': 8, 'seed': 0, 'num_examples': 64, 'global_batch_size': 16,
        }  # fmt: skip
    with open(os.path.join(workdir, 'config.json')) as f:
        resolved = json.load(f)
    assert resolved['derived']['total_steps'] == 8
    assert resolved['derived']['learning_rate'] == pytest.approx(0.016 * 16 / 256)
    assert any(n.startswith('events.out.tfevents') for n in os.listdir(workdir))


def test_console_says_each_report_once_and_tensorboard_keeps_every_scalar(uninterrupted):
    """One console line per metric report (step, epoch, images/s, ETA) and one per eval; the
    metric writer logs nothing to the console (it printed every report a second time), while
    the TensorBoard event files keep every scalar at every reported step."""
    workdir, p = uninterrupted
    lines = p.stderr.splitlines()
    reports = [ln for ln in lines if re.search(r'\bstep \d+/8 ', ln)]
    assert [re.search(r'step (\d+)/8', ln).group(1) for ln in reports] == ['2', '4', '6', '8']
    for ln in reports:
        assert re.search(r'epoch \d+\.\d\d .* img/s .* ETA \d+m\d\ds$', ln), ln
    evals = [re.search(r'eval at step (\d+) epoch', ln) for ln in lines]
    assert [m.group(1) for m in evals if m] == ['4', '8']
    assert 'train/loss=' not in p.stderr and 'eval/ema_top1=' not in p.stderr  # clu's format
    scalars = plot_metrics.read_scalars(workdir)
    for tag in ('train/loss', 'train/top1', 'train/images_per_sec', 'train/epoch'):
        assert [s for s, _ in scalars[tag]] == [2, 4, 6, 8], tag
    for tag in ('eval/ema_top1', 'eval/raw_top1', 'eval/ema_loss', 'eval/count'):
        assert [s for s, _ in scalars[tag]] == [4, 8], tag


def test_latest_and_best_checkpoints_carry_checksums_and_orbax_metadata(uninterrupted, caplog):
    """Every saved step, latest and best, holds orbax's step metadata and the checksums of its
    arrays, and reads back verified without orbax warning about missing metadata."""
    workdir, _ = uninterrupted
    step_dirs = [
        os.path.join(workdir, sub, name)
        for sub in (train_state.LATEST_DIR, train_state.BEST_DIR)
        for name in os.listdir(os.path.join(workdir, sub))
    ]
    assert len(step_dirs) == 3, step_dirs  # checkpoints/4, checkpoints/8, best/<4 or 8>
    for step_dir in step_dirs:
        assert os.path.isfile(os.path.join(step_dir, '_CHECKPOINT_METADATA')), step_dir
        record = train_state.read_checksums(step_dir)
        with caplog.at_level('WARNING'):
            state = train_state.read_state(os.path.join(step_dir, train_state.STATE_ITEM))
        assert len(record['arrays']) == len(jax.tree.leaves(state))
    assert not [r for r in caplog.records if r.levelname in ('WARNING', 'ERROR')], [
        r.getMessage() for r in caplog.records
    ]


def test_eval_script_on_the_smoke_workdir_reports_the_runs_final_eval(uninterrupted, tmp_path):
    """scripts/eval.py reads the fake data from the same source as train.py: on the final
    checkpoint it reports the run's own final eval (EMA and raw top-1, top-5, loss)."""
    workdir, p = uninterrupted
    assert_eval_agrees_with_training_log(workdir, 8, p.stderr, tmp_path, batch_size=8)


def _assert_same_state(workdir, ref_dir, step):
    flat_ref = dict(jax.tree_util.tree_flatten_with_path(_load(ref_dir, step))[0])
    for path, a in jax.tree_util.tree_flatten_with_path(_load(workdir, step))[0]:
        np.testing.assert_array_equal(a, flat_ref[path], err_msg=jax.tree_util.keystr(path))


def test_interrupted_in_process_and_resumed_on_the_command_line_is_bit_identical(
    env, uninterrupted, tmp_path
):
    """The first epoch (4 of 8 steps) runs in-process through ``train.train_and_evaluate``: it
    returns its eval and writes config.json and a checkpoint equal to the command-line run's at
    step 4. Rerunning the command line resumes from that checkpoint and data state and ends with
    exactly the uninterrupted run's state."""
    import train

    workdir, ref_dir = str(tmp_path), uninterrupted[0]
    config = smoke.get_config()
    config.num_epochs = 1.0
    # The programs the command-line run compiled, from the cache it shares with this process.
    previous = jax.config.jax_compilation_cache_dir
    compilation.enable_persistent_cache(env['JAX_COMPILATION_CACHE_DIR'])
    try:
        result = train.train_and_evaluate(config, workdir)
    finally:
        compilation.enable_persistent_cache(previous)
    assert result['step'] == 4 and result['eval/count'] == 40
    for name in ('raw', 'ema'):
        assert 0.0 <= result[f'eval/{name}_top1'] <= result[f'eval/{name}_top5'] <= 1.0
        assert np.isfinite(result[f'eval/{name}_loss'])
    with open(os.path.join(workdir, 'config.json')) as f:
        derived = json.load(f)['derived']
    assert (derived['total_steps'], derived['normalization']) == (4, 'imagenet')
    assert os.listdir(os.path.join(workdir, 'best'))
    _assert_same_state(workdir, ref_dir, 4)

    second = _train(env, workdir)
    assert 'resumed from step 4' in second.stderr
    assert 'training from step 4 to 8' in second.stderr
    # The resumed run loads the train step the uninterrupted run compiled from the persistent
    # compilation cache, and still ends bit-identical.
    hits, requests = map(
        int,
        re.search(r'(\d+) of (\d+) programs loaded from the persistent', second.stderr).groups(),
    )
    assert 1 <= hits <= requests, second.stderr[-2000:]
    _assert_same_state(workdir, ref_dir, 8)
    assert _final_line(second.stdout) == _final_line(uninterrupted[1].stdout)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _start_two_processes(env, workdir, log_dir, *overrides):
    """Starts the smoke config as two processes; returns (processes, [(out, err) paths])."""
    port = _free_port()
    e = dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=4')
    # Output goes to files, not pipes: a process blocked on a full pipe while the other waits
    # for it at a barrier would deadlock until the coordination service aborts both.
    logs = [(log_dir / f'p{i}.out', log_dir / f'p{i}.err') for i in range(2)]
    procs = []
    for i, (out_path, err_path) in enumerate(logs):
        with open(out_path, 'w') as out_f, open(err_path, 'w') as err_f:
            procs.append(
                subprocess.Popen(
                    _cmd(
                        workdir,
                        *overrides,
                        f'--coordinator_address=127.0.0.1:{port}',
                        '--num_processes=2',
                        f'--process_id={i}',
                    ),
                    env=e,
                    cwd=ROOT,
                    stdout=out_f,
                    stderr=err_f,
                    text=True,
                )
            )
    return procs, logs


def _run_two_processes(env, workdir, log_dir):
    """Runs the smoke config as two processes; returns [(returncode, stdout, stderr)] * 2."""
    procs, logs = _start_two_processes(env, workdir, log_dir)
    try:
        for p in procs:
            p.wait(timeout=480)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, o.read_text(), r.read_text()) for p, (o, r) in zip(procs, logs)]


def _first_error(err: str) -> str:
    """The stderr lines from the first error on (the tail is often just thread dumps)."""
    lines = err.splitlines()
    marks = ('Traceback', 'Error', 'error', 'F0', 'E0', 'F1', 'E1', 'Fatal')
    start = next((i for i, line in enumerate(lines) if line.startswith(marks)), 0)
    return '\n'.join(lines[max(0, start - 5) : start + 60])


def test_two_processes_match_one_process(env, uninterrupted, tmp_path):
    """Two processes with 4 CPU devices each, through jax.distributed on 127.0.0.1, end with
    the parameters of one process with 8 devices (same global batches). (This test found
    orbax's barrier-name collision between the latest and best managers saving the same step:
    see training/checkpoint.py.)"""
    workdir = str(tmp_path / 'run')
    logs = tmp_path / 'logs'
    logs.mkdir()
    attempts = [_run_two_processes(env, workdir, logs)]
    outs = [(out, err) for _, out, err in attempts[-1]]
    for i, (code, out, err) in enumerate(attempts[-1]):
        assert code == 0, f'process {i}: {out[-2000:]}\n{_first_error(err)}\n{err[-3000:]}'
    # gloo may print to stdout: look for our line, not at a fixed position.
    assert any(line.startswith('Final eval top-1') for line in outs[0][0].splitlines())
    assert '2 processes, 8 devices' in outs[0][1]
    ours, ref = _load(workdir, 8), _load(uninterrupted[0], 8)
    for name in ('params', 'batch_stats', 'ema_params', 'ema_batch_stats'):
        for (path, a), b in zip(
            jax.tree_util.tree_flatten_with_path(ours[name])[0], jax.tree.leaves(ref[name])
        ):
            np.testing.assert_allclose(
                a, b, rtol=1e-4, atol=1e-5, err_msg=f'{name}{jax.tree_util.keystr(path)}'
            )


def test_two_processes_preempted_on_one_worker_save_the_same_step_and_exit_cleanly(env, tmp_path):
    """SIGTERM to process 1 only (one preempted worker): jax's preemption sync point stops both
    processes at the same step; they save it together and exit with status 0."""
    workdir = str(tmp_path / 'run')
    procs, logs = _start_two_processes(env, workdir, tmp_path, '--config.num_epochs=100')
    try:
        deadline = time.monotonic() + 420
        while 'step 2/400' not in logs[0][1].read_text():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
                _first_error(r.read_text()) for _, r in logs
            ]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [(o.read_text(), r.read_text()) for o, r in logs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f'process {i}: {out[-2000:]}\n{_first_error(err)}'
    saved = [
        int(m.group(1))
        for _, err in outs
        for m in [re.search(r'preemption requested: saving at step (\d+)', err)]
        if m
    ]
    assert len(saved) == 2 and saved[0] == saved[1], saved
    assert 2 <= saved[0] < 400
    assert any(
        line.startswith(f'Preempted: saved at step {saved[0]};') for line in outs[0][0].splitlines()
    )
    steps = [int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit()]
    assert max(steps) == saved[0]
    assert os.path.exists(os.path.join(workdir, 'checkpoints', str(saved[0]), 'data'))
    assert int(_load(workdir, saved[0])['step']) == saved[0]


def test_two_processes_killed_after_a_checkpoint_resume_as_one_process(
    env, uninterrupted, tmp_path
):
    """A run started as 2 processes x 4 devices is killed (SIGKILL, both processes) once its
    step-4 checkpoint is complete; the same command as 1 process x 8 devices resumes it (the
    data state is the step: the same global stream on any process count) and ends with the
    parameters of the uninterrupted 1 x 8 run (all-reduce rounding aside)."""
    workdir = str(tmp_path / 'run')
    # Many epochs, so the processes are still running when the checkpoint appears; the
    # exponential schedule does not depend on the run length.
    procs, logs = _start_two_processes(env, workdir, tmp_path, '--config.num_epochs=100')
    ckpt_dir = os.path.join(workdir, 'checkpoints')
    try:
        deadline = time.monotonic() + 900
        while not os.path.isdir(os.path.join(ckpt_dir, '4')):  # renamed into place when complete
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
                _first_error(r.read_text()) for _, r in logs
            ]
            time.sleep(0.05)
        for p in procs:
            p.kill()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    killed_at = max(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
    if killed_at >= 8:
        pytest.skip(f'the machine was too slow: the kill landed after step {killed_at}')
    second = _train(env, workdir)
    assert f'resumed from step {killed_at}' in second.stderr
    assert '1 processes, 8 devices' in second.stderr
    ours, ref = _load(workdir, 8), _load(uninterrupted[0], 8)
    for name in ('params', 'batch_stats', 'ema_params', 'ema_batch_stats'):
        for (path, a), b in zip(
            jax.tree_util.tree_flatten_with_path(ours[name])[0], jax.tree.leaves(ref[name])
        ):
            np.testing.assert_allclose(
                a, b, rtol=1e-4, atol=1e-5, err_msg=f'{name}{jax.tree_util.keystr(path)}'
            )


@pytest.mark.parametrize(
    'override,message',
    [
        ('--config.batchsize=16', 'batchsize'),
        ('--config.batch_size=-4', 'config.batch_size must be a positive integer'),
    ],
)
def test_bad_command_line_fails_before_compiling(env, tmp_path, override, message):
    p = subprocess.run(
        _cmd(str(tmp_path), override),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert p.returncode != 0
    assert message in p.stderr
    assert 'first step' not in p.stderr


def test_profiler_window_writes_a_trace_of_the_train_steps(env, tmp_path):
    workdir = str(tmp_path)
    p = _train(env, workdir, '--config.profile.start_step=2', '--config.profile.num_steps=2')
    assert 'step 8/8' in p.stderr
    traces = [
        os.path.join(d, f)
        for d, _, files in os.walk(os.path.join(workdir, 'profile'))
        for f in files
        if f.endswith('.xplane.pb')
    ]
    assert len(traces) == 1, traces
    with open(traces[0], 'rb') as f:
        assert b'train_step' in f.read()  # the window holds the jitted step's executions


def test_sigterm_saves_exits_cleanly_and_resumes_bit_identical(env, uninterrupted, tmp_path):
    """SIGTERM mid-run: the run saves at the step it reached and exits with status 0; the saved
    step carries checksums and verifies; the same command resumes, and a run resumed to step 8
    equals the uninterrupted one."""
    workdir = str(tmp_path)
    # Many epochs, so the signal surely lands mid-run; the exponential schedule does not
    # depend on the run length, so the first 8 steps are those of the 8-step run.
    p = subprocess.Popen(
        _cmd(workdir, '--config.num_epochs=100'),
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        err_lines = []
        for line in p.stderr:
            err_lines.append(line)
            if 'step 2/400' in line:
                p.send_signal(signal.SIGTERM)
                break
        rest_out, rest_err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    err = ''.join(err_lines) + rest_err
    assert p.returncode == 0, err[-4000:]
    assert _final_line(rest_out).startswith('Preempted: saved at step')
    saved = int(_final_line(rest_out).split('step ')[1].split(';')[0])
    if saved >= 8:
        pytest.skip(f'the machine was too slow: the signal landed at step {saved}')
    step_dir = os.path.join(workdir, 'checkpoints', str(saved))
    assert train_state.read_checksums(step_dir) is not None  # and _load verifies them:
    assert int(_load(workdir, saved)['step']) == saved
    second = _train(env, workdir, '--config.num_epochs=2')
    assert f'resumed from step {saved}' in second.stderr
    _assert_same_state(workdir, uninterrupted[0], 8)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(
    env, uninterrupted, tmp_path
):
    """Resumed from step 8 with an absurd learning rate, the loss overflows; the run stops with
    an error naming the step, and the step-8 checkpoint is left as it was."""
    import shutil

    source, _ = uninterrupted
    workdir = str(tmp_path / 'run')
    shutil.copytree(source, workdir)
    before = _load(workdir, 8)
    p = subprocess.run(
        _cmd(workdir, '--config.total_steps=16', '--config.optim.base_learning_rate=1e30'),
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
        cwd=ROOT,
    )
    assert p.returncode != 0
    assert 'non-finite loss' in p.stderr and 'at step ' in p.stderr, p.stderr[-3000:]
    assert 'is kept (step 8)' in p.stderr, p.stderr[-3000:]
    steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())
    assert steps[-1] == 8
    after = _load(workdir, 8)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
