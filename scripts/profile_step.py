"""Where the training step's time goes: runs the recipe's step (the one
``benchmark_train.py`` times) under the JAX profiler, with XLA:CPU's per-operation trace
events, and prints the time per layer, per operation or per kind of operation, forward,
backward and the per-parameter update apart.

    python scripts/profile_step.py --model b0 --batch 16              # by layer
    python scripts/profile_step.py --model b0 --batch 16 --by op --top 40

Each operation of the compiled step carries the name of the model code that made it
(``blocks_1/expand_bn``, ``transpose(...)`` for the backward pass); the report joins the
trace's durations to those names. The times are of the profiled steps, averaged; the
operations of one step can overlap on the two threads of a 2-core machine, so the rows can
add up to a little more than the step. CPU only (on a GPU the same trace has device rows
that this report does not read). docs/benchmarks.md quotes its breakdowns.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from training import allocator  # noqa: E402  (light: no jax)


def _phase(op_name: str) -> str:
    if 'transpose(' in op_name:
        return 'backward'
    if '(EfficientNet)' in op_name or 'jvp(' in op_name:
        return 'forward'
    return 'update'


def _layer(op_name: str) -> str:
    """``.../blocks_3/dw_bn/se/ffi_call`` -> ``blocks_N/dw_bn/se``; the step's own operations
    (optimizer, EMA, loss) keep their last name."""
    parts = [p for p in op_name.split('/') if not re.match(r'(jit|jvp|transpose)\(', p)]
    parts = [re.sub(r'^blocks_\d+(_to_\d+)?$', 'blocks_N', p) for p in parts]
    return '/'.join(parts[:-1][-2:]) or parts[-1] if parts else op_name


def operations(hlo_text: str) -> dict[str, str]:
    """Each instruction of the compiled program -> its op_name metadata."""
    found = {}
    for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', hlo_text, re.M):
        found[m.group(1)] = m.group(2)
    return found


def durations(trace_dir: str) -> dict[str, float]:
    """Event name -> total microseconds, from the perfetto trace the profiler wrote."""
    files = sorted(
        glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)
    )
    if not files:
        raise SystemExit(f'error: the profiler wrote no perfetto trace under {trace_dir}')
    with gzip.open(files[-1]) as f:
        trace = json.load(f)
    events = trace['traceEvents'] if isinstance(trace, dict) else trace
    total = collections.Counter()
    for e in events:
        if e.get('ph') == 'X':
            total[e['name']] += e['dur']
    return total


def report(ops: dict[str, str], times: dict[str, float], steps: int, by: str, top: int) -> list:
    rows = collections.Counter()
    counts = collections.Counter()
    for name, op_name in ops.items():
        if name not in times:
            continue
        if by == 'op':
            key = (_phase(op_name), name, op_name.split('jit(train_step)/')[-1][-70:])
        elif by == 'kind':
            key = (_phase(op_name), re.sub(r'\.\d+$', '', name), op_name.split('/')[-1])
        else:
            key = (_phase(op_name), _layer(op_name))
        rows[key] += times[name] / steps / 1e3
        counts[key] += 1
    return [(ms, counts[k], k) for k, ms in rows.most_common(top)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='b0')
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--resolution', type=int, default=None, help="default: the variant's")
    parser.add_argument('--steps', type=int, default=3, help='profiled steps (after 3 warm-up)')
    parser.add_argument('--by', choices=('layer', 'op', 'kind'), default='layer')
    parser.add_argument('--top', type=int, default=30)
    args = parser.parse_args(argv)
    allocator.use_tcmalloc()
    os.environ['XLA_FLAGS'] = (
        os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_enable_xprof_traceme=true'
    ).strip()
    import jax
    from bench_recipe import RECIPE, recipe_run, synthetic_batch, trace_lower

    import efficientnet

    if jax.default_backend() != 'cpu':
        print('error: profile_step.py reads XLA:CPU trace events; run it on CPU', file=sys.stderr)
        return 2
    res = args.resolution or efficientnet.create_model(args.model).variant.resolution
    run = recipe_run(args.model, args.batch, res, 'float32')
    batch = synthetic_batch(args.batch, res, run.mesh)
    state = run.init(jax.random.key(RECIPE['seed']))
    step = trace_lower(run.train_step, state, batch).compile()
    box = [state]

    def one_step():
        box[0], metrics = step(box[0], batch)
        jax.block_until_ready(metrics)

    for _ in range(3):
        one_step()
    t = time.perf_counter()
    one_step()
    step_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                one_step()
        times = durations(trace_dir)
    rows = report(operations(step.as_text()), times, args.steps, args.by, args.top)
    print(
        f'model={args.model} batch={args.batch} resolution={res} step_s={step_s:.3f} '
        f'allocator={allocator.name()} (ms per step, operations, phase, what)'
    )
    for ms, n, key in rows:
        print(f'{ms:8.2f} {n:5d}  ' + '  '.join(key))
    return 0


if __name__ == '__main__':
    sys.exit(main())
