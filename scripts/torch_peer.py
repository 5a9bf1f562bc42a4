"""The PyTorch peer of the benchmarks: the same network and training step in PyTorch, timed
in the same invocation as ours.

``--torch`` runs the same recipe in PyTorch in the same invocation: efficientnet_pytorch when
it is installed, else timm's ``efficientnet_bN`` (the same network), and for an EfficientNetV2
timm's ``tf_efficientnetv2_*`` (the same network with TF SAME padding); channels-last (its
fastest layout; AMP bfloat16 on CUDA with ``--dtype bfloat16``; AMP float16 with PyTorch's
dynamic loss scaling, ``torch.amp.GradScaler`` from 2^15, with ``--dtype float16``) and, on
CPU, also the default contiguous layout. Its step is forward, label-smoothed cross-entropy,
backward, ``torch.optim.RMSprop`` (alpha 0.9, momentum 0.9, eps 1e-3, weight decay 1e-5) and an EMA
update of parameters and buffers; its first step includes building the network.
"""

from __future__ import annotations

import time

from bench_recipe import RECIPE
from benchmark_model import _bisect, _time

from training import allocator


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


def train_step_fn(name: str, batch: int, res: int, dtype: str, channels_last: bool):
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
    amp = dtype in ('bfloat16', 'float16')
    amp_dtype = torch.float16 if dtype == 'float16' else torch.bfloat16
    # float16: the same rule as ours (training/loss_scale.py): 2^15, x2 after 2000 finite steps
    scaler = torch.amp.GradScaler(
        device, init_scale=2.0**15, growth_interval=2000, enabled=dtype == 'float16'
    )
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=amp_dtype, enabled=amp):
            logits = net(x)
        loss = torch.nn.functional.cross_entropy(
            logits.float(), labels, label_smoothing=RECIPE['label_smoothing']
        )
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():
            live = [t for t in net.state_dict().values() if t.is_floating_point()]
            torch._foreach_lerp_(ema, live, 1 - RECIPE['ema_decay'])
        sync()

    return run, source


def torch_row(name, batch, res, dtype, channels_last, source) -> dict:
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
    run, source = train_step_fn(name, batch, res, dtype, channels_last)
    run()
    first = time.perf_counter() - t0
    median = _time(run, steps)
    row = {
        **torch_row(name, batch, res, dtype, channels_last, source),
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
            run, source = train_step_fn(name, b, res, dtype, True)
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
    row = {**torch_row(name, lo, res, dtype, True, source), 'max_batch': lo, 'failed_batch': hi}
    if lo:
        row.update({'step_s': timings[lo], 'train_img_s': lo / timings[lo]})
    return row
