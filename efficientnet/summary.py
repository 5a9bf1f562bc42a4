"""The model table: resolution, parameters and FLOPs of every variant beside the paper's figures.

    python -m efficientnet.summary [--json] [--models b0 b4 ...]

FLOPs are multiply-adds at the native resolution, as the paper counts them: every convolution
and the dense head (batch norm, activations and pooling are not counted). Parameters are the
trainable ones (the ``params`` collection), counted from ``jax.eval_shape`` so nothing is
allocated.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from efficientnet import arch

# Published figures: params (M), FLOPs (B multiply-adds), ImageNet top-1 (%). EfficientNet and
# Lite: the paper (docs/reference.md §1, §7). EfficientNetV2: V2-B0..B3 from the official
# repository's README (the paper has no B models), S/M/L from the paper's Table 7 (ImageNet-1k
# training), XL from the paper's ImageNet-21k table (pretrained on 21k, top-1 after 1k
# fine-tuning; there is no 1k-trained XL). docs/models.md compares them.
PAPER = {
    'efficientnet-b0': (5.3, 0.39, 77.1),
    'efficientnet-b1': (7.8, 0.70, 79.1),
    'efficientnet-b2': (9.2, 1.0, 80.1),
    'efficientnet-b3': (12, 1.8, 81.6),
    'efficientnet-b4': (19, 4.2, 82.9),
    'efficientnet-b5': (30, 9.9, 83.6),
    'efficientnet-b6': (43, 19, 84.0),
    'efficientnet-b7': (66, 37, 84.3),
    'efficientnet-l2': (480, None, 88.4),
    'efficientnet-lite0': (4.7, 0.407, 75.1),
    'efficientnet-lite4': (13.0, 2.64, 81.5),
    'efficientnetv2-b0': (7.1, 0.72, 78.7),
    'efficientnetv2-b1': (8.1, 1.2, 79.8),
    'efficientnetv2-b2': (10.1, 1.7, 80.5),
    'efficientnetv2-b3': (14.4, 3.0, 82.1),
    'efficientnetv2-s': (22, 8.8, 83.9),
    'efficientnetv2-m': (54, 24, 85.1),
    'efficientnetv2-l': (120, 53, 85.7),
    'efficientnetv2-xl': (208, 94, 87.3),
}


def _same_out(size: int, stride: int) -> int:
    return -(-size // stride)


def count_flops(name: str, resolution: int | None = None, num_classes: int = 1000) -> int:
    """Multiply-adds of one forward pass of one image (convolutions and the dense head)."""
    v = arch.get_variant(name)
    s = resolution or v.resolution
    s = _same_out(s, 2)
    stem = arch.stem_channels(v)
    macs = s * s * 3 * 3 * 3 * stem
    blocks = arch.build_blocks(v)
    for b in blocks:
        exp = b.expanded_channels
        k2 = b.kernel * b.kernel
        if b.fused and b.expand == 1:  # one k x k conv, Cin -> Cout
            s = _same_out(s, b.stride)
            macs += s * s * k2 * b.in_channels * b.out_channels
            continue
        if b.fused:  # k x k conv (strided) to e * Cin, then the 1x1 projection
            s = _same_out(s, b.stride)
            macs += s * s * k2 * b.in_channels * exp
        else:
            if b.expand != 1:
                macs += s * s * b.in_channels * exp
            s = _same_out(s, b.stride)
            macs += s * s * k2 * exp
        if b.se_channels:
            macs += 2 * exp * b.se_channels
        macs += s * s * exp * b.out_channels
    head = arch.head_channels(v)
    macs += s * s * blocks[-1].out_channels * head
    macs += head * num_classes
    return int(macs)


def count_params(name: str, num_classes: int = 1000) -> int:
    """Trainable parameters of the variant, from shapes only."""
    from efficientnet import create_model

    model = create_model(name, num_classes=num_classes)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
    )
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(shapes['params'])))


def model_table(names: list[str] | None = None) -> dict[str, dict]:
    rows = {}
    for name in names or arch.list_models():
        v = arch.get_variant(name)
        paper = PAPER.get(v.name, (None, None, None))
        rows[v.name] = {
            'resolution': v.resolution,
            'width': v.width,
            'depth': v.depth,
            'dropout': v.dropout,
            'blocks': len(arch.build_blocks(v)),
            'params': count_params(v.name),
            'flops': count_flops(v.name),
            'paper_params_m': paper[0],
            'paper_flops_b': paper[1],
            'paper_top1': paper[2],
        }
    return rows


def format_table(rows: dict[str, dict]) -> str:
    def fmt(x, spec):
        return '-' if x is None else format(x, spec)

    lines = [
        f'{"model":<20}{"res":>5}{"width":>7}{"depth":>7}{"blocks":>7}{"params":>14}'
        f'{"paper M":>9}{"MACs (B)":>10}{"paper B":>9}{"top-1":>7}',
    ]
    for name, r in rows.items():
        lines.append(
            f'{name:<20}{r["resolution"]:>5}{r["width"]:>7.1f}{r["depth"]:>7.1f}{r["blocks"]:>7}'
            f'{r["params"]:>14,}{fmt(r["paper_params_m"], ">9")}{r["flops"] / 1e9:>10.3f}'
            f'{fmt(r["paper_flops_b"], ">9")}{fmt(r["paper_top1"], ">7")}'
        )
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--json', action='store_true', help='print one JSON object keyed by name')
    parser.add_argument('--models', nargs='*', help='variants to show (default: all)')
    args = parser.parse_args(argv)
    try:
        rows = model_table(args.models)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=1, default=lambda x: np.asarray(x).tolist()))
    else:
        print(format_table(rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())
