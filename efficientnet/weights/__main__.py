"""Converts published EfficientNet weights into our msgpack format.

python -m efficientnet.weights --source torch --model b0 efficientnet-b0.pth b0.msgpack
python -m efficientnet.weights --source keras --model b3 efficientnetb3.h5 b3.msgpack
python -m efficientnet.weights --source tf --model b0 efficientnet-b0/model.ckpt b0.msgpack
python -m efficientnet.weights --source torch --model v2-s model.safetensors v2-s.msgpack  # timm
python -m efficientnet.weights --source keras --model v2-s efficientnetv2-s.h5 v2-s.msgpack
python -m efficientnet.weights --source tf --model v2-s efficientnetv2-s/ v2-s.msgpack  # automl
"""

from __future__ import annotations

import argparse
import sys

SOURCES = ('keras', 'torch', 'tf')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python -m efficientnet.weights',
        description='Convert Keras, PyTorch (efficientnet_pytorch or timm naming) or official '
        'TensorFlow EfficientNet / EfficientNetV2 weights into a msgpack file for this package.',
    )
    parser.add_argument(
        '--source',
        required=True,
        choices=SOURCES,
        help='keras: .keras/.weights.h5/.h5 of keras.applications; torch: '
        '.pth/.safetensors state dict (efficientnet_pytorch, its Lite ports, or timm '
        'tf_efficientnet*); tf: checkpoint prefix or directory (tensorflow/tpu or automl)',
    )
    parser.add_argument(
        '--model', required=True, help='variant, e.g. b0, efficientnet-b3, lite0, v2-s'
    )
    parser.add_argument(
        '--num-classes',
        type=int,
        default=1000,
        help='class count of the source classifier (default 1000)',
    )
    parser.add_argument(
        '--skip-head', action='store_true', help='drop the classifier (a backbone for fine-tuning)'
    )
    parser.add_argument(
        '--no-ema',
        action='store_true',
        help='tf: take the raw variables, not their ExponentialMovingAverage',
    )
    parser.add_argument('input', help='weights to convert (a local path or gs://)')
    parser.add_argument('output', help='msgpack file to write (a local path or gs://)')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from efficientnet import arch, paths
    from efficientnet.weights import core, from_keras, from_tf_checkpoint, from_torch
    from efficientnet.weights.store import save_variables

    try:
        name = arch.get_variant(args.model).name
        exists = paths.as_path(args.input).exists() or (
            args.source == 'tf' and paths.as_path(args.input + '.index').exists()
        )
        if not exists:
            raise FileNotFoundError(f'input not found: {args.input}')
        options = dict(num_classes=args.num_classes, skip_head=args.skip_head)
        if args.source == 'keras':
            variables = from_keras(args.input, name, **options)
        elif args.source == 'torch':
            variables = from_torch(args.input, name, **options)
        else:
            variables = from_tf_checkpoint(args.input, name, use_ema=not args.no_ema, **options)
        save_variables(args.output, variables, name)
    except (FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    tensors, params, stats = core.count(variables)
    head = 'without classifier' if args.skip_head else f'{args.num_classes} classes'
    print(
        f'converted {tensors} tensors from {args.source} {args.input} as {name} ({head}): '
        f'{params:,} parameters, {stats:,} batch-norm statistics -> {args.output}'
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
