"""Training speed: images/s of the whole training step and time to the first step; with
``--memory``, the step's device memory with and without remat.

    python scripts/benchmark_train.py [--model efficientnet-b0] [--batch 16] [--resolution 224]
        [--dtype float32|bfloat16] [--steps 5] [--torch] [--json] [--cache-dir DIR] [--memory]

Ours is the step ``train.py`` runs (wired by ``training.run.create_run``: forward and
backward in training mode, label smoothing, L2 weight decay, TF1 RMSProp with the official
schedule, the EMA update over weights and BatchNorm statistics), jitted over every device JAX
finds, fed synthetic uint8 batches that are already on the device. "Time to first step" counts
from building the model to the end of the first step: state initialisation, compilation, the
step itself. It is measured twice, each in a fresh process: ``cold`` with an empty persistent
compilation cache (a first run) and ``warm`` with the cache the cold run filled (a rerun or a
resume of the same configuration, as ``train.py`` does by default). ``--cache-dir DIR`` uses
DIR instead of a temporary directory (and one process only).

``--torch`` runs the same recipe on efficientnet_pytorch in the same invocation (for an
EfficientNetV2, on timm's ``tf_efficientnetv2_*``: the same network with TF SAME padding),
twice: channels-last (its fastest CPU layout; AMP bfloat16 on CUDA with ``--dtype bfloat16``)
and the default contiguous layout. Its step is forward, label-smoothed cross-entropy, backward,
``torch.optim.RMSprop`` (alpha 0.9, momentum 0.9, eps 1e-3, weight decay 1e-5) and an EMA
update of parameters and buffers; its first step includes building the network.

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

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_model import _time, benchmark_parser, report  # noqa: E402  (timing and printing shared)

from training import allocator  # noqa: E402  (light: no jax, no torch)


def benchmark_run(name: str, batch: int, res: int, dtype: str, remat: bool = False):
    """The run ``train.py`` would wire for this model and batch, with ImageNet's sizes."""
    import jax

    from configs import base
    from training import config_resolve
    from training import run as run_lib

    config = base.get_config()
    config.model.name = name
    config.model.compute_dtype = dtype
    config.model.remat = remat
    config.data.resolution = res
    config.batch_size = batch
    # ImageNet's sizes: the schedule's step counts do not change the step's cost.
    imagenet = {'num_classes': 1000, 'num_train': 1_281_167, 'num_eval': 50_000}
    plan = config_resolve.resolve(
        config, device_count=jax.device_count(), dataset_info_fn=lambda _: imagenet
    )
    return run_lib.create_run(config, plan)


def _jax_row(name: str, batch: int, res: int, dtype: str) -> dict:
    """The fields every JAX result row starts with: what ran, and on what."""
    import jax

    return {
        'framework': 'jax',
        'backend': jax.default_backend(),
        'devices': jax.device_count(),
        'model': name,
        'batch': batch,
        'resolution': res,
        'dtype': dtype,
    }


def bench_jax(name: str, batch: int, res: int, dtype: str, steps: int, cache_dir: str) -> dict:
    import jax
    import numpy as np

    import efficientnet
    from training import compilation, sharding

    compilation.enable_persistent_cache(cache_dir)
    t0 = time.perf_counter()
    run = benchmark_run(name, batch, res, dtype)
    model, mesh, step = run.model, run.mesh, run.train_step
    state = run.init_state(0)
    rng = np.random.default_rng(0)
    local = {
        'image': rng.integers(0, 256, (batch, res, res, 3), dtype=np.uint8),
        'label': rng.integers(0, 1000, (batch,), dtype=np.int32),
    }
    device_batch = sharding.global_batch(local, mesh)
    state, metrics = step(state, device_batch)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0

    box = [state]

    def one_step():
        box[0], m = step(box[0], device_batch)
        jax.block_until_ready(m)

    median = _time(one_step, steps)  # one warm-up call, then the median
    return {
        **_jax_row(name, batch, res, dtype),
        'allocator': allocator.name(),
        'depthwise': efficientnet.layers.resolve_depthwise_impl('auto', model.dtype),
        'time_to_first_step_s': first,
        'programs_from_cache': compilation.cache_stats()['cache_hits'],
        'step_s': median,
        'train_img_s': batch / median,
    }


def residual_bytes(run, batch: int) -> int:
    """Bytes the training-mode forward pass of ``run.model`` keeps for its backward pass (the
    residuals of ``jax.vjp`` with respect to the parameters), from tracing alone."""
    import jax

    from training.config_resolve import COMPUTE_DTYPES

    v = run.abstract_variables
    res = run.config.data.resolution
    dtype = COMPUTE_DTYPES[run.config.model.compute_dtype]  # the images the model receives
    images = jax.ShapeDtypeStruct((batch, res, res, 3), dtype)

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

    run = benchmark_run(name, batch, res, dtype, remat)
    per_device = batch // jax.device_count()
    residuals = residual_bytes(run, per_device)
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


def bench_jax_cold_warm(args, name: str, res: int) -> list[dict]:
    """Runs bench_jax in two fresh processes sharing one empty compilation cache."""
    import json
    import subprocess
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix='xla_cache_') as cache:
        for cache_state in ('cold', 'warm'):
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                '--model',
                name,
                '--batch',
                str(args.batch),
                '--resolution',
                str(res),
                '--dtype',
                args.dtype,
                '--steps',
                str(args.steps),
                '--cache-dir',
                cache,
                '--json',
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row = json.loads(out[out.index('[') :])[0]
            rows.append({'cache': cache_state, **row})
    return rows


def torch_peer(name: str, res: int):
    """The PyTorch network of the same variant: efficientnet_pytorch, or timm's
    tf_efficientnetv2_* for V2 (with the variant's dropout and stochastic depth, as ours)."""
    from efficientnet import arch

    variant = arch.get_variant(name)
    if variant.is_v2:
        from timm_import import import_timm

        suffix = variant.name.removeprefix('efficientnetv2-')
        return import_timm().create_model(
            f'tf_efficientnetv2_{suffix}', drop_rate=variant.dropout, drop_path_rate=0.2
        )
    from efficientnet_pytorch import EfficientNet

    return EfficientNet.from_name(name, image_size=res)


def bench_torch(
    name: str, batch: int, res: int, dtype: str, steps: int, channels_last: bool
) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    device = 'cuda' if cuda else 'cpu'
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t0 = time.perf_counter()
    net = torch_peer(name, res).to(device).to(memory_format=fmt)
    net.train()
    opt = torch.optim.RMSprop(
        net.parameters(),
        lr=0.016 * batch / 256,
        alpha=0.9,
        momentum=0.9,
        eps=1e-3,
        weight_decay=1e-5,
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
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, label_smoothing=0.1)
        loss.backward()
        opt.step()
        with torch.no_grad():
            live = [t for t in net.state_dict().values() if t.is_floating_point()]
            torch._foreach_lerp_(ema, live, 1 - 0.9999)
        sync()

    run()
    first = time.perf_counter() - t0
    median = _time(run, steps)
    return {
        'framework': 'torch',
        'peer': 'timm' if name.startswith('efficientnetv2-') else 'efficientnet_pytorch',
        'allocator': allocator.name(),
        'version': torch.__version__,
        'device': device,
        'threads': torch.get_num_threads(),
        'memory_format': 'channels_last' if channels_last else 'contiguous',
        'model': name,
        'batch': batch,
        'resolution': res,
        'dtype': dtype,
        'time_to_first_step_s': first,
        'step_s': median,
        'train_img_s': batch / median,
    }


def main(argv=None) -> int:
    p = benchmark_parser(__doc__)
    p.add_argument(
        '--cache-dir',
        default=None,
        help='persistent compilation cache for one JAX run in this process '
        '(default: a cold and a warm run, each in a fresh process)',
    )
    p.add_argument(
        '--memory',
        action='store_true',
        help='compile the step with and without remat and report its memory analysis '
        '(nothing runs; no timing)',
    )
    args = p.parse_args(argv)

    import efficientnet

    name = efficientnet.arch.get_variant(args.model).name
    res = args.resolution or efficientnet.model_info(name)['resolution']
    if args.memory:
        results = [memory_jax(name, args.batch, res, args.dtype, r) for r in (False, True)]
        results[1]['temp_vs_no_remat'] = results[1]['temp_mib'] / results[0]['temp_mib']
        results[1]['peak_vs_no_remat'] = results[1]['peak_mib'] / results[0]['peak_mib']
        results[1]['residuals_vs_no_remat'] = (
            results[1]['residual_mib_per_example'] / results[0]['residual_mib_per_example']
        )
        report(results, args.json)
        return 0
    if args.cache_dir:
        results = [bench_jax(name, args.batch, res, args.dtype, args.steps, args.cache_dir)]
    else:
        results = bench_jax_cold_warm(args, name, res)
    # Both JAX rows time the same program: the ratio uses their mean speed.
    ours = sum(r['train_img_s'] for r in results) / len(results)
    firsts = {r.get('cache', 'given'): r['time_to_first_step_s'] for r in results}
    if args.torch:
        for channels_last in (True, False):
            r = bench_torch(name, args.batch, res, args.dtype, args.steps, channels_last)
            r['ours_speedup'] = ours / r['train_img_s']
            for cache_state, first in firsts.items():  # > 1: ours reaches its first step sooner
                r[f'first_step_ratio_{cache_state}'] = r['time_to_first_step_s'] / first
            results.append(r)
    report(results, args.json)
    return 0


if __name__ == '__main__':
    allocator.use_tcmalloc()  # the same allocator for every framework timed in this run
    sys.exit(main())
