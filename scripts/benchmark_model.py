"""Model speed: forward and forward+backward images/s, compile time and memory.

    python scripts/benchmark_model.py --model b0 --batch 16 --resolution 224 [--dtype bfloat16]
        [--torch] [--json] [--steps 5] [--depthwise auto|xla|unrolled]

Runs on whatever backend JAX finds. ``--torch`` times the PyTorch peer's network
(``scripts/torch_peer.py``: efficientnet_pytorch's, or timm's; train mode, channels-last, AMP
bf16 on CUDA when --dtype bfloat16) in the same invocation, so the ratio compares two runs
on the same machine at the same moment. Forward is inference mode; forward+backward is a
training-mode pass (batch statistics, dropout, stochastic depth) and the gradient with respect
to every parameter, as one training step computes it (the optimizer update is excluded on both
sides).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the other scripts' modules
from training import allocator  # noqa: E402  (light: no jax, no torch)


def _time(fn, steps: int) -> float:
    """Median seconds of ``steps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


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


def report(results: list[dict], as_json: bool) -> None:
    """Prints the result rows as JSON or as one key=value line each."""
    if as_json:
        print(json.dumps(results, indent=1))
        return
    for r in results:
        print(
            '  '.join(f'{k}={v:.3f}' if isinstance(v, float) else f'{k}={v}' for k, v in r.items())
        )


def bench_jax(name: str, batch: int, res: int, dtype: str, steps: int, depthwise: str) -> dict:
    import jax
    import jax.numpy as jnp

    import efficientnet

    dt = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[dtype]
    model = efficientnet.create_model(name, dtype=dt, depthwise_impl=depthwise)
    x = jax.random.normal(jax.random.key(0), (batch, res, res, 3), jnp.float32)
    labels = jnp.arange(batch) % 1000
    variables = jax.jit(model.init)(jax.random.key(1), x[:1])

    def loss_fn(params, batch_stats, x, rng):
        logits, upd = model.apply(
            {'params': params, 'batch_stats': batch_stats},
            x,
            train=True,
            rngs={'dropout': rng},
            mutable=['batch_stats'],
        )
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1)), upd['batch_stats']

    fwd = jax.jit(lambda v, x: model.apply(v, x))
    grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    out = {
        'framework': 'jax',
        'allocator': allocator.name(),
        'backend': jax.default_backend(),
        'device': str(jax.devices()[0].device_kind),
        'model': model.variant.name,
        'batch': batch,
        'resolution': res,
        'dtype': dtype,
        'depthwise': efficientnet.layers.resolve_depthwise_impl(depthwise, dt),
    }

    t = time.perf_counter()
    lowered = grad.lower(variables['params'], variables['batch_stats'], x, jax.random.key(2))
    compiled = lowered.compile()
    out['compile_train_s'] = time.perf_counter() - t
    mem = compiled.memory_analysis()
    if mem is not None:
        out['train_temp_mib'] = mem.temp_size_in_bytes / 2**20
        out['train_args_mib'] = mem.argument_size_in_bytes / 2**20
    t = time.perf_counter()
    jax.block_until_ready(fwd(variables, x))
    out['compile_fwd_s'] = time.perf_counter() - t

    out['fwd_s'] = _time(lambda: jax.block_until_ready(fwd(variables, x)), steps)
    out['train_s'] = _time(
        lambda: jax.block_until_ready(
            compiled(variables['params'], variables['batch_stats'], x, jax.random.key(2))
        ),
        steps,
    )
    out['fwd_img_s'] = batch / out['fwd_s']
    out['train_img_s'] = batch / out['train_s']
    stats = jax.devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
        out['peak_device_mib'] = stats['peak_bytes_in_use'] / 2**20
    return out


def bench_torch(name: str, batch: int, res: int, dtype: str, steps: int) -> dict:
    import torch
    from torch_peer import torch_network

    from efficientnet import arch

    cuda = torch.cuda.is_available()
    device = 'cuda' if cuda else 'cpu'
    full = arch.get_variant(name).name
    net, source = torch_network(full, res)
    net = net.to(device).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, res, res, device=device).to(memory_format=torch.channels_last)
    labels = torch.arange(batch, device=device) % 1000
    amp = dtype == 'bfloat16'
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def autocast():
        return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp)

    def fwd():
        net.eval()
        with torch.no_grad(), autocast():
            net(x)
        sync()

    def train():
        net.train()
        net.zero_grad(set_to_none=True)
        with autocast():
            loss = torch.nn.functional.cross_entropy(net(x).float(), labels)
        loss.backward()
        sync()

    t = time.perf_counter()
    train()
    first = time.perf_counter() - t
    out = {
        'framework': 'torch',
        'source': source,
        'allocator': allocator.name(),
        'version': torch.__version__,
        'device': device,
        'threads': torch.get_num_threads(),
        'model': full,
        'batch': batch,
        'resolution': res,
        'dtype': dtype,
        'first_step_s': first,
    }
    out['fwd_s'] = _time(fwd, steps)
    out['train_s'] = _time(train, steps)
    out['fwd_img_s'] = batch / out['fwd_s']
    out['train_img_s'] = batch / out['train_s']
    if cuda:
        out['peak_device_mib'] = torch.cuda.max_memory_allocated() / 2**20
    return out


def benchmark_parser(
    doc: str, dtypes: tuple[str, ...] = ('float32', 'bfloat16')
) -> argparse.ArgumentParser:
    """The options every benchmark script shares (model, batch, resolution, dtype, steps, the
    PyTorch peer, JSON output)."""
    p = argparse.ArgumentParser(description=doc.split('\n\n')[0])
    p.add_argument('--model', default='efficientnet-b0')
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--resolution', type=int, default=None, help="default: the variant's")
    p.add_argument('--dtype', choices=list(dtypes), default='float32')
    p.add_argument('--steps', type=int, default=5, help='timed steps (the median is reported)')
    p.add_argument('--torch', action='store_true', help='also time the PyTorch peer')
    p.add_argument('--json', action='store_true')
    return p


def main(argv=None) -> int:
    from efficientnet.layers import DEPTHWISE_IMPLS

    p = benchmark_parser(__doc__)
    p.add_argument('--depthwise', choices=DEPTHWISE_IMPLS, default='auto')
    args = p.parse_args(argv)

    import efficientnet

    res = args.resolution or efficientnet.model_info(args.model)['resolution']
    results = [bench_jax(args.model, args.batch, res, args.dtype, args.steps, args.depthwise)]
    if args.torch:
        results.append(bench_torch(args.model, args.batch, res, args.dtype, args.steps))
        results.append(
            {
                'train_speedup_vs_torch': results[0]['train_img_s'] / results[1]['train_img_s'],
                'fwd_speedup_vs_torch': results[0]['fwd_img_s'] / results[1]['fwd_img_s'],
            }
        )
    report(results, args.json)
    return 0


if __name__ == '__main__':
    allocator.use_tcmalloc()  # the same allocator for every framework timed in this run
    sys.exit(main())
