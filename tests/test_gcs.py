"""Every path on gs://, against a real GCS emulator (the ``gcs_emulator`` fixture): train.py on a
bucket workdir, killed with SIGKILL once its first checkpoint is committed there and resumed by
the same command, ends bit-identical to the local reference run; scripts/eval.py and
scripts/export.py read that workdir and write their outputs to the bucket; nothing named
``gs:`` appears on local disk; a missing bucket stops train.py at start-up with one line.

The commands run from a scratch working directory, so that a gs:// path mistaken for a local
one would show up there. This process never talks to the bucket through TensorFlow: the
emulator's environment is for the subprocesses under test; this side reads objects through the
emulator's JSON API (and copies a checkpoint to local disk to read it with orbax).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from efficientnet.weights import train_state
from tests.test_eval_predict import logged_eval
from tests.test_train_loop import ROOT, _assert_same_state, _cmd, _final_line

BUCKET = 'bucket'
WORKDIR = f'gs://{BUCKET}/run'


@pytest.fixture(scope='module')
def gcs_env(train_env, gcs_emulator):
    gcs_emulator.make_bucket(BUCKET)
    return {**train_env, **gcs_emulator.env}


def _run(env, cwd, *args, timeout=420):
    p = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    name = os.path.basename(args[1])
    assert p.returncode == 0, f'{name} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}'
    return p


def _committed_steps(emulator, prefix):
    """Steps under ``prefix`` that orbax has finished: on gs:// it writes the step directory
    under its final name and, last, the commit file directly in it (the one inside ``state/``
    comes earlier)."""
    parts = [n[len(prefix) :].split('/') for n in emulator.list_objects(BUCKET, prefix)]
    return sorted(int(p[0]) for p in parts if p[0].isdigit() and p[1:] == [train_state.COMMIT_FILE])


def _download(emulator, prefix, target):
    """Copies every object under ``prefix`` to the local directory ``target``."""
    for name in emulator.list_objects(BUCKET, prefix):
        if name.endswith('/'):  # TensorFlow's directory markers
            continue
        path = os.path.join(target, name[len(prefix) :])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(emulator.read_object(BUCKET, name))


def _local_gs_paths(*roots):
    """Anything named like 'gs:' under ``roots``: what a gs:// path taken for a local one makes."""
    return [
        os.path.join(d, n)
        for root in roots
        for d, dirs, files in os.walk(root)
        for n in dirs + files
        if n.startswith('gs:')
    ]


def test_missing_bucket_stops_train_py_before_anything_is_written(gcs_env, tmp_path):
    started = time.monotonic()
    p = subprocess.run(
        _cmd('gs://no-such-bucket/run'),
        env=gcs_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.monotonic() - started
    assert p.returncode == 2, p.stderr[-3000:]
    expected = (
        '--workdir=gs://no-such-bucket/run: bucket no-such-bucket does not exist (create it '
        'with gcloud storage buckets create gs://no-such-bucket)'
    )
    lines = [line.strip().removeprefix('- ') for line in p.stderr.splitlines()]
    assert f'error: invalid config: {expected}' in lines, p.stderr[-3000:]
    assert 'Traceback' not in p.stderr and 'first step' not in p.stderr
    assert os.listdir(tmp_path) == [], 'nothing may be written locally instead'
    print(f'train.py refused the missing bucket after {seconds:.1f} s')


@pytest.mark.slow
def test_smoke_run_on_gcs_killed_resumed_evaluated_exported(
    gcs_env, gcs_emulator, uninterrupted, tmp_path
):
    scratch = tmp_path / 'cwd'
    scratch.mkdir()
    ref_dir, ref = uninterrupted
    timings = {}

    # 1. Train on the bucket; SIGKILL as soon as the first checkpoint is committed there.
    started = time.monotonic()
    log = (tmp_path / 'first.err').open('w')
    p = subprocess.Popen(_cmd(WORKDIR), env=gcs_env, cwd=scratch, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 420
        while not _committed_steps(gcs_emulator, 'run/checkpoints/'):
            assert p.poll() is None, (tmp_path / 'first.err').read_text()[-4000:]
            assert time.monotonic() < deadline, 'no checkpoint reached the bucket'
            time.sleep(0.1)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
        log.close()
    assert p.returncode == -signal.SIGKILL
    timings['train until killed'] = time.monotonic() - started
    killed_at = _committed_steps(gcs_emulator, 'run/checkpoints/')
    assert killed_at and max(killed_at) < 8, killed_at

    # 2. The same command resumes from the bucket and ends where the local run ended.
    started = time.monotonic()
    second = _run(gcs_env, scratch, *_cmd(WORKDIR))
    timings['resume'] = time.monotonic() - started
    assert f'resumed from step {max(killed_at)}' in second.stderr, second.stderr[-3000:]
    assert _final_line(second.stdout) == _final_line(ref.stdout)
    assert _committed_steps(gcs_emulator, 'run/checkpoints/')[-1] == 8
    copy = str(tmp_path / 'copy')
    _download(gcs_emulator, 'run/', copy)
    _assert_same_state(copy, ref_dir, 8)
    with open(os.path.join(copy, 'config.json')) as f:
        assert json.load(f)['derived']['total_steps'] == 8
    assert os.path.exists(os.path.join(copy, 'checkpoints', '8', 'data'))
    assert any(n.startswith('events.out.tfevents') for n in os.listdir(copy))

    # 3. scripts/eval.py on the bucket's step 8 reports the local run's logged eval, to gs://.
    started = time.monotonic()
    eval_py = os.path.join(ROOT, 'scripts', 'eval.py')
    step_dir = f'{WORKDIR}/checkpoints/8'
    out = f'{WORKDIR}/eval/step8.json'
    args = [step_dir, '--batch-size', '8', '--depthwise-impl', 'xla', '--output', out]
    _run(gcs_env, scratch, sys.executable, eval_py, *args)
    timings['eval'] = time.monotonic() - started
    report = json.loads(gcs_emulator.read_object(BUCKET, 'run/eval/step8.json'))
    logged = logged_eval(ref.stderr, 8)
    assert report['step'] == 8 and report['count'] == int(logged['eval/count'])
    for key in ('top1', 'top5', 'loss'):  # logged with 6 significant digits
        assert report[key] == pytest.approx(float(logged[f'eval/ema_{key}']), rel=1e-5)

    # 4. scripts/export.py from the bucket's workdir to an ONNX file in the bucket, checked by
    # onnxruntime reading it back from there.
    started = time.monotonic()
    export_py = os.path.join(ROOT, 'scripts', 'export.py')
    onnx_out = f'gs://{BUCKET}/export/smoke.onnx'
    args = [WORKDIR, '--format', 'onnx', '--output', onnx_out, '--check']
    done = _run(gcs_env, scratch, sys.executable, export_py, *args)
    timings['export'] = time.monotonic() - started
    assert 'check passed' in done.stdout, done.stdout
    import onnx

    model = onnx.load_from_string(gcs_emulator.read_object(BUCKET, 'export/smoke.onnx'))
    assert [o.name for o in model.graph.output] == ['logits', 'probabilities']

    assert _local_gs_paths(tmp_path, ROOT) == []
    print('seconds: ' + ', '.join(f'{k} {v:.0f}' for k, v in timings.items()))
