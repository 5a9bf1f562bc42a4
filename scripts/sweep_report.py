"""Summarises a sweep: one row per run with its swept values and its final and best metrics.

    python scripts/sweep_report.py ROOT [--metric eval/ema_top1] [--output PREFIX]
        [--target 0.9] [--at-minutes 5]

Reads every run directory under ROOT (one holding ``config.json``, as train.py writes, or a
``sweep_run.json`` from scripts/sweep.py), its TensorBoard event files and, when present, the
sweep's markers. Writes PREFIX.csv, PREFIX.md (a markdown table, also printed) and PREFIX.png
(the best metric against each swept value, one line per setting of the other swept keys);
PREFIX defaults to ROOT/sweep_report. ROOT and PREFIX may be local or gs://.

The swept keys are the overrides sweep.py recorded plus any config field whose value differs
between runs, so runs launched from ``--print-commands`` on a cluster are reported the same way.
Each row also has the wall-clock minutes from the run's start to its last value of the metric;
``--target`` adds the minutes to the first value that reaches it, ``--at-minutes`` the value
logged by then (time to accuracy, accuracy at equal time). The metric tags are those train.py
writes: eval/ema_top1, eval/raw_top1, eval/ema_loss, ...
(``--metric eval/top1`` means eval/ema_top1, the EMA weights train.py reports first).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plot_metrics import read_scalars, save_figure  # noqa: E402  (scripts/ is on sys.path)

from efficientnet import paths  # noqa: E402

RUN_FILE, DONE_FILE = 'sweep_run.json', 'sweep_done.json'
ALIASES = {'eval/top1': 'eval/ema_top1', 'eval/top5': 'eval/ema_top5', 'eval/loss': 'eval/ema_loss'}


def _load_json(path: str) -> dict | None:
    file = paths.as_path(path)
    try:
        return json.loads(file.read_text()) if file.exists() else None
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f'{prefix}{k}.'))
        else:
            flat[prefix + k] = v
    return flat


def _parse(text: str) -> Any:
    """A string override as a number or bool where it reads as one (for sorting and plots)."""
    if not isinstance(text, str):
        return text
    for cast in (int, float):
        try:
            return cast(text)
        except (TypeError, ValueError):
            pass
    return {'True': True, 'False': False, 'None': None}.get(text, text)


def load_runs(root: str) -> list[dict[str, Any]]:
    """Every run directory directly under ``root``: name, config, swept overrides, scalars."""
    if not paths.as_path(root).is_dir():
        raise ValueError(f'{root} is not a directory')
    runs = []
    for name in paths.listdir(root):
        workdir = os.path.join(root, name)
        if not paths.as_path(workdir).is_dir():
            continue  # this report's own files, anything else
        resolved = _load_json(os.path.join(workdir, 'config.json'))
        started = _load_json(os.path.join(workdir, RUN_FILE))
        if resolved is None and started is None:
            continue
        runs.append(
            {
                'name': name,
                'config': _flatten(resolved['config']) if resolved else {},
                'total': (resolved or {}).get('derived', {}).get('total_micro_steps'),
                'swept': {k: _parse(v) for k, v in (started or {}).get('swept', {}).items()},
                'done': paths.as_path(workdir, DONE_FILE).exists(),
                'scalars': read_scalars(workdir, wall_time=True),
            }
        )
    if not runs:
        raise ValueError(f'no runs under {root} (no */config.json or */{RUN_FILE})')
    return runs


def swept_keys(runs: Sequence[dict]) -> list[str]:
    """Keys the sweep recorded (in their order), then config fields that differ between runs."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run['swept'] if k not in keys]
    configs = [r['config'] for r in runs if r['config']]
    for key in sorted({k for c in configs for k in c}):
        values = {json.dumps(c.get(key), sort_keys=True) for c in configs}
        if len(values) > 1 and key not in keys:
            keys.append(key)
    return keys


def _value(run: dict, key: str) -> Any:
    return run['config'][key] if key in run['config'] else run['swept'].get(key)


def _reached(points: Sequence[tuple], target: float, mode: str) -> float | None:
    """Minutes at which the metric first reached ``target`` (None: never)."""
    hit = [p for p in points if (p[1] <= target if mode == 'min' else p[1] >= target)]
    return hit[0][2] / 60 if hit else None


def _at(points: Sequence[tuple], minutes: float) -> float | None:
    """The metric's last value logged within ``minutes`` of the run's start (None: none)."""
    within = [p for p in points if p[2] <= 60 * minutes]
    return within[-1][1] if within else None


def summarise(
    runs: Sequence[dict],
    metric: str,
    mode: str,
    target: float | None = None,
    at_minutes: float | None = None,
) -> tuple[list[str], list[dict]]:
    """(columns, rows), rows sorted best first; runs without the metric come last. Times are
    wall-clock minutes from the run's first event (``plot_metrics.read_scalars``): to the
    metric's last value, to the first value that reaches ``target``, and the value at
    ``at_minutes``."""
    keys = swept_keys(runs)
    other = {'eval/ema_top1': 'eval/raw_top1', 'eval/raw_top1': 'eval/ema_top1'}.get(
        metric, 'eval/ema_top1'
    )
    columns = [
        'run',
        *keys,
        'status',
        'step',
        f'final {metric}',
        f'best {metric}',
        'best step',
        f'final {other}',
        'final train/loss',
        'minutes',
        *([f'minutes to {metric} {target:g}'] if target is not None else []),
        *([f'{metric} at {at_minutes:g} min'] if at_minutes is not None else []),
    ]
    rows = []
    for run in runs:
        s = run['scalars']
        points = s.get(metric, [])
        last_step = max((p[-1][0] for p in s.values() if p), default=None)
        if run['done'] or (points and run['total'] and points[-1][0] >= run['total']):
            status = 'finished'  # sweep.py's marker, or the final eval was logged
        elif last_step is not None:
            status = f'partial ({last_step}/{run["total"] or "?"})'
        else:
            status = 'no metrics'
        pick = min if mode == 'min' else max
        best = pick(points, key=lambda p: p[1]) if points else None
        row = {
            'run': run['name'],
            **{k: _value(run, k) for k in keys},
            'status': status,
            'step': last_step,
            f'final {metric}': points[-1][1] if points else None,
            f'best {metric}': best[1] if best else None,
            'best step': best[0] if best else None,
            f'final {other}': s[other][-1][1] if s.get(other) else None,
            'final train/loss': s['train/loss'][-1][1] if s.get('train/loss') else None,
            'minutes': points[-1][2] / 60 if points else None,
        }
        if target is not None:
            row[f'minutes to {metric} {target:g}'] = _reached(points, target, mode)
        if at_minutes is not None:
            row[f'{metric} at {at_minutes:g} min'] = _at(points, at_minutes)
        rows.append(row)
    sign = 1 if mode == 'min' else -1
    rows.sort(key=lambda r: (r[f'best {metric}'] is None, sign * (r[f'best {metric}'] or 0)))
    return columns, rows


def _cell(value: Any, exact: bool = False) -> str:
    """Metrics to 4 significant digits; swept values (``exact``) as the run names show them."""
    if value is None:
        return ''
    if isinstance(value, float):
        return repr(value) if exact else f'{value:.4g}'
    return str(value)


def write_csv(path: str, columns: list[str], rows: list[dict]) -> None:
    text = io.StringIO(newline='')
    writer = csv.writer(text)
    writer.writerow(columns)
    writer.writerows([['' if r[c] is None else r[c] for c in columns] for r in rows])
    paths.write_atomic(path, text.getvalue())


def markdown_table(columns: list[str], rows: list[dict], keys: Sequence[str] = ()) -> str:
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    for r in rows:
        cells = [_cell(r[c], exact=c in keys).replace('|', '\\|') for c in columns]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def plot_best(path: str, keys: list[str], rows: list[dict], metric: str) -> None:
    """One panel per swept key: best metric against its value, a line per setting of the other
    keys (a random search gives scattered points); log x when positive values span 10x."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    best = f'best {metric}'
    rows = [r for r in rows if r[best] is not None]
    panels = keys or ['run']
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, key in zip(axes[0], panels):
        values = [r[key] for r in rows]
        numeric = all(_is_number(v) for v in values)
        labels = list(
            dict.fromkeys(_cell(v, exact=True) for v in values)
        )  # categories, first seen first
        pos = (
            (lambda v: v)
            if numeric
            else (lambda v, labels=labels: labels.index(_cell(v, exact=True)))
        )
        if not numeric:
            ax.set_xticks(
                range(len(labels)), labels, rotation=30 if len(labels) > 3 else 0, fontsize=8
            )
        rest = [k for k in keys if k != key]
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            groups.setdefault(tuple(_cell(r[k], exact=True) for k in rest), []).append(r)
        for group, members in groups.items():
            members = sorted(members, key=lambda r: pos(r[key]))
            label = ', '.join(f'{k}={v}' for k, v in zip(rest, group)) or None
            ax.plot(
                [pos(r[key]) for r in members],
                [r[best] for r in members],
                marker='o',
                label=label if len(groups) > 1 else None,
            )
        if numeric and values and min(values) > 0 and max(values) >= 10 * min(values):
            ax.set_xscale('log')
        ax.set_xlabel(key)
        ax.set_ylabel(best)
        ax.grid(alpha=0.3)
        if 1 < len(groups) <= 8:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('root', help='the sweep root (scripts/sweep.py --workdir)')
    parser.add_argument('--metric', default='eval/ema_top1', help='tag to rank runs by')
    parser.add_argument(
        '--mode',
        choices=('auto', 'max', 'min'),
        default='auto',
        help='whether higher is better (auto: min for losses, else max)',
    )
    parser.add_argument('--output', help='path prefix of the outputs (default ROOT/sweep_report)')
    parser.add_argument(
        '--target', type=float, help='add the minutes each run took to reach this metric value'
    )
    parser.add_argument(
        '--at-minutes',
        type=float,
        help="add each run's metric as logged within this many minutes of its start",
    )
    ns = parser.parse_args(argv)
    metric = ALIASES.get(ns.metric, ns.metric)
    mode = ns.mode if ns.mode != 'auto' else ('min' if 'loss' in metric else 'max')
    try:
        runs = load_runs(ns.root)
        tags = sorted({t for r in runs for t in r['scalars']})
        if tags and metric not in tags:
            raise ValueError(f'no run logged {metric!r}; logged tags: {", ".join(tags)}')
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    prefix = ns.output or os.path.join(ns.root, 'sweep_report')
    columns, rows = summarise(runs, metric, mode, ns.target, ns.at_minutes)
    keys = columns[1 : columns.index('status')]
    write_csv(prefix + '.csv', columns, rows)
    table = markdown_table(columns, rows, keys)
    paths.write_atomic(
        prefix + '.md',
        f'# Sweep {paths.absolute(ns.root)}\n\nRanked by best {metric} ({mode}).\n\n{table}',
    )
    plot_best(prefix + '.png', keys, rows, metric)
    print(table, end='')
    print(f'wrote {prefix}.csv, {prefix}.md, {prefix}.png')
    return 0


if __name__ == '__main__':
    sys.exit(main())
