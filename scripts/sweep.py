"""Runs a hyperparameter sweep: one ``train.py`` run per set of overrides, each in its own workdir.

    python scripts/sweep.py --config=configs/smoke.py --sweep=configs/sweeps/smoke_grid.py \
        --workdir=/tmp/grid [--config.total_steps=4 ...] [--print-commands]

The sweep file defines ``get_sweep() -> list[dict]`` (see configs/sweeps/). Every override key
and value, and any ``--config.key=value`` given here (applied to all runs), is checked against
the locked config before the first run starts; an unknown key stops the sweep with its name.

Each run is exactly the command ``--print-commands`` prints for it, started as a subprocess, so
a crash in one run is reported and the sweep goes on; the exit status is nonzero if any run
failed. Runs go to ``WORKDIR/<key=value,...>``, logs to ``<run>/train.log``. A run writes its
settings to ``<run>/sweep_run.json`` when it starts and ``<run>/sweep_done.json`` once
train.py has printed its final eval; re-running the sweep skips those and resumes the others
from their last checkpoint (train.py resumes by itself). A workdir holding a run with other
settings is reported as a failure, never resumed.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # configs import `configs.base`, sweeps `configs.sweeps`

import configs  # noqa: E402
from configs import key_problem  # noqa: E402
from efficientnet import cli, paths  # noqa: E402

TRAIN_PY = os.path.join(REPO_ROOT, 'train.py')
RUN_FILE = 'sweep_run.json'  # written when a run starts: its settings
DONE_FILE = 'sweep_done.json'  # written when train.py returned its final eval
LOG_FILE = 'train.log'
FINAL_LINE_PREFIX = 'Final eval top-1'
_MAX_NAME = 200


class SweepError(cli.UserError, ValueError):
    """A sweep that cannot start: bad sweep file, unknown key, wrong value type."""


# ----------------------------------------------------------------------------- loading


def _load_module(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise SweepError(f'{what} file not found: {path}')
    name = '_sweep_' + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(config_spec: str) -> Any:
    """The locked config as train.py builds it from ``--config=PATH[:ARG]``."""
    path, arg = config_spec, None
    if not os.path.isfile(path) and ':' in path:
        path, arg = path.rsplit(':', 1)
    module = _load_module(path, 'config')
    config = module.get_config(arg) if arg is not None else module.get_config()
    config.lock()
    return config


def load_sweep(path: str) -> list[dict[str, Any]]:
    """``get_sweep()`` of the sweep file, checked to be a non-empty list of dicts."""
    module = _load_module(path, 'sweep')
    if not hasattr(module, 'get_sweep'):
        raise SweepError(f'sweep file {path} defines no get_sweep()')
    trials = module.get_sweep()
    if not isinstance(trials, list) or not trials:
        raise SweepError(f'get_sweep() in {path} must return a non-empty list of dicts')
    for i, t in enumerate(trials):
        if not isinstance(t, dict) or not all(isinstance(k, str) for k in t):
            raise SweepError(f'get_sweep() in {path}: entry {i} is not a dict of overrides: {t!r}')
    return trials


# ----------------------------------------------------------------------------- checking


def _apply(config: Any, key: str, value: Any) -> str | None:
    """Sets ``key`` on the locked ``config`` (which checks the type); returns a problem or None."""
    problem = key_problem(config, key)
    if problem:
        return problem
    if value is not None and not isinstance(value, (bool, int, float, str)):
        return f'{key}={value!r}: only bool, int, float, str or None values fit on a command line'
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
        node = node[part]
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        return f'{key}={value!r}: {e}'
    return None


def check_overrides(
    config: Any,
    trials: Sequence[dict[str, Any]],
    fixed_keys: Sequence[str] = (),
    fixed_args: Sequence[str] = (),
    config_spec: str | None = None,
) -> None:
    """Applies every run's overrides to a copy of the locked config and checks the keys given
    on the command line (``fixed_keys``; with ``config_spec``, their ``--config.key=value``
    arguments ``fixed_args`` are parsed as train.py will parse them, values included). Raises
    SweepError listing every unknown key, ill-typed value and clashing name, before anything
    runs."""
    if config_spec is not None:
        problems = configs.override_problems(config_spec, list(fixed_args))
    else:
        problems = [p for p in (key_problem(config, k) for k in fixed_keys) if p]
    for i, trial in enumerate(trials):
        trial_config = copy.deepcopy(config)
        for key, value in trial.items():
            problem = _apply(trial_config, key, value)
            if problem:
                problems.append(f'run {i} {trial}: {problem}')
    swept = {k for t in trials for k in t}
    problems += [
        f'{k!r} is both swept and set on the command line' for k in fixed_keys if k in swept
    ]
    names: dict[str, dict] = {}
    for trial in trials:
        name = run_name(trial)
        if name in names:
            problems.append(f'runs {names[name]} and {trial} get the same workdir name {name!r}')
        names[name] = trial
    if problems:
        raise SweepError(cli.format_problems('sweep not started', problems))


# ----------------------------------------------------------------------------- commands


def format_value(value: Any) -> str:
    """The value as ``--config.key=`` parses it back (floats in their shortest exact form)."""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def run_name(overrides: dict[str, Any]) -> str:
    """A readable, filesystem-safe workdir name: ``optim.base_learning_rate=0.1,seed=2``."""
    if not overrides:
        return 'base'
    name = ','.join(f'{k}={format_value(v)}' for k, v in overrides.items())
    name = re.sub(r'[^A-Za-z0-9._=,+-]', '_', name)
    if len(name) > _MAX_NAME:  # keep it a legal file name, still unique
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f'{name[: _MAX_NAME - 11]}-{digest}'
    return name


def train_args(config_spec: str, workdir: str, overrides: dict[str, Any]) -> list[str]:
    """The arguments after ``train.py`` for one run."""
    return [f'--config={config_spec}', f'--workdir={workdir}'] + [
        f'--config.{k}={format_value(v)}' for k, v in overrides.items()
    ]


def _train_py_for_display() -> str:
    rel = os.path.relpath(TRAIN_PY)
    return TRAIN_PY if rel.startswith('..') else rel


def command_line(args: list[str]) -> str:
    return shlex.join(['python', _train_py_for_display(), *args])


# ----------------------------------------------------------------------------- running


def read_json(path: str) -> dict | None:
    file = paths.as_path(path)
    try:
        return json.loads(file.read_text()) if file.exists() else None
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json(path: str, record: dict) -> None:
    paths.write_atomic(path, json.dumps(record, indent=2))


def run_identity(config_spec: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run: the config file (absolute, so a re-run from another
    directory still matches) and every override as train.py receives it."""
    path, arg = config_spec, ''
    if not os.path.isfile(path) and ':' in path:
        path, arg = path.rsplit(':', 1)
        arg = ':' + arg
    return {
        'config': os.path.abspath(path) + arg,
        'overrides': {k: format_value(v) for k, v in overrides.items()},
    }


def _log_tail(path: str, lines: int = 6) -> str:
    file = paths.as_path(path)
    if not file.exists():
        return ''
    tail = file.read_bytes().decode(errors='replace').splitlines()[-lines:]
    return '\n'.join('      ' + line[:300] for line in tail)


class _ForwardTerm:
    """SIGTERM to the sweep goes to the running train.py (which saves and exits); the sweep then
    stops, and re-running it resumes."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.requested = False

    def __enter__(self) -> _ForwardTerm:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self.requested = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def run_trial(args: list[str], workdir: str, term: _ForwardTerm) -> tuple[bool, str]:
    """Runs train.py with ``args``; returns (finished, the last line it printed or why not)."""
    log_path = os.path.join(workdir, LOG_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        # stderr streams into a local file: the log itself, or for gs:// a temporary one.
        remote = paths.is_remote(workdir)
        local_log = os.path.join(tmp, LOG_FILE) if remote else log_path
        with open(local_log, 'a') as log:
            log.write(
                f'# {datetime.datetime.now().isoformat(timespec="seconds")}: {command_line(args)}\n'
            )
            log.flush()
            term.child = subprocess.Popen(
                [sys.executable, TRAIN_PY, *args],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env={**os.environ, cli.DIE_WITH_PARENT_ENV: '1'},
            )
            stdout, _ = term.child.communicate()
            returncode = term.child.returncode
            term.child = None
            log.write(stdout)
        if remote:  # one upload: the log so far, then this run's
            old = paths.as_path(log_path)
            new = paths.as_path(local_log).read_bytes()
            paths.write_atomic(log_path, (old.read_bytes() if old.exists() else b'') + new)
    lines = [line for line in stdout.splitlines() if line.strip()]
    last = lines[-1] if lines else ''
    if returncode != 0:
        return False, f'exit status {returncode}'
    if not last.startswith(FINAL_LINE_PREFIX):
        return False, last or 'train.py printed no final eval line'
    return True, last


def _describe(identity: dict[str, Any]) -> str:
    return ' '.join([identity['config'], *(f'{k}={v}' for k, v in identity['overrides'].items())])


def run_sweep(
    config_spec: str, root: str, fixed: dict[str, Any], trials: list[dict[str, Any]]
) -> int:
    """Runs the trials one after another; returns the number that did not finish."""
    failures: list[tuple[str, str, str]] = []
    counts = {'ran': 0, 'skipped': 0}
    with _ForwardTerm() as term:
        for i, trial in enumerate(trials):
            name = run_name(trial)
            tag = f'[{i + 1}/{len(trials)}] {name}'
            if term.requested:
                failures.append((name, 'not started: the sweep got SIGTERM', ''))
                continue
            workdir = os.path.join(root, name)
            args = train_args(config_spec, workdir, {**fixed, **trial})
            identity = run_identity(config_spec, {**fixed, **trial})
            done = read_json(os.path.join(workdir, DONE_FILE))
            started = read_json(os.path.join(workdir, RUN_FILE))
            previous = done or started
            if previous is not None and previous.get('identity') != identity:
                why = (
                    f'{workdir} holds a run with other settings '
                    f'({_describe(previous["identity"])}); use another --workdir'
                )
                print(f'{tag}: FAILED: {why}', flush=True)
                failures.append((name, why, ''))
                continue
            if done is not None:
                counts['skipped'] += 1
                print(f'{tag}: skipped (finished: {done.get("final_line", "")})', flush=True)
                continue
            paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
            record = {'identity': identity, 'swept': trial, 'command': command_line(args)}
            write_json(os.path.join(workdir, RUN_FILE), record)
            print(f'{tag}: running (log: {os.path.join(workdir, LOG_FILE)})', flush=True)
            start = time.time()
            finished, last = run_trial(args, workdir, term)
            seconds = time.time() - start
            counts['ran'] += 1
            if finished:
                when = datetime.datetime.now().isoformat(timespec='seconds')
                record.update(final_line=last, seconds=round(seconds, 1), finished=when)
                write_json(os.path.join(workdir, DONE_FILE), record)
                print(f'{tag}: finished in {seconds:.0f} s: {last}', flush=True)
            else:
                tail = _log_tail(os.path.join(workdir, LOG_FILE))
                print(f'{tag}: FAILED after {seconds:.0f} s: {last}', flush=True)
                failures.append((name, last, tail))
    print(
        f'sweep: {len(trials)} runs, {counts["ran"]} ran, {counts["skipped"]} skipped as '
        f'finished, {len(failures)} failed',
        flush=True,
    )
    for name, why, tail in failures:
        print(f'  FAILED {name}: {why}' + (f'\n{tail}' if tail else ''), flush=True)
    return len(failures)


def _parse_fixed(extra: list[str]) -> dict[str, str]:
    """``--config.key=value`` arguments given to the sweep, as strings (train.py parses them)."""
    fixed = {}
    for arg in extra:
        m = re.fullmatch(r'--config\.([^=]+)=(.*)', arg)
        if not m:
            raise SweepError(f'unexpected argument {arg!r}: expected --config.key=value')
        fixed[m.group(1)] = m.group(2)
    return fixed


def main(argv: list[str] | None = None) -> int:
    """The sweep's exit status: 0 when every run finished, 1 when one failed, 2 (after one line
    ``error: ...``) when the sweep could not start: bad flags, sweep file or overrides."""
    return cli.run(_main, argv)


def _main(argv: list[str] | None) -> int:
    parser = cli.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        epilog='Other arguments of the form --config.key=value apply to every run.',
    )
    parser.add_argument('--config', required=True, help='config file, as for train.py')
    parser.add_argument('--sweep', required=True, help='sweep file defining get_sweep()')
    parser.add_argument(
        '--workdir', required=True, help='root, local or gs://; each run gets a subdirectory'
    )
    parser.add_argument(
        '--print-commands',
        action='store_true',
        help='print one train.py command per run instead of running them',
    )
    ns, extra = parser.parse_known_args(argv)
    fixed = _parse_fixed(extra)
    config = load_config(ns.config)
    trials = load_sweep(ns.sweep)
    check_overrides(config, trials, list(fixed), extra, config_spec=ns.config)
    if ns.print_commands:
        for trial in trials:
            workdir = os.path.join(ns.workdir, run_name(trial))
            print(command_line(train_args(ns.config, workdir, {**fixed, **trial})))
        return 0
    bad = paths.problems([('--workdir', ns.workdir)])
    if bad:
        raise SweepError(bad[0])
    paths.as_path(ns.workdir).mkdir(parents=True, exist_ok=True)
    return 1 if run_sweep(ns.config, ns.workdir, fixed, trials) else 0


if __name__ == '__main__':
    sys.exit(main())
