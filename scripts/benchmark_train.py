"""Training speed: images/s of the whole training step, and the time to the first step split
into tracing, compilation and the first run, cold and warm; on a GPU also peak memory and the
largest batch that fits; with ``--memory``, the step's memory with and without remat.

    python scripts/benchmark_train.py [--model b0[,b7,...]] [--batch 16] [--resolution 224]
        [--dtype float32|bfloat16|float16] [--steps 5] [--scan-blocks on|off|both] [--torch]
        [--max-batch] [--json] [--cache-dir DIR] [--memory] [--update-compile]

Ours is the step ``train.py`` runs with the official recipe of ``configs/base.py`` (forward
and backward in training mode, label smoothing, L2 weight decay, TF1 RMSProp with the
official schedule, the EMA update over weights and BatchNorm statistics), jitted over every
device JAX finds and fed synthetic uint8 batches already on the device; ``--dtype float16``
adds the dynamic loss scaling of ``configs/fp16.py`` (GPUs without bfloat16). ``recipe_run``
wires it from the model and the training modules alone (no config library, no input pipeline, no
TensorFlow), so the script runs on a machine that has only jax, flax, optax and torch;
``tests/test_benchmarks.py`` checks that it compiles to the program ``training.run`` builds
from ``configs/base.py``.

Time to the first step counts from building the model to the end of the first step, in
parts: ``trace_s`` (building the model and tracing and lowering the state initialisation and
the train step), ``compile_s`` (compiling both, or loading them from the persistent cache)
and ``first_run_s`` (running them once). It is measured twice, each in a fresh process:
``cold`` with an empty persistent compilation cache (a first run) and ``warm`` with the cache
the cold run filled (a rerun or a resume, as ``train.py`` does by default). ``--cache-dir
DIR`` uses DIR instead and one process only. With several models (``--model b0,b7``) the last
rows give each model's times relative to the first one's. ``--scan-blocks both`` measures
each model with and without ``config.model.scan_blocks`` (compile each stage's repeated blocks
once).

``checksums_s`` is the first computation of the state's checksums (tracing, compiling or
loading, and running the program every checkpoint save runs first). ``--update-compile``
adds ``update_trace_s`` and ``update_compile_s``: the step's per-parameter part alone (the L2
term's gradient, the optimizer update, the EMA of the weights; ``update_only_step`` in
``scripts/bench_recipe.py``) traced and compiled after the first step, not run: what grows with
the number of parameter arrays rather than with what the network computes.

``--torch`` times the same recipe in PyTorch in the same invocation (``scripts/torch_peer.py``
says which network and step). ``--max-batch`` and ``--memory`` are described in
``scripts/bench_memory.py``.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The benchmarks' shared pieces: timing and printing, the recipe's step, its memory, the
# PyTorch peer (each a module of scripts/).
from bench_memory import max_batch_jax, memory_jax  # noqa: E402
from bench_recipe import (  # noqa: E402
    RECIPE,
    jax_row,
    peak_mem_gib,
    recipe_run,
    synthetic_batch,
    trace_lower,
    update_only_step,
)
from benchmark_model import _time, benchmark_parser, report  # noqa: E402
from torch_peer import bench_torch, max_batch_torch  # noqa: E402

from training import allocator  # noqa: E402  (light: no jax, no torch)


def bench_jax(
    name: str,
    batch: int,
    res: int,
    dtype: str,
    steps: int,
    cache_dir: str,
    scan_blocks: bool | None,
    update_compile: bool = False,
) -> dict:
    import jax

    import efficientnet
    from training import compilation

    compilation.enable_persistent_cache(cache_dir)
    t0 = time.perf_counter()
    run = recipe_run(name, batch, res, dtype, scan_blocks=scan_blocks)
    key = jax.random.key(RECIPE['seed'])
    device_batch = synthetic_batch(batch, res, run.mesh)
    build = time.perf_counter() - t0
    times = {}

    def timed(label, fn):
        t = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        times[label] = time.perf_counter() - t
        return out

    init_lowered = timed('init_trace_s', lambda: trace_lower(run.init, key))
    init = timed('init_compile_s', init_lowered.compile)
    state = timed('init_run_s', lambda: init(key))
    step_lowered = timed('step_trace_s', lambda: trace_lower(run.train_step, state, device_batch))
    step = timed('step_compile_s', step_lowered.compile)
    state, metrics = timed('step_run_s', lambda: step(state, device_batch))
    first = time.perf_counter() - t0
    # What the first checkpoint adds: the state's checksums, one jitted pass (its compilation
    # grows with the number of distinct array shapes; efficientnet/weights/train_state.py).
    from efficientnet.weights import train_state

    timed('checksums_s', lambda: train_state.device_digests(state))
    if update_compile:  # the step's per-parameter part alone, traced and compiled (not run)
        grads = jax.tree.map(jax.numpy.zeros_like, state.params)
        update = update_only_step(run)
        lowered = timed('update_trace_s', lambda: trace_lower(update, state, grads))
        timed('update_compile_s', lowered.compile)

    box = [state]

    def one_step():
        box[0], m = step(box[0], device_batch)
        jax.block_until_ready(m)

    median = _time(one_step, steps)  # one warm-up call, then the median
    row = {
        **jax_row(name, batch, res, dtype),
        'scan_blocks': run.model.scan_blocks,
        'allocator': allocator.name(),
        'depthwise': efficientnet.layers.resolve_depthwise_impl('auto', run.model.dtype),
        'time_to_first_step_s': first,
        'trace_s': build + times['init_trace_s'] + times['step_trace_s'],
        'compile_s': times['init_compile_s'] + times['step_compile_s'],
        'first_run_s': times['init_run_s'] + times['step_run_s'],
        **times,
        'programs_from_cache': compilation.cache_stats()['cache_hits'],
        'step_s': median,
        'train_img_s': batch / median,
    }
    peak = peak_mem_gib()
    if peak is not None:
        row['peak_mem_gib'] = peak
    return row


def _child_rows(args, name: str, res: int, cache: str, *extra: str) -> list[dict]:
    """This script's JAX rows for ``name``, computed in a fresh process (its own compilation
    state; on a GPU, memory that PyTorch in this process can then use)."""
    import json
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), '--model', name, '--batch', str(args.batch)]
    cmd += ['--resolution', str(res), '--dtype', args.dtype, '--steps', str(args.steps)]
    cmd += ['--cache-dir', cache, '--json', *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f'{" ".join(cmd)} failed:\n{p.stderr[-4000:]}')
    return json.loads(p.stdout[p.stdout.index('[') :])


def bench_jax_cold_warm(args, name: str, res: int, scan_blocks: bool | None) -> list[dict]:
    """Runs bench_jax in two fresh processes sharing one empty compilation cache."""
    import tempfile

    scan = ['--scan-blocks', {None: 'auto', True: 'on', False: 'off'}[scan_blocks]]
    scan += ['--update-compile'] if args.update_compile else []
    with tempfile.TemporaryDirectory(prefix='xla_cache_') as cache:
        return [
            {'cache': cache_state, **_child_rows(args, name, res, cache, *scan)[0]}
            for cache_state in ('cold', 'warm')
        ]


def depth_ratios(rows: list[dict]) -> list[dict]:
    """Each model's times relative to the first model's, per cache state and scan setting."""
    out = []
    keys = ('time_to_first_step_s', 'trace_s', 'compile_s', 'first_run_s', 'update_compile_s')
    jax_rows = [r for r in rows if r.get('framework') == 'jax']
    first_model = jax_rows[0]['model']
    for r in jax_rows:
        if r['model'] == first_model:
            continue
        base = next(
            b
            for b in jax_rows
            if b['model'] == first_model
            and b.get('cache') == r.get('cache')
            and b['scan_blocks'] == r['scan_blocks']
        )
        out.append(
            {
                'ratio': f'{r["model"]} / {first_model}',
                'cache': r.get('cache', 'given'),
                'scan_blocks': r['scan_blocks'],
                **{k.removesuffix('_s'): r[k] / base[k] for k in keys if k in r},
            }
        )
    return out


def main(argv=None) -> int:
    p = benchmark_parser(__doc__, dtypes=('float32', 'bfloat16', 'float16'))
    p.add_argument(
        '--cache-dir',
        default=None,
        help='persistent compilation cache for one JAX run in this process '
        '(default: a cold and a warm run, each in a fresh process)',
    )
    p.add_argument(
        '--scan-blocks',
        choices=['auto', 'on', 'off', 'both'],
        default='auto',
        help="config.model.scan_blocks: compile each stage's repeated blocks once (default "
        'auto, as the configs: on for GPU/TPU, off on CPU)',
    )
    p.add_argument(
        '--max-batch',
        action='store_true',
        help='find the largest batch that fits on one device (bisection; GPU), JAX and, with '
        '--torch, PyTorch channels-last',
    )
    p.add_argument(
        '--torch-only',
        action='store_true',
        help='time only the PyTorch peer (a separate process from the JAX rows on one GPU)',
    )
    p.add_argument(
        '--memory',
        action='store_true',
        help='compile the step with and without remat and report its memory analysis '
        '(nothing runs; no timing)',
    )
    p.add_argument(
        '--update-compile',
        action='store_true',
        help="also trace and compile the step's per-parameter part alone (optimizer, EMA, L2 "
        'gradient) and report its times',
    )
    args = p.parse_args(argv)

    import efficientnet

    names = [efficientnet.arch.get_variant(n).name for n in args.model.split(',') if n]
    if not names:
        p.error('--model names no model')
    if args.batch < 1 or args.steps < 1:
        p.error('--batch and --steps must be positive')
    scans = {'auto': [None], 'on': [True], 'off': [False], 'both': [False, True]}[args.scan_blocks]
    results = []
    for name in names:
        res = args.resolution or efficientnet.model_info(name)['resolution']
        if args.memory:
            rows = [memory_jax(name, args.batch, res, args.dtype, r) for r in (False, True)]
            rows[1]['temp_vs_no_remat'] = rows[1]['temp_mib'] / rows[0]['temp_mib']
            rows[1]['peak_vs_no_remat'] = rows[1]['peak_mib'] / rows[0]['peak_mib']
            rows[1]['residuals_vs_no_remat'] = (
                rows[1]['residual_mib_per_example'] / rows[0]['residual_mib_per_example']
            )
            results += rows
            continue
        if args.max_batch:
            if args.cache_dir:
                results.append(max_batch_jax(name, args.batch, res, args.dtype, args.steps))
            elif not args.torch_only:
                import tempfile

                with tempfile.TemporaryDirectory(prefix='xla_cache_') as cache:
                    results += _child_rows(args, name, res, cache, '--max-batch')
            if args.torch or args.torch_only:
                results.append(max_batch_torch(name, args.batch, res, args.dtype, args.steps))
            continue
        rows = []
        for scan in [] if args.torch_only else scans:
            if args.cache_dir:
                rows.append(
                    bench_jax(
                        name,
                        args.batch,
                        res,
                        args.dtype,
                        args.steps,
                        args.cache_dir,
                        scan,
                        args.update_compile,
                    )
                )
            else:
                rows += bench_jax_cold_warm(args, name, res, scan)
        results += rows
        if args.torch or args.torch_only:
            # The ratio uses the mean speed of the last scan setting's rows (cold and warm: the
            # same program; on CPU the scanned one runs slower, docs/benchmarks.md).
            last = rows[-2:] if args.cache_dir is None else rows[-1:]  # the last setting's
            ours = sum(r['train_img_s'] for r in last) / len(last) if last else None
            firsts = {r.get('cache', 'given'): r['time_to_first_step_s'] for r in last}
            import torch

            layouts = (True,) if torch.cuda.is_available() else (True, False)
            for channels_last in layouts:
                r = bench_torch(name, args.batch, res, args.dtype, args.steps, channels_last)
                if ours:
                    r['ours_speedup'] = ours / r['train_img_s']
                for cache_state, first in firsts.items():  # > 1: ours reaches its first step sooner
                    r[f'first_step_ratio_{cache_state}'] = r['time_to_first_step_s'] / first
                results.append(r)
    if len(names) > 1 and not (args.memory or args.max_batch):
        results += depth_ratios(results)
    report(results, args.json)
    return 0


if __name__ == '__main__':
    allocator.use_tcmalloc()  # the same allocator for every framework timed in this run
    sys.exit(main())
