"""One 3x3 convolution block scanned over stacked kernels against the same blocks unrolled:
the forward pass, the input gradient and the kernel gradient, seconds per call and the ratio.

    python scripts/bench_scan_conv.py [--batch 8] [--size 96] [--channels 24] [--blocks 3]
        [--steps 3] [--json]

Each block is ``x + tanh(conv3x3(x, k))`` (NHWC, SAME padding, float32), the shape of a
Fused-MBConv repeat of EfficientNetV2-S's first stage at 192 px. It isolates why a scanned
training step with Fused-MBConv stages ran so slowly on XLA:CPU (docs/benchmarks.md):
autodiff's backward convolutions run much slower inside the scan's loop body than unrolled.
The third column scans the project's stride-1 convolution
(``efficientnet.layers.conv_stride1_cpu``, what ``Conv2D`` uses on CPU), whose backward
convolutions are written in the fast form. Runs on whatever backend JAX finds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the other scripts' modules
from benchmark_model import _time  # noqa: E402


def measure(batch: int, size: int, channels: int, blocks: int, steps: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from efficientnet import layers

    x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
    w = jax.random.normal(jax.random.key(1), (blocks, 3, 3, channels, channels)) * 0.1
    pads = ((1, 1), (1, 1))

    def xla_conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=layers._NHWC)

    def our_conv(x, k):  # what Conv2D computes on CPU
        return layers.conv_stride1_cpu(x, k, pads)

    def scanned(conv):
        body = lambda c, k: (c + jnp.tanh(conv(c, k)), None)
        return lambda w, x: jax.lax.scan(body, x, w)[0].sum()

    def unrolled(w, x):
        for i in range(w.shape[0]):
            x = x + jnp.tanh(xla_conv(x, w[i]))
        return x.sum()

    rows = []
    for part, transform in (
        ('forward', lambda f: f),
        ('input_gradient', lambda f: jax.grad(f, 1)),
        ('kernel_gradient', lambda f: jax.grad(f, 0)),
    ):
        row = {'part': part, 'backend': jax.default_backend()}
        out = {}
        for name, f in (
            ('unrolled', unrolled),
            ('scanned', scanned(xla_conv)),
            ('scanned_ours', scanned(our_conv)),
        ):
            fn = jax.jit(transform(f))
            row[f'{name}_s'] = _time(lambda fn=fn: jax.block_until_ready(fn(w, x)), steps)
            out[name] = fn(w, x)
        row['scanned_over_unrolled'] = row['scanned_s'] / row['unrolled_s']
        row['scanned_ours_over_unrolled'] = row['scanned_ours_s'] / row['unrolled_s']
        # All three compute the same (within float32 rounding): a like-for-like comparison.
        scale = float(jnp.abs(out['unrolled']).max())
        row['max_rel_diff'] = max(
            float(jnp.abs(out[n] - out['unrolled']).max()) / scale
            for n in ('scanned', 'scanned_ours')
        )
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--size', type=int, default=96, help='height = width of the feature map')
    p.add_argument('--channels', type=int, default=24)
    p.add_argument('--blocks', type=int, default=3, help='blocks in the scan (>= 1)')
    p.add_argument('--steps', type=int, default=3, help='timed calls (median) after a warm-up')
    p.add_argument('--json', action='store_true', help='one JSON object per row')
    args = p.parse_args(argv)
    for name in ('batch', 'size', 'channels', 'blocks', 'steps'):
        if getattr(args, name) < 1:
            p.error(f'--{name} must be at least 1, got {getattr(args, name)}')
    for row in measure(args.batch, args.size, args.channels, args.blocks, args.steps):
        if args.json:
            print(json.dumps(row))
        else:
            print(
                f'{row["part"]:16s} unrolled {row["unrolled_s"]:.4f} s | scanned '
                f'{row["scanned_s"]:.4f} s ({row["scanned_over_unrolled"]:.2f}x) | scanned, '
                f'our convolution {row["scanned_ours_s"]:.4f} s '
                f'({row["scanned_ours_over_unrolled"]:.2f}x) | {row["backend"]}'
            )


if __name__ == '__main__':
    main()
