"""scripts/sweep.py, sweep_report.py and plot_metrics.py end to end, in subprocesses.

One 2 x 2 sweep of smoke runs is shared by the tests. Its keys (total_steps with the
staircase schedule, the fake eval-set size) leave every compiled program unchanged, so with a
persistent compilation cache only the first run compiles. The report's metrics are checked
against the final line each run printed, which train.py computes without the event files.
"""

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from configs.sweeps import grid, log_uniform, random_search, uniform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, 'scripts')
SMOKE = os.path.join(ROOT, 'configs', 'smoke.py')
FIXED = ['--config.eval_every_epochs=100.0']  # one eval, at the end
GRID = {'total_steps': [2, 4], 'data.fake_num_eval': [24, 40]}
NAMES = [f'total_steps={t},data.fake_num_eval={n}' for t in (2, 4) for n in (24, 40)]


def write_sweep(path, trials) -> str:
    with open(path, 'w') as f:
        f.write(f'def get_sweep():\n    return {trials!r}\n')
    return str(path)


def script(env, name, *args, timeout=600):
    return subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def snapshot(root) -> dict:
    """Every file under root with its size and mtime (what training would change)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.relpath(os.path.join(dirpath, f), root)] = (st.st_size, st.st_mtime_ns)
    return out


def assert_png(path, min_side=200):
    assert os.path.getsize(path) > 1000
    with open(path, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    image = np.asarray(Image.open(path).convert('RGB'))
    assert min(image.shape[:2]) >= min_side
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 10, 'the plot is blank'


@pytest.fixture(scope='module')
def env(tools_env):
    return tools_env


@pytest.fixture(scope='module')
def sweep(env, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('sweep')
    root = str(tmp / 'root')
    sweep_file = write_sweep(tmp / 'grid.py', grid(GRID))
    p = script(
        env, 'sweep.py', f'--config={SMOKE}', f'--sweep={sweep_file}', f'--workdir={root}', *FIXED
    )
    assert p.returncode == 0, f'sweep failed:\n{p.stdout}\n{p.stderr[-5000:]}'
    return root, sweep_file, p


def test_sweep_runs_each_setting_in_its_own_workdir(sweep):
    root, _, p = sweep
    assert '4 runs, 4 ran, 0 skipped as finished, 0 failed' in p.stdout
    assert sorted(os.listdir(root)) == sorted(NAMES)
    for name in NAMES:
        total, num_eval = map(int, re.findall(r'=(\d+)', name))
        with open(os.path.join(root, name, 'config.json')) as f:
            resolved = json.load(f)
        assert resolved['derived']['total_steps'] == total
        assert resolved['derived']['num_eval'] == num_eval
        assert resolved['config']['eval_every_epochs'] == 100.0
        with open(os.path.join(root, name, 'sweep_done.json')) as f:
            done = json.load(f)
        assert done['final_line'].startswith('Final eval top-1')
        assert done['final_line'].endswith(f'step {total}')
        assert 'Final eval top-1' in open(os.path.join(root, name, 'train.log')).read()


def test_rerun_skips_finished_runs(sweep, env):
    root, sweep_file, _ = sweep
    before = snapshot(root)
    p = script(
        env, 'sweep.py', f'--config={SMOKE}', f'--sweep={sweep_file}', f'--workdir={root}', *FIXED
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert '4 runs, 0 ran, 4 skipped as finished, 0 failed' in p.stdout
    assert p.stdout.count(': skipped (finished: Final eval top-1') == 4
    assert snapshot(root) == before  # no checkpoint, event file or log touched


def test_report_table_and_plot(sweep, env, tmp_path):
    root, _, _ = sweep
    prefix = str(tmp_path / 'report')
    p = script(env, 'sweep_report.py', root, '--output', prefix)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(prefix + '.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and sorted(r['run'] for r in rows) == sorted(NAMES)
    assert {(r['total_steps'], r['data.fake_num_eval']) for r in rows} == {
        (t, n) for t in ('2', '4') for n in ('24', '40')
    }
    for r in rows:
        assert r['status'] == 'finished' and r['step'] == r['total_steps']
        done = json.load(open(os.path.join(root, r['run'], 'sweep_done.json')))
        ema, raw = re.findall(r'([\d.]+)%', done['final_line'])
        assert f'{100 * float(r["final eval/ema_top1"]):.2f}' == ema
        assert f'{100 * float(r["final eval/raw_top1"]):.2f}' == raw
        assert float(r['best eval/ema_top1']) >= float(r['final eval/ema_top1'])
    best = [float(r['best eval/ema_top1']) for r in rows]
    assert best == sorted(best, reverse=True)  # ranked best first
    table = open(prefix + '.md').read()
    lines = [line for line in table.splitlines() if line.startswith('|')]
    assert len(lines) == 2 + 4
    assert lines[0].startswith('| run | total_steps | data.fake_num_eval | status |')
    assert table.split('\n\n', 2)[-1] in p.stdout  # the table is printed too
    assert_png(prefix + '.png')

    # Wall time, against TensorBoard's own reader: from the run's first event (the event file
    # opened as train.py starts) to its last eval; time to a target and the value at a time.
    from tensorboard.backend.event_processing import event_accumulator

    for r in rows:
        acc = event_accumulator.EventAccumulator(os.path.join(root, r['run']))
        acc.Reload()
        last = acc.Tensors('eval/ema_top1')[-1]
        expected = (last.wall_time - acc.FirstEventTimestamp()) / 60
        assert float(r['minutes']) == pytest.approx(expected, abs=1e-6)
    top = max(best)
    p = script(env, 'sweep_report.py', root, '--output', prefix, '--target', str(top),
               '--at-minutes', '0')  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    with open(prefix + '.csv') as f:
        rows = list(csv.DictReader(f))
    reach = f'minutes to eval/ema_top1 {top:g}'
    for r in rows:
        if float(r['best eval/ema_top1']) >= top:
            assert 0 < float(r[reach]) <= float(r['minutes'])
        else:
            assert r[reach] == ''
        assert r['eval/ema_top1 at 0 min'] == ''  # nothing is evaluated at the start

    # By default the report lands in the root, and a second report reads past those files.
    for _ in range(2):
        p = script(env, 'sweep_report.py', root)
        assert p.returncode == 0, p.stderr[-3000:]
    with open(os.path.join(root, 'sweep_report.csv')) as f:
        assert len(list(csv.DictReader(f))) == 4


def test_report_rejects_unknown_metric(sweep, env, tmp_path):
    root, _, _ = sweep
    p = script(
        env, 'sweep_report.py', root, '--metric', 'eval/top7', '--output', str(tmp_path / 'r')
    )
    assert p.returncode != 0
    assert "no run logged 'eval/top7'" in p.stderr and 'eval/ema_top1' in p.stderr


def test_plot_metrics_two_runs(sweep, env, tmp_path):
    root, _, _ = sweep
    out = str(tmp_path / 'curves.png')
    runs = [os.path.join(root, NAMES[0]), os.path.join(root, NAMES[3])]
    p = script(env, 'plot_metrics.py', *runs, '--output', out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_png(out)

    p = script(env, 'plot_metrics.py', runs[0], str(tmp_path), '--output', out)
    assert p.returncode != 0 and 'no TensorBoard event files' in p.stderr


def test_failed_run_is_reported_and_the_sweep_goes_on(sweep, env, tmp_path):
    """A run that fails (here in config resolution) is reported at the end with a nonzero exit;
    the runs after it are still visited. A workdir holding other settings is never resumed."""
    root, _, _ = sweep
    other = str(tmp_path / 'root')
    os.makedirs(other)
    shutil.copytree(os.path.join(root, NAMES[0]), os.path.join(other, NAMES[0]))
    shutil.copytree(os.path.join(root, NAMES[0]), os.path.join(other, NAMES[1]))  # mislabelled
    trials = [
        {'total_steps': 2, 'batch_size': 12},
        dict(zip(GRID, (2, 40))),
        dict(zip(GRID, (2, 24))),
    ]
    sweep_file = write_sweep(tmp_path / 'mixed.py', trials)
    before = snapshot(other)
    p = script(
        env, 'sweep.py', f'--config={SMOKE}', f'--sweep={sweep_file}', f'--workdir={other}', *FIXED
    )
    assert p.returncode == 1
    assert '3 runs, 1 ran, 1 skipped as finished, 2 failed' in p.stdout
    assert 'FAILED total_steps=2,batch_size=12: exit status 2' in p.stdout
    assert 'bn_group_size=8 must be a positive divisor' in p.stdout  # the log's tail
    assert f'FAILED {NAMES[1]}:' in p.stdout and 'holds a run with other settings' in p.stdout
    assert f'[3/3] {NAMES[0]}: skipped' in p.stdout
    after = snapshot(other)
    assert {k: v for k, v in after.items() if not k.startswith('total_steps=2,batch')} == before


def parse_train_command(line: str):
    """Parses a printed command with train.py's own flags: (workdir, locked config)."""
    argv = shlex.split(line)
    assert argv[:2] == ['python', 'train.py']
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        'config', None, 'config', flag_values=fv, lock_config=True, sys_argv=['train.py', *argv[2:]]
    )
    flags.DEFINE_string('workdir', None, 'workdir', flag_values=fv)
    fv(['train.py', *argv[2:]])
    return fv.workdir, fv.config, argv[2:]


def test_print_commands(env, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the commands name configs/smoke.py relative to the repository
    root = str(tmp_path / 'grid')
    p = script(
        env,
        'sweep.py',
        '--config=configs/smoke.py',
        '--sweep=configs/sweeps/smoke_grid.py',
        f'--workdir={root}',
        '--print-commands',
        '--config.total_steps=3',
    )
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 4
    seen = set()
    for line in lines:
        workdir, config, argv = parse_train_command(line)
        lr, ls = config.optim.base_learning_rate, config.label_smoothing
        seen.add((lr, ls))
        assert workdir == os.path.join(root, f'optim.base_learning_rate={lr},label_smoothing={ls}')
        assert config.total_steps == 3 and config.data.name == 'fake'
        assert argv[0] == '--config=configs/smoke.py'
    assert seen == {(lr, ls) for lr in (0.016, 0.064) for ls in (0.0, 0.1)}
    assert not os.path.exists(root)  # printing starts nothing


def test_random_search_is_seeded_and_in_range(env, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    space = {
        'optim.base_learning_rate': log_uniform(1e-3, 1e-1),
        'label_smoothing': uniform(0.0, 0.2),
        'ema_decay': [0.9, 0.99],
        'seed': 3,
    }
    a, b = random_search(space, 20, seed=1), random_search(space, 20, seed=1)
    assert a == b and a != random_search(space, 20, seed=2)
    for t in a:
        assert 1e-3 <= t['optim.base_learning_rate'] <= 1e-1
        assert 0 <= t['label_smoothing'] <= 0.2 and t['ema_decay'] in (0.9, 0.99)
        assert t['seed'] == 3 and len(repr(t['optim.base_learning_rate'])) <= 8  # 3 digits
    assert len({t['ema_decay'] for t in a}) == 2
    p = script(
        env,
        'sweep.py',
        '--config=configs/smoke.py',
        '--sweep=configs/sweeps/smoke_random.py',
        f'--workdir={tmp_path}',
        '--print-commands',
    )
    assert p.returncode == 0 and len(p.stdout.strip().splitlines()) == 6
    for line in p.stdout.splitlines():
        _, config, _ = parse_train_command(line)
        assert config.ema_decay in (0.9, 0.99)


def test_unknown_key_stops_the_sweep_before_any_run(env, tmp_path):
    root = str(tmp_path / 'root')
    bad = write_sweep(
        tmp_path / 'bad.py', [{'label_smoothing': 0.0}, {'optim.base_learnig_rate': 0.1}]
    )
    p = script(env, 'sweep.py', f'--config={SMOKE}', f'--sweep={bad}', f'--workdir={root}')
    assert p.returncode != 0
    assert "unknown config key 'optim.base_learnig_rate'" in p.stderr
    assert 'did you mean optim.base_learning_rate' in p.stderr
    assert not os.path.exists(root)

    good = write_sweep(tmp_path / 'good.py', [{'label_smoothing': 0.0}])
    p = script(
        env,
        'sweep.py',
        f'--config={SMOKE}',
        f'--sweep={good}',
        f'--workdir={root}',
        '--config.totl_steps=2',
    )
    assert p.returncode != 0 and "unknown config key 'totl_steps'" in p.stderr
    assert not os.path.exists(root)

    typed = write_sweep(tmp_path / 'typed.py', [{'label_smoothing': 'high'}])
    p = script(env, 'sweep.py', f'--config={SMOKE}', f'--sweep={typed}', f'--workdir={root}')
    assert p.returncode != 0 and "label_smoothing='high'" in p.stderr
    assert not os.path.exists(root)
