"""Evaluates a checkpoint of ours or published weights on a split, with the official eval
preprocessing, counting every example exactly once.

    python scripts/eval.py /ckpt/b0                                  # a training workdir
    python scripts/eval.py b0.msgpack --data-dir /data/tfds          # converted weights
    python scripts/eval.py efficientnet-b0-355c32eb.pth --model b0 --data-dir /data/tfds
    python scripts/eval.py /ckpt/small --dataset folder --folder ~/photos --split all
    python scripts/eval.py gs://bucket/b0 --output gs://bucket/b0/eval.json   # paths may be gs://

Preprocessing is the variant's (docs/reference.md §5): centre crop S / (S + 32) of the shorter
side (or the workdir's crop fraction), bicubic resize (bilinear for Lite), the family's
normalisation; ``--resolution``, ``--crop-fraction``, ``--interpolation`` and
``--normalization`` override it. Batches come from ``input_pipeline.create_eval_iterator``,
padded and masked, and are split over all local devices when the batch divides evenly.
Prints top-1 / top-5 / loss / count and writes them as JSON with ``--output``. Bad input
(missing weights or data, a refused unsafe pickle, mismatched class counts, a bad flag) ends
with one line ``error: ...`` and exit status 2; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficientnet import cli  # noqa: E402
from inference.cli import SOURCE_HELP, add_weights_arguments  # noqa: E402

DATASET_HELP = (
    "tfds name (default: imagenet2012, or the workdir's dataset), folder, fashion_mnist, fake"
)


class UsageError(cli.UserError):
    """Bad input: reported as 'error: ...' with exit status 2, no traceback."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        prog='python scripts/eval.py',
        description='Top-1/top-5 of EfficientNet weights on a dataset split (exact: every '
        'example counted once).',
    )
    p.add_argument(
        'source',
        metavar='SOURCE',
        help=SOURCE_HELP,
    )
    add_weights_arguments(p)
    p.add_argument('--dataset', help=DATASET_HELP)
    p.add_argument(
        '--split',
        help="split string (default: the workdir's eval split, else "
        "'validation'); e.g. validation[:1000], test, all",
    )
    p.add_argument('--data-dir', help='tfds data dir')
    p.add_argument('--manual-dir', help='where ILSVRC2012_img_{train,val}.tar are (imagenet2012)')
    p.add_argument(
        '--folder', help='image folder root (one subfolder per class) for --dataset folder'
    )
    p.add_argument('--batch-size', type=int, default=64, help='global eval batch (default 64)')
    p.add_argument('--resolution', type=int, help='override the image side')
    p.add_argument('--crop-fraction', type=float, help='override the centre-crop fraction')
    p.add_argument('--interpolation', choices=('bicubic', 'bilinear'), help='override the resize')
    p.add_argument('--output', help='write the results here as JSON (a local path or gs://)')
    return p.parse_args(argv)


def data_config_for(args: argparse.Namespace, loaded) -> object:
    """The pipeline's config.data for this evaluation: the workdir's own when the dataset is
    the one it trained on, else the schema's defaults; then the command line's overrides."""
    from configs.base import get_data_config

    data = get_data_config()
    saved = loaded.data_config or {}
    dataset = args.dataset or saved.get('name') or 'imagenet2012'
    if saved and dataset == saved.get('name'):
        for key, value in saved.items():  # fields the schema lacks too (fashion_mnist_dir)
            data[key] = value
    data.name = dataset
    data.eval_split = args.split or (saved.get('eval_split') if saved else None) or 'validation'
    for key, value in (
        ('data_dir', args.data_dir),
        ('manual_dir', args.manual_dir),
        ('folder', args.folder),
    ):
        if value is not None:
            data[key] = value
    data.resolution = loaded.resolution
    data.crop_fraction = loaded.crop_fraction
    data.interpolation = loaded.interpolation
    data.normalization = loaded.normalization
    data.num_classes = max(loaded.num_classes, 1)
    data.cache = False
    if dataset == 'folder' and not data.folder:
        raise UsageError('--dataset folder needs --folder ROOT (one subfolder per class)')
    return data


def check_dataset(data) -> dict:
    """dataset_info, with every way the data can be missing turned into a UsageError that
    carries the pipeline's own instructions (ImageNet) or how to prepare the dataset."""
    import input_pipeline
    from efficientnet import paths

    name = data.name
    if name not in ('fake', 'folder') and not name.startswith('fashion_mnist'):
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(name, data_dir=data.data_dir)
        except Exception as e:  # noqa: BLE001 - an unknown tfds name
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f'unknown dataset {name!r}: {reason}') from e
        prepared = builder.is_prepared()
        if not prepared and name.split(':')[0] != 'imagenet2012':
            where = f' --data_dir={data.data_dir}' if data.data_dir else ''
            raise UsageError(
                f'tfds dataset {name} is not prepared in '
                f'{data.data_dir or "the default tfds data_dir"}; prepare it '
                f'first: tfds build {name}{where}'
            )
    if name == 'folder' and not paths.as_path(data.folder).is_dir():
        raise UsageError(f'image folder not found: {data.folder}')
    try:
        info = input_pipeline.dataset_info(data)
    except FileNotFoundError as e:  # the pipeline's "how to prepare" message for ImageNet
        hint = ''
        if name.split(':')[0] == 'imagenet2012':
            hint = '\n  (for this script: --manual-dir DIR prepares it, --data-dir DIR says where)'
        raise UsageError(f'{e}{hint}') from e
    except (ValueError, KeyError) as e:
        raise UsageError(f'dataset {name!r}, split {data.eval_split!r}: {e}') from e
    if info['num_eval'] == 0:
        where = f' in {data.folder}' if name == 'folder' else ''
        raise UsageError(f'dataset {name!r}{where} has no examples in split {data.eval_split!r}')
    return info


def evaluate(loaded, data, batch_size: int, log=print) -> dict:
    """One exact pass over ``data.eval_split``; returns top1, top5, loss and count."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import input_pipeline
    from training import metrics

    apply = loaded.apply_fn()
    devices = jax.local_devices()
    if len(devices) > 1 and batch_size % len(devices) == 0:  # split the batch over devices
        mesh = Mesh(np.array(devices), ('data',))
        batch_sharding = NamedSharding(mesh, PartitionSpec('data'))
        variables = jax.device_put(loaded.variables, NamedSharding(mesh, PartitionSpec()))
    else:
        batch_sharding = devices[0]
        variables = jax.device_put(loaded.variables, devices[0])

    @jax.jit
    def sums(variables, images, labels, mask):
        return metrics.eval_sums(apply(variables, images), labels, mask)

    acc = metrics.EvalAccumulator()
    start, seen, last_log = time.time(), 0, time.time()
    for batch in input_pipeline.create_eval_iterator(data, global_batch_size=batch_size):
        batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
        acc.add(sums(variables, batch['image'], batch['label'], batch['mask']))
        seen += batch_size
        if time.time() - last_log > 30:
            last_log = time.time()
            log(
                f'  {acc.totals.get("count", 0)} examples, '
                f'{seen / (last_log - start):.1f} images/s',
                file=sys.stderr,
            )
    result = acc.result()
    result['seconds'] = time.time() - start
    return result


def main(argv: list[str] | None = None) -> int:
    """0 on success; 2 after one line ``error: ...`` on bad input (efficientnet/cli.py)."""
    return cli.run(lambda a: run(parse_args(a)), argv)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UsageError(f'--batch-size must be positive, got {args.batch_size}')
    if args.resolution is not None and args.resolution < 8:
        raise UsageError(f'--resolution must be at least 8, got {args.resolution}')
    if args.crop_fraction is not None and not 0.0 < args.crop_fraction <= 1.0:
        raise UsageError(f'--crop-fraction must be in (0, 1], got {args.crop_fraction}')
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    from efficientnet import paths
    from inference.cli import load_model_for_tool

    bad = paths.problems(
        [
            ('', args.source),
            ('--output', args.output),
            ('--data-dir', args.data_dir),
            ('--manual-dir', args.manual_dir),
            ('--folder', args.folder),
        ]
    )
    if bad:
        raise UsageError('\n  '.join(bad))

    loaded = load_model_for_tool(args.source, args)
    if loaded.num_classes == 0:
        raise UsageError(f'{args.source} has no classifier (a backbone); nothing to evaluate')
    overrides = {
        k: v
        for k, v in (
            ('resolution', args.resolution),
            ('crop_fraction', args.crop_fraction),
            ('interpolation', args.interpolation),
        )
        if v is not None
    }
    loaded = dataclasses.replace(loaded, **overrides) if overrides else loaded
    data = data_config_for(args, loaded)
    info = check_dataset(data)
    if info['num_classes'] > loaded.num_classes:
        raise UsageError(
            f'{loaded.name} has {loaded.num_classes} classes but dataset '
            f'{data.name!r} has {info["num_classes"]}: these weights were not '
            'trained on it'
        )
    print(
        f'{loaded.name} ({loaded.format} {args.source}'
        f'{f", step {loaded.step}" if loaded.step is not None else ""}'
        f'{", raw weights" if args.no_ema and loaded.format in ("workdir", "tf") else ""}) '
        f'on {data.name} {data.eval_split}: {info["num_eval"]} examples at '
        f'{loaded.resolution}px, crop {loaded.effective_crop_fraction:.4f}, '
        f'{loaded.interpolation}, {loaded.normalization} normalisation',
        file=sys.stderr,
    )
    result = evaluate(loaded, data, args.batch_size)
    if result['count'] != info['num_eval']:
        raise RuntimeError(
            f'counted {result["count"]} examples but the split has '
            f'{info["num_eval"]}: the eval masks are wrong'
        )
    report = {
        'model': loaded.name,
        'source': args.source,
        'format': loaded.format,
        'step': loaded.step,
        'ema': not args.no_ema,
        'dataset': data.name,
        'split': data.eval_split,
        'resolution': loaded.resolution,
        'crop_fraction': loaded.effective_crop_fraction,
        'interpolation': loaded.interpolation,
        'normalization': loaded.normalization,
        'top1': result['top1'],
        'top5': result['top5'],
        'loss': result['loss'],
        'count': int(result['count']),
        'seconds': result['seconds'],
    }
    print(
        f'top-1 {100 * report["top1"]:.2f}%  top-5 {100 * report["top5"]:.2f}%  '
        f'loss {report["loss"]:.4f}  count {report["count"]}'
    )
    if args.output:
        paths.write_atomic(args.output, json.dumps(report, indent=2) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
