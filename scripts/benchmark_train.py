"""Training speed: images/s of the whole training step, and the time to the first step split
into tracing, compilation and the first run, cold and warm; on a GPU also peak memory and the
largest batch that fits; with ``--memory``, the step's memory with and without remat.

    python scripts/benchmark_train.py [--model b0[,b7,...]] [--batch 16] [--resolution 224]
        [--dtype float32|bfloat16] [--steps 5] [--scan-blocks on|off|both] [--torch]
        [--max-batch] [--json] [--cache-dir DIR] [--memory]

Ours is the step ``train.py`` runs with the official recipe of ``configs/base.py`` (forward
and backward in training mode, label smoothing, L2 weight decay, TF1 RMSProp with the
official schedule, the EMA update over weights and BatchNorm statistics), jitted over every
device JAX finds and fed synthetic uint8 batches already on the device. ``recipe_run`` wires
it from the model and the training modules alone (no config library, no input pipeline, no
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

``--torch`` runs the same recipe in PyTorch in the same invocation: efficientnet_pytorch when
it is installed, else timm's ``efficientnet_bN`` (the same network), and for an EfficientNetV2
timm's ``tf_efficientnetv2_*`` (the same network with TF SAME padding); channels-last (its fastest
layout; AMP bfloat16 on CUDA with ``--dtype bfloat16``) and, on CPU, also the default
contiguous layout. Its step is forward, label-smoothed cross-entropy, backward,
``torch.optim.RMSprop`` (alpha 0.9, momentum 0.9, eps 1e-3, weight decay 1e-5) and an EMA
update of parameters and buffers; its first step includes building the network.

On a GPU each row reports the device's peak memory (``peak_mem_gib``: XLA's allocator
statistics, ``torch.cuda.max_memory_allocated`` for PyTorch). ``--max-batch`` finds the
largest batch whose training step runs, by bisection (for JAX starting from the compiled
step's memory analysis at ``--batch``; for PyTorch from ``--batch`` by doubling), and times
the step there.

``--memory`` only compiles the same step (nothing runs, so it works for B7 at 600 px on a
CPU), once with ``config.model.remat`` off and once on, and reports two figures per device:

- ``peak``: XLA's memory analysis of the compiled step, ``argument_size_in_bytes`` (state and
  batch) plus ``output_size_in_bytes`` (new state and metrics) less ``alias_size_in_bytes``
  (the donated state's buffers reused for the new state, which would otherwise count twice)
  plus ``temp_size_in_bytes`` (activations kept for the backward pass and other scratch): the
  most the program can hold at once. ``temp`` is the part that grows with the batch.
- ``residuals``: the bytes the forward pass hands to the backward pass (the values
  ``jax.vjp`` of the training-mode model keeps, inputs and parameters not counted), before
  any compiler: what remat removes, whatever backend compiles the step.

Per-example figures divide by the examples on one device.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_model import _time, benchmark_parser, report  # noqa: E402  (timing and printing shared)

from training import allocator  # noqa: E402  (light: no jax, no torch)

# The official recipe's step, as configs/base.py sets it (tests/test_benchmarks.py compares
# the programs), with ImageNet's sizes: the schedule's step counts do not change the cost.
RECIPE = {
    'base_learning_rate': 0.016,  # per 256 examples
    'warmup_epochs': 5.0,
    'decay_epochs': 2.4,
    'decay_factor': 0.97,
    'rmsprop_decay': 0.9,
    'momentum': 0.9,
    'rmsprop_epsilon': 1e-3,
    'weight_decay': 1e-5,  # L2 in the loss
    'label_smoothing': 0.1,
    'ema_decay': 0.9999,
    'seed': 0,
    'fsdp_min_size': 2**14,
}
IMAGENET = {'num_classes': 1000, 'num_train': 1_281_167, 'num_eval': 50_000}


@dataclasses.dataclass(frozen=True)
class BenchRun:
    """The pieces of ``training.run.Run`` that a benchmark uses."""

    model: Any
    mesh: Any
    tx: Any
    abstract_variables: Any
    abstract_state: Any
    state_shardings: Any
    init: Any  # jitted: key -> state, in its shardings
    train_step: Any


def recipe_run(
    name: str,
    batch: int,
    res: int,
    dtype: str,
    *,
    remat: bool = False,
    scan_blocks: bool = True,
    devices: list | None = None,
) -> BenchRun:
    """The training step of the official recipe for ``name`` at ``batch`` and ``res`` px,
    wired as ``training.run.create_run`` wires it (same modules, same order)."""
    import jax.numpy as jnp

    import efficientnet
    from training import optim, sharding
    from training import state as state_lib
    from training.train_step import make_train_step

    r = RECIPE
    model = efficientnet.create_model(
        name,
        num_classes=IMAGENET['num_classes'],
        dtype=jnp.dtype(dtype),
        resolution=res,
        remat=remat,
        scan_blocks=scan_blocks,
    )
    mesh = sharding.create_mesh(1, devices)
    steps_per_epoch = max(1, IMAGENET['num_train'] // batch)
    schedule = optim.create_learning_rate_schedule(
        r['base_learning_rate'] * batch / 256.0,
        kind='exponential',
        warmup_steps=int(round(r['warmup_epochs'] * steps_per_epoch)),
        decay_steps=max(1, int(round(r['decay_epochs'] * steps_per_epoch))),
        decay_factor=r['decay_factor'],
    )
    variables = state_lib.abstract_variables(model, res)
    decay_mask = optim.weight_decay_mask(variables['params'], variables.get('batch_stats', {}))
    tx = optim.tf1_rmsprop(
        schedule, decay=r['rmsprop_decay'], momentum=r['momentum'], eps=r['rmsprop_epsilon']
    )
    abstract = state_lib.abstract_state_from_variables(variables, tx)
    shardings = sharding.state_shardings(abstract, mesh, r['fsdp_min_size'])
    step = make_train_step(
        model,
        tx,
        schedule,
        mesh=mesh,
        state_shardings=shardings,
        seed=r['seed'],
        label_smoothing=r['label_smoothing'],
        weight_decay=r['weight_decay'],
        weight_decay_mask=decay_mask,
        ema_decay=r['ema_decay'],
        normalization=model.variant.normalization,
        compute_dtype=jnp.dtype(dtype),
    )
    init = state_lib.jit_init(state_lib.make_init_fn(model, tx, res), shardings, mesh)
    return BenchRun(model, mesh, tx, variables, abstract, shardings, init, step)


def _jax_row(name: str, batch: int, res: int, dtype: str) -> dict:
    """The fields every JAX result row starts with: what ran, and on what."""
    import jax

    return {
        'framework': 'jax',
        'backend': jax.default_backend(),
        'device': str(jax.devices()[0].device_kind),
        'devices': jax.device_count(),
        'model': name,
        'batch': batch,
        'resolution': res,
        'dtype': dtype,
    }


def _synthetic_batch(batch: int, res: int, mesh) -> dict:
    import numpy as np

    from training import sharding

    rng = np.random.default_rng(0)
    local = {
        'image': rng.integers(0, 256, (batch, res, res, 3), dtype=np.uint8),
        'label': rng.integers(0, 1000, (batch,), dtype=np.int32),
    }
    return sharding.global_batch(local, mesh)


def _trace_lower(jitted, *args):
    """``jitted`` traced and lowered for ``args`` (``Traced.lower`` where jax has it)."""
    if hasattr(jitted, 'trace'):
        return jitted.trace(*args).lower()
    return jitted.lower(*args)


def _peak_mem_gib() -> float | None:
    """The device's peak bytes in use so far, where the backend keeps statistics (GPU, TPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get('peak_bytes_in_use')
    return None if peak is None else peak / 2.0**30


def bench_jax(
    name: str, batch: int, res: int, dtype: str, steps: int, cache_dir: str, scan_blocks: bool
) -> dict:
    import jax

    import efficientnet
    from training import compilation

    compilation.enable_persistent_cache(cache_dir)
    t0 = time.perf_counter()
    run = recipe_run(name, batch, res, dtype, scan_blocks=scan_blocks)
    key = jax.random.key(RECIPE['seed'])
    device_batch = _synthetic_batch(batch, res, run.mesh)
    build = time.perf_counter() - t0
    times = {}

    def timed(label, fn):
        t = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        times[label] = time.perf_counter() - t
        return out

    init_lowered = timed('init_trace_s', lambda: _trace_lower(run.init, key))
    init = timed('init_compile_s', init_lowered.compile)
    state = timed('init_run_s', lambda: init(key))
    step_lowered = timed('step_trace_s', lambda: _trace_lower(run.train_step, state, device_batch))
    step = timed('step_compile_s', step_lowered.compile)
    state, metrics = timed('step_run_s', lambda: step(state, device_batch))
    first = time.perf_counter() - t0

    box = [state]

    def one_step():
        box[0], m = step(box[0], device_batch)
        jax.block_until_ready(m)

    median = _time(one_step, steps)  # one warm-up call, then the median
    row = {
        **_jax_row(name, batch, res, dtype),
        'scan_blocks': scan_blocks,
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
    peak = _peak_mem_gib()
    if peak is not None:
        row['peak_mem_gib'] = peak
    return row


def _is_oom(e: BaseException) -> bool:
    text = f'{type(e).__name__} {e}'
    return any(s in text for s in ('RESOURCE_EXHAUSTED', 'Out of memory', 'OutOfMemory'))


def _bisect(
    fits, lo: int, hi: int | None, start: int, max_tries: int, grow: float = 2.0
) -> tuple[int, int | None]:
    """The largest batch ``b`` with ``fits(b)``, by growing from ``start`` by ``grow`` until one
    fails and then bisecting (at most ``max_tries`` calls). ``lo`` is known to fit (0: none
    known), ``hi`` known not to (None: none known). Returns (largest that fit, smallest that
    failed)."""
    b = start
    for _ in range(max_tries):
        if hi is not None and hi - lo <= max(1, lo // 32):  # within 3%: close enough
            break
        if fits(b):
            lo = b
        else:
            hi = b
        b = max(lo + 1, int(lo * grow)) if hi is None else (lo + hi) // 2
        if b <= lo:
            break
    return lo, hi


def max_batch_jax(name: str, batch: int, res: int, dtype: str, steps: int) -> dict:
    """The largest batch whose step runs on one device: the first guess scales the compiled
    step's memory analysis at ``batch`` to the device's memory, then bisection with real steps."""
    import gc

    import jax

    device = jax.local_devices()[0]
    limit = (device.memory_stats() or {}).get('bytes_limit')
    run = recipe_run(name, batch, res, dtype, devices=[device])
    images = jax.ShapeDtypeStruct((batch, res, res, 3), 'uint8')
    labels = jax.ShapeDtypeStruct((batch,), 'int32')
    m = run.train_step.lower(run.abstract_state, {'image': images, 'label': labels})
    m = m.compile().memory_analysis()
    fixed = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    per_example = m.temp_size_in_bytes / batch
    guess = int((0.95 * limit - fixed) / per_example) if limit else batch
    timings = {}

    def fits(b: int) -> bool:
        gc.collect()
        try:
            r = recipe_run(name, b, res, dtype, devices=[device])
            state = r.init(jax.random.key(0))
            data = _synthetic_batch(b, res, r.mesh)
            box = [state]

            def one_step():
                box[0], metrics = r.train_step(box[0], data)
                jax.block_until_ready(metrics)

            timings[b] = _time(one_step, steps)
            return True
        except Exception as e:  # noqa: BLE001 - only an out-of-memory error means "too big"
            if not _is_oom(e):
                raise
            return False
        finally:
            jax.clear_caches()

    # Each try compiles the step again: few tries, growing 10% from the estimate.
    lo, hi = _bisect(fits, 0, None, max(1, guess), max_tries=4, grow=1.1)
    row = {**_jax_row(name, lo, res, dtype), 'max_batch': lo, 'failed_batch': hi}
    row.update({'estimate_from_memory_analysis': guess, 'bytes_limit_gib': (limit or 0) / 2**30})
    if lo:
        row.update({'step_s': timings[lo], 'train_img_s': lo / timings[lo]})
    return row


def residual_bytes(run: BenchRun, batch: int, res: int) -> int:
    """Bytes the training-mode forward pass of ``run.model`` keeps for its backward pass (the
    residuals of ``jax.vjp`` with respect to the parameters), from tracing alone."""
    import jax

    v = run.abstract_variables
    images = jax.ShapeDtypeStruct((batch, res, res, 3), run.model.dtype)  # what it receives

    def forward(params, batch_stats, x):
        return run.model.apply(
            {'params': params, 'batch_stats': batch_stats},
            x,
            train=True,
            rngs={'dropout': jax.random.key(0)},
            mutable=['batch_stats'],
        )[0]

    def residuals(params, batch_stats, x):
        _, vjp_fn = jax.vjp(lambda p: forward(p, batch_stats, x), params)
        return jax.tree.leaves(vjp_fn)

    jaxpr = jax.make_jaxpr(residuals)(v['params'], v['batch_stats'], images).jaxpr
    inputs = set(jaxpr.invars)
    kept = {x for x in jaxpr.outvars if not hasattr(x, 'val') and x not in inputs}  # no literals
    return sum(x.aval.size * x.aval.dtype.itemsize for x in kept)


def memory_jax(name: str, batch: int, res: int, dtype: str, remat: bool) -> dict:
    """Compiles the train step for abstract inputs and reads its memory analysis, and counts
    the autodiff residuals (see the module docstring for the fields)."""
    import jax
    import numpy as np

    run = recipe_run(name, batch, res, dtype, remat=remat)
    per_device = batch // jax.device_count()
    residuals = residual_bytes(run, per_device, res)
    images = jax.ShapeDtypeStruct((batch, res, res, 3), np.uint8)
    labels = jax.ShapeDtypeStruct((batch,), np.int32)
    t0 = time.perf_counter()
    lowered = run.train_step.lower(run.abstract_state, {'image': images, 'label': labels})
    m = lowered.compile().memory_analysis()
    compile_s = time.perf_counter() - t0
    mib = 2.0**20
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return {
        **_jax_row(name, batch, res, dtype),
        'remat': remat,
        'compile_s': compile_s,
        'argument_mib': m.argument_size_in_bytes / mib,
        'output_mib': m.output_size_in_bytes / mib,
        'alias_mib': m.alias_size_in_bytes / mib,
        'temp_mib': m.temp_size_in_bytes / mib,
        'peak_mib': peak / mib,
        'peak_mib_per_example': peak / mib / per_device,
        'temp_mib_per_example': m.temp_size_in_bytes / mib / per_device,
        'residual_mib_per_example': residuals / mib / per_device,
    }


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


def bench_jax_cold_warm(args, name: str, res: int, scan_blocks: bool) -> list[dict]:
    """Runs bench_jax in two fresh processes sharing one empty compilation cache."""
    import tempfile

    scan = ['--scan-blocks', 'on' if scan_blocks else 'off']
    with tempfile.TemporaryDirectory(prefix='xla_cache_') as cache:
        return [
            {'cache': cache_state, **_child_rows(args, name, res, cache, *scan)[0]}
            for cache_state in ('cold', 'warm')
        ]


def torch_network(name: str, res: int):
    """``name`` as a PyTorch module: for an EfficientNetV2, timm's ``tf_efficientnetv2_*`` (the
    same network with TF SAME padding, with the variant's dropout and stochastic depth, as
    ours); otherwise efficientnet_pytorch's when installed, else timm's ``efficientnet_bN`` (the
    same architecture; symmetric padding). Returns (net, source)."""
    from timm_import import import_timm

    from efficientnet import arch

    variant = arch.get_variant(name)
    if variant.is_v2:
        timm = import_timm()
        suffix = variant.name.removeprefix('efficientnetv2-')
        net = timm.create_model(
            f'tf_efficientnetv2_{suffix}', drop_rate=variant.dropout, drop_path_rate=0.2
        )
        return net, f'timm {timm.__version__}'
    try:
        from efficientnet_pytorch import EfficientNet
    except ImportError:
        timm = import_timm()
        short = name.removeprefix('efficientnet-')
        return timm.create_model(f'efficientnet_{short}'), f'timm {timm.__version__}'
    return EfficientNet.from_name(name, image_size=res), 'efficientnet_pytorch'


def _torch_setup(name: str, batch: int, res: int, dtype: str, channels_last: bool):
    """The PyTorch peer's step at ``batch``: returns (run, source) where ``run()`` does one."""
    import torch

    cuda = torch.cuda.is_available()
    device = 'cuda' if cuda else 'cpu'
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net, source = torch_network(name, res)
    net = net.to(device).to(memory_format=fmt)
    net.train()
    opt = torch.optim.RMSprop(
        net.parameters(),
        lr=RECIPE['base_learning_rate'] * batch / 256,
        alpha=RECIPE['rmsprop_decay'],
        momentum=RECIPE['momentum'],
        eps=RECIPE['rmsprop_epsilon'],
        weight_decay=RECIPE['weight_decay'],
    )
    ema = [t.detach().clone() for t in net.state_dict().values() if t.is_floating_point()]
    x = torch.randn(batch, 3, res, res, device=device).to(memory_format=fmt)
    labels = torch.randint(0, 1000, (batch,), device=device)
    amp = dtype == 'bfloat16'
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            logits = net(x)
        loss = torch.nn.functional.cross_entropy(
            logits.float(), labels, label_smoothing=RECIPE['label_smoothing']
        )
        loss.backward()
        opt.step()
        with torch.no_grad():
            live = [t for t in net.state_dict().values() if t.is_floating_point()]
            torch._foreach_lerp_(ema, live, 1 - RECIPE['ema_decay'])
        sync()

    return run, source


def _torch_row(name, batch, res, dtype, channels_last, source) -> dict:
    import torch

    return {
        'framework': 'torch',
        'source': source,
        'allocator': allocator.name(),
        'version': torch.__version__,
        'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu',
        'threads': torch.get_num_threads(),
        'memory_format': 'channels_last' if channels_last else 'contiguous',
        'model': name,
        'batch': batch,
        'resolution': res,
        'dtype': dtype,
    }


def bench_torch(
    name: str, batch: int, res: int, dtype: str, steps: int, channels_last: bool
) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run, source = _torch_setup(name, batch, res, dtype, channels_last)
    run()
    first = time.perf_counter() - t0
    median = _time(run, steps)
    row = {
        **_torch_row(name, batch, res, dtype, channels_last, source),
        'time_to_first_step_s': first,
        'step_s': median,
        'train_img_s': batch / median,
    }
    if cuda:
        row['peak_mem_gib'] = torch.cuda.max_memory_allocated() / 2.0**30
    return row


def max_batch_torch(name: str, batch: int, res: int, dtype: str, steps: int) -> dict:
    """The largest batch whose PyTorch step runs (channels-last), by doubling from ``batch``
    and bisecting."""
    import gc

    import torch

    timings, source = {}, ''

    def fits(b: int) -> bool:
        nonlocal source
        run = None
        try:
            run, source = _torch_setup(name, b, res, dtype, True)
            timings[b] = _time(run, steps)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            del run
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    lo, hi = _bisect(fits, 0, None, batch, max_tries=8)
    row = {**_torch_row(name, lo, res, dtype, True, source), 'max_batch': lo, 'failed_batch': hi}
    if lo:
        row.update({'step_s': timings[lo], 'train_img_s': lo / timings[lo]})
    return row


def depth_ratios(rows: list[dict]) -> list[dict]:
    """Each model's times relative to the first model's, per cache state and scan setting."""
    out = []
    keys = ('time_to_first_step_s', 'trace_s', 'compile_s', 'first_run_s')
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
                **{k.removesuffix('_s'): r[k] / base[k] for k in keys},
            }
        )
    return out


def main(argv=None) -> int:
    p = benchmark_parser(__doc__)
    p.add_argument(
        '--cache-dir',
        default=None,
        help='persistent compilation cache for one JAX run in this process '
        '(default: a cold and a warm run, each in a fresh process)',
    )
    p.add_argument(
        '--scan-blocks',
        choices=['on', 'off', 'both'],
        default='on',
        help="config.model.scan_blocks: compile each stage's repeated blocks once (default on)",
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
    args = p.parse_args(argv)

    import efficientnet

    names = [efficientnet.arch.get_variant(n).name for n in args.model.split(',') if n]
    if not names:
        p.error('--model names no model')
    if args.batch < 1 or args.steps < 1:
        p.error('--batch and --steps must be positive')
    scans = {'on': [True], 'off': [False], 'both': [False, True]}[args.scan_blocks]
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
                    bench_jax(name, args.batch, res, args.dtype, args.steps, args.cache_dir, scan)
                )
            else:
                rows += bench_jax_cold_warm(args, name, res, scan)
        results += rows
        if args.torch or args.torch_only:
            # The JAX rows time the same step (cache and scan change only the compilation):
            # the ratio uses the mean speed of the last scan setting's rows.
            last = [r for r in rows if r['scan_blocks'] == scans[-1]]
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
