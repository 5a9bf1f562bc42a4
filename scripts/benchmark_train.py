"""Training speed: images/s of the whole training step and time to the first step.

    python scripts/benchmark_train.py [--model efficientnet-b0] [--batch 16] [--resolution 224]
        [--dtype float32|bfloat16] [--steps 5] [--torch] [--json] [--cache-dir DIR]

Ours is the step ``train.py`` runs (wired by ``training.run.create_run``: forward and
backward in training mode, label smoothing, L2 weight decay, TF1 RMSProp with the official
schedule, the EMA update over weights and BatchNorm statistics), jitted over every device JAX
finds, fed synthetic uint8 batches that are already on the device. "Time to first step" counts
from building the model to the end of the first step: state initialisation, compilation, the
step itself. It is measured twice, each in a fresh process: ``cold`` with an empty persistent
compilation cache (a first run) and ``warm`` with the cache the cold run filled (a rerun or a
resume of the same configuration, as ``train.py`` does by default). ``--cache-dir DIR`` uses
DIR instead of a temporary directory (and one process only).

``--torch`` runs the same recipe on efficientnet_pytorch in the same invocation, twice:
channels-last (its fastest CPU layout; AMP bfloat16 on CUDA with ``--dtype bfloat16``) and
the default contiguous layout. Its step is forward, label-smoothed cross-entropy, backward,
``torch.optim.RMSprop`` (alpha 0.9, momentum 0.9, eps 1e-3, weight decay 1e-5) and an EMA
update of parameters and buffers; its first step includes building the network.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_model import _time, benchmark_parser, report  # noqa: E402  (timing and printing shared)

from training import allocator  # noqa: E402  (light: no jax, no torch)


def bench_jax(name: str, batch: int, res: int, dtype: str, steps: int, cache_dir: str) -> dict:
    import jax
    import numpy as np

    import efficientnet
    from configs import base
    from training import compilation, config_resolve, sharding
    from training import run as run_lib

    compilation.enable_persistent_cache(cache_dir)
    t0 = time.perf_counter()
    config = base.get_config()
    config.model.name = name
    config.model.compute_dtype = dtype
    config.data.resolution = res
    config.batch_size = batch
    # ImageNet's sizes: the schedule's step counts do not change the step's cost.
    imagenet = {'num_classes': 1000, 'num_train': 1_281_167, 'num_eval': 50_000}
    plan = config_resolve.resolve(
        config, device_count=jax.device_count(), dataset_info_fn=lambda _: imagenet
    )
    run = run_lib.create_run(config, plan)
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
        'framework': 'jax',
        'allocator': allocator.name(),
        'backend': jax.default_backend(),
        'devices': jax.device_count(),
        'model': name,
        'batch': batch,
        'resolution': res,
        'dtype': dtype,
        'depthwise': efficientnet.layers.resolve_depthwise_impl('auto', model.dtype),
        'time_to_first_step_s': first,
        'programs_from_cache': compilation.cache_stats()['cache_hits'],
        'step_s': median,
        'train_img_s': batch / median,
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


def bench_torch(
    name: str, batch: int, res: int, dtype: str, steps: int, channels_last: bool
) -> dict:
    import torch
    from efficientnet_pytorch import EfficientNet

    cuda = torch.cuda.is_available()
    device = 'cuda' if cuda else 'cpu'
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t0 = time.perf_counter()
    net = EfficientNet.from_name(name, image_size=res).to(device).to(memory_format=fmt)
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
    args = p.parse_args(argv)

    import efficientnet

    name = efficientnet.arch.get_variant(args.model).name
    res = args.resolution or efficientnet.model_info(name)['resolution']
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
