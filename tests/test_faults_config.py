"""Bad input is refused before anything runs: train.py reports every problem of a command line
or a config at once, one line each, with exit status 2 and no traceback, before anything is
compiled (jax's compile log stays silent) and before anything is written (the workdir is never
created); the tools (eval, predict, export, sweep) end bad input the same way, and --verbose
shows the traceback.

What must survive each fault: the workdir, untouched (here: never created).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

import configs
import efficientnet
from configs import smoke
from efficientnet.weights import save_variables, train_state
from scripts import eval as eval_script
from scripts import export as export_script
from scripts import predict as predict_script
from scripts import sweep as sweep_script
from training import checkpoint
from training.config_resolve import ConfigError, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, 'configs', 'smoke.py')
COMPILE_LOG = 'Compiling '  # what JAX_LOG_COMPILES=1 makes jax log for every compilation


def _train_cmd(workdir, *args, verbose=False):
    return [
        sys.executable,
        os.path.join(ROOT, 'train.py'),
        f'--config={SMOKE}',
        f'--workdir={workdir}',
        *args,
        *(['--verbose'] if verbose else []),
    ]


def _train(train_env, workdir, *args, verbose=False):
    started = time.monotonic()
    p = subprocess.run(
        _train_cmd(workdir, *args, verbose=verbose),
        env=dict(train_env, JAX_LOG_COMPILES='1'),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    return p, time.monotonic() - started


def _error_lines(stderr: str) -> list[str]:
    """The report: from the line starting 'error: ' to the end (absl's log lines of the
    start-up come before it)."""
    lines = stderr.rstrip('\n').splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('error: '))
    return lines[start:]


def _assert_refused(p, workdir, expected: list[str]) -> list[str]:
    """Exit status 2, no traceback, one line per expected problem (each found in exactly one
    line), nothing compiled, the workdir never created."""
    assert p.returncode == 2, p.stderr[-3000:]
    assert 'Traceback' not in p.stderr, p.stderr[-3000:]
    report = _error_lines(p.stderr)
    problem_lines = report if len(expected) == 1 else report[1:]
    assert len(problem_lines) == len(expected), report
    for text in expected:
        assert sum(text in line for line in problem_lines) == 1, (text, report)
    assert COMPILE_LOG not in p.stderr
    assert not os.path.exists(workdir)
    return report


def _variables(width: float, num_classes: int = 10) -> dict:
    """Zero variables of the smoke model's tree at ``width`` (0.25: the smoke model's own)."""
    model = efficientnet.create_model(
        'efficientnet-b0', width=width, depth=0.25, num_classes=num_classes
    )
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _orbax_checkpoint(root, variables, step=3) -> str:
    """A workdir-shaped orbax checkpoint ``root/checkpoints/<step>/state`` of ``variables``,
    as train.py lays it out (raw and EMA copies)."""
    state = {
        'step': np.int32(step),
        'params': variables['params'],
        'batch_stats': variables['batch_stats'],
        'ema_params': variables['params'],
        'ema_batch_stats': variables['batch_stats'],
    }
    path = os.path.join(root, train_state.LATEST_DIR, str(step), train_state.STATE_ITEM)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(path, state)
    return str(root)


# ------------------------------------------------------------------------------ train.py


def test_bad_flags_are_reported_together_in_one_line_each(train_env, tmp_path):
    """A string learning rate (absl's fatal error before) and an unknown key (three chained
    tracebacks before), on one command line: both named, exit 2, nothing run."""
    workdir = str(tmp_path / 'run')
    p, _ = _train(
        train_env, workdir, '--config.optim.base_learning_rate=fast', '--config.batchsize=16'
    )
    report = _assert_refused(
        p,
        workdir,
        [
            "--config.optim.base_learning_rate=fast: could not convert string to float: 'fast'",
            "--config.batchsize=16: unknown config key 'batchsize' (did you mean batch_size",
        ],
    )
    assert report[0] == 'error: bad command line:'


def test_bad_values_are_reported_together_before_anything_compiles(train_env, tmp_path):
    """resolution=0 (failed inside the model before), a batch that 8 devices do not divide (nor
    the smoke config's BatchNorm group of 8), a missing data directory and a missing init_from:
    all at once."""
    workdir = str(tmp_path / 'run')
    missing = tmp_path / 'no_such_weights.msgpack'
    p, seconds = _train(
        train_env,
        workdir,
        '--config.data.resolution=0',
        '--config.batch_size=12',
        '--config.data.name=folder',
        f'--config.data.folder={tmp_path / "no_such_folder"}',
        f'--config.init_from={missing}',
    )
    report = _assert_refused(
        p,
        workdir,
        [
            'config.data.resolution must be a positive integer, got 0',
            'the batch per step (12 = config.batch_size 12 / grad_accum_steps 1) is not '
            'divisible by the 8 devices',
            'config.eval_batch_size=12 is not divisible by the 8 devices',
            'config.model.bn_group_size=8 must be a positive divisor of the batch per step (12)',
            f"dataset 'folder' is not available (looked in {tmp_path / 'no_such_folder'})",
            f"config.init_from='{missing}': no such file or directory: {missing}",
        ],
    )
    assert report[0] == 'error: invalid config:'
    print(f'refused in {seconds:.1f} s (interpreter start and imports included)')


@pytest.mark.slow  # two train.py starts
def test_init_from_of_another_model_is_refused_from_its_metadata(train_env, tmp_path):
    """A checkpoint of a wider model: its shapes are read from orbax's metadata and compared
    with the model's (eval_shape) before anything compiles or is written."""
    other = _orbax_checkpoint(tmp_path / 'wide', _variables(width=0.5))
    workdir = str(tmp_path / 'run')
    p, _ = _train(train_env, workdir, f'--config.init_from={other}')
    (line,) = _assert_refused(p, workdir, ['does not fit config.model'])
    assert line.startswith(f"error: invalid config: config.init_from='{other}' does not fit")
    assert 'only the classifier may differ' in line
    # --verbose: the same line, after the traceback that led to it.
    p, _ = _train(train_env, workdir, f'--config.init_from={other}', verbose=True)
    assert p.returncode == 2 and 'Traceback' in p.stderr
    assert p.stderr.rstrip().splitlines()[-1] == line
    assert not os.path.exists(workdir)


@pytest.mark.slow  # a train.py start up to its first compilation
def test_a_good_config_passes_validation_and_reaches_compilation(train_env, tmp_path):
    """The control for the tests above: the same command line with a fitting init_from (other
    class count: only the classifier differs) gets past validation, writes config.json and
    compiles (jax logs it), so the silence of the compile log above means something."""
    fitting = tmp_path / 'fits.msgpack'
    save_variables(str(fitting), _variables(width=0.25, num_classes=5), 'efficientnet-b0')
    workdir = tmp_path / 'run'
    err_path = tmp_path / 'err'
    with open(err_path, 'w') as err:
        proc = subprocess.Popen(
            _train_cmd(workdir, f'--config.init_from={fitting}'),
            env=dict(train_env, JAX_LOG_COMPILES='1'),
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 240
        # It compiles (the teacher of distillation and the model are built first) and writes
        # config.json.
        while COMPILE_LOG not in err_path.read_text() or not (workdir / 'config.json').is_file():
            assert proc.poll() is None, err_path.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()


def test_override_problems_name_every_bad_flag():
    problems = configs.override_problems(
        SMOKE,
        [
            '--config.optim.base_learning_rate=0.1',
            '--config.optim.base_learning_rate=abc',
            '--config.data.resolutoin=64',
            '--config.model=b1',
            '--config.batch_size=1.5',
        ],
    )
    assert len(problems) == 4, problems
    assert "could not convert string to float: 'abc'" in problems[0]
    assert "unknown config key 'data.resolutoin' (did you mean data.resolution" in problems[1]
    assert "'model' is a group of fields" in problems[2]
    assert problems[3].startswith('flag --config.batch_size=1.5:')
    missing = SMOKE + '_missing.py'
    (problem,) = configs.override_problems(missing, ['--config.batch_size=8'])
    assert problem.startswith(f'--config={missing}: ') and '\n' not in problem


def test_resolve_checks_types_and_ranges_without_raising_on_them():
    """Values of the wrong type from a config file are reported, never compared (a string
    compared with a number raised a TypeError before)."""
    c = ml_collections.ConfigDict(smoke.get_config().to_dict(), type_safe=False)
    c.label_smoothing = 'high'
    c.model.width = 'wide'
    c.optim.decay_factor = 1.5
    c.data.resolution = 0
    c.data.random_translate = 1.5
    with pytest.raises(ConfigError) as e:
        resolve(c, device_count=8)
    lines = str(e.value).splitlines()
    assert lines[0] == 'invalid config:'
    for text in (
        "config.label_smoothing must be a number in [0, 1), got 'high'",
        "config.model.width must be a positive number or None, got 'wide'",
        'config.optim.decay_factor must be a number in (0, 1], got 1.5',
        'config.data.resolution must be a positive integer, got 0',
        'config.data.random_translate must be an integer >= 0 or None, got 1.5',
    ):
        assert f'  - {text}' in lines
    c = ml_collections.ConfigDict(smoke.get_config().to_dict(), type_safe=False)
    c.data.random_translate = c.data.resolution
    with pytest.raises(ConfigError) as e:
        resolve(c, device_count=8)
    assert str(e.value) == (
        f'invalid config: config.data.random_translate={c.data.resolution} must be below '
        f'config.data.resolution={c.data.resolution} (a shift of a whole side leaves a blank '
        'image)'
    )


def test_init_from_shapes_come_from_metadata_and_match_the_arrays(tmp_path):
    variables = _variables(width=0.5)
    root = _orbax_checkpoint(tmp_path / 'ckpt', variables)
    shapes = checkpoint.pretrained_shapes(root)
    assert shapes == jax.tree.map(np.shape, variables)
    restored = checkpoint.load_pretrained(root)  # the arrays themselves, for comparison
    assert shapes == jax.tree.map(np.shape, restored)
    narrow = _variables(width=0.25)
    foreign = checkpoint.untransferable(narrow, shapes)
    assert foreign and not any('classifier' in k for k in foreign)
    assert checkpoint.untransferable(narrow, jax.tree.map(np.shape, narrow)) == []
    other_head = _variables(width=0.25, num_classes=3)
    assert checkpoint.untransferable(narrow, other_head) == []  # only the classifier differs


# ------------------------------------------------------------------------------ the tools


class Evil:
    """Any class: torch.load(weights_only=True) refuses to unpickle it."""


@pytest.fixture(scope='module')
def unsafe_pth(tmp_path_factory) -> str:
    import torch

    path = str(tmp_path_factory.mktemp('unsafe') / 'model.pth')
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'extra': Evil()}, path)
    return path


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith('error: ') and 'Traceback' not in err
    return lines[0]


def test_a_quiet_import_drops_what_loading_wrote_to_stderr_unless_it_fails(tmp_path):
    """efficientnet.cli.quiet_import: writes to file descriptor 2 while a package loads (as
    TensorFlow's native start-up notices on Intel CPUs, which TF_CPP_MIN_LOG_LEVEL does not
    hide) are dropped; a load that fails shows them. Asking whether a package is installed
    loads nothing and keeps the import quiet for later."""
    for name, tail in (('noisy_ok', ''), ('noisy_bad', "raise ImportError('broken')\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / '__init__.py').write_text(
            f"import os\nos.write(2, b'{name}: native start-up line\\n')\n{tail}"
        )
    code = (
        'import importlib.util, sys\n'
        'from efficientnet import cli\n'
        "cli.quiet_import('noisy_ok'); cli.quiet_import('noisy_bad')\n"
        "assert importlib.util.find_spec('noisy_ok') is not None\n"
        'import noisy_ok\n'
        "print(sum(getattr(f, 'package', None) == 'noisy_ok' for f in sys.meta_path))\n"
        'try:\n'
        '    import noisy_bad\n'
        'except ImportError as e:\n'
        "    print('failed:', e)\n"
    )
    p = subprocess.run(
        [sys.executable, '-c', code],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT])),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ['0', 'failed: broken']
    assert 'noisy_ok: native start-up line' not in p.stderr
    assert p.stderr.count('noisy_bad: native start-up line') == 1, p.stderr


def test_eval_and_predict_refuse_an_unsafe_pickle_in_one_line(tools_env, unsafe_pth, capsys):
    rc = predict_script.main(['x.jpg', '--weights', unsafe_pth, '--model', 'b0'])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and 'refused to unpickle the weights file' in line
    assert 'an object of type ' in line and 'test_faults_config.Evil besides tensors' in line
    p = subprocess.run(
        [sys.executable, 'scripts/eval.py', unsafe_pth, '--model', 'b0'],
        env=tools_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert p.returncode == 2
    assert _one_error_line(p.stderr) == line
    p = subprocess.run(
        [sys.executable, 'scripts/eval.py', unsafe_pth, '--model', 'b0', '--verbose'],
        env=tools_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert p.returncode == 2 and 'Traceback' in p.stderr and 'UnpicklingError' in p.stderr
    assert p.stderr.rstrip().splitlines()[-1] == line


@pytest.mark.parametrize(
    'tool,args,expected',
    [
        (eval_script, ['{tmp}/gone.msgpack'], 'error: weights not found: {tmp}/gone.msgpack'),
        (predict_script, ['x.jpg', '--weights', '{tmp}/none.pth'], 'weights not found'),
        (predict_script, ['x.jpg'], 'the following arguments are required: --weights'),
        (export_script, ['{tmp}/w.msgpack', '--format', 'nope', '--output', 'x'], 'nope'),
        (export_script, ['{tmp}/w.msgpack', '--format', 'onnx', '--output', 'x'], 'not found'),
        (
            sweep_script,
            ['--config', SMOKE, '--sweep', '{tmp}/none.py', '--workdir', '{tmp}/s'],
            'sweep file not found: {tmp}/none.py',
        ),
    ],
)
def test_tools_end_bad_input_with_one_line_and_status_2(tool, args, expected, tmp_path, capsys):
    args = [a.format(tmp=tmp_path) for a in args]
    assert tool.main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert expected.format(tmp=tmp_path) in line


def test_sweep_checks_fixed_values_as_train_py_parses_them(tmp_path, capsys):
    sweep_file = tmp_path / 'grid.py'
    sweep_file.write_text("def get_sweep():\n    return [{'seed': 1}, {'seed': 2}]\n")
    rc = sweep_script.main(
        [
            f'--config={SMOKE}',
            f'--sweep={sweep_file}',
            f'--workdir={tmp_path / "s"}',
            '--config.optim.base_learning_rate=abc',
            '--config.totl_steps=3',
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and 'Traceback' not in err
    lines = err.strip().splitlines()
    assert lines[0] == 'error: sweep not started:'
    assert any(re.search(r'base_learning_rate=abc: could not convert', x) for x in lines)
    assert any("unknown config key 'totl_steps'" in x for x in lines)
    assert not (tmp_path / 's').exists()
