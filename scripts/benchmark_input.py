"""Input-pipeline throughput per CPU core, the streaming path before the global order against
the global-order path, side by side; and the cost of resuming at an early and a late step.

    python scripts/benchmark_input.py [--json] [--seconds 8] [--rounds 2] [--resolution 224]

Data: generated ImageNet-sized JPEGs (500×375, quality 90, smooth gradients, shapes and noise)
as tf.train.Examples {image, label}, written once as a TFRecord file and as an array_record file
(group size 1, as tfds writes them).

Throughput: images per CPU-second of the process with TensorFlow pinned to one thread, i.e.
images/s per core. Every variant runs in its own process (an idle tf.data iterator in the same
process would keep prefetching and charge its CPU time to the variant being timed), in
alternation, `--rounds` times:
  stream        the path before the global order: TFRecord read in file order through a
                shuffle buffer, then per example: parse, decode-and-crop (Inception crop),
                bicubic resize, flip
  stream+ra     the same + RandAugment N=2, M=9
  global        `input_pipeline.pipeline.build_train_dataset`: the global order, one batched
                array_record read per batch, parse, the same transforms
  global+ra     the same + RandAugment N=2, M=9
  global+ra+mix the same + MixUp (α=0.2) / CutMix (α=1.0), batches of 128
Resume: seconds from building a pipeline at step k to its first batch (RandAugment on), k early
and late (for the stream, late in the small file's epoch). The streaming path must also re-read
(not decode) the records consumed so far in the epoch through its shuffle buffer: the rate at
which it skips them (timed separately over 4 passes of the file) gives what resuming at the end
of an ImageNet epoch (1,281,167 records) costs it. The global path computes any position
directly.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)

BATCH = 128
IMAGENET_TRAIN = 1281167
VARIANTS = ('stream', 'stream+ra', 'global', 'global+ra', 'global+ra+mix')


def photo_like_jpegs(count: int, size=(500, 375), quality: int = 90) -> list[bytes]:
    rng = np.random.default_rng(0)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(count):
        base = np.stack(
            [
                128 + 100 * np.sin(x / (30 + 7 * i % 40) + i),
                128 + 100 * np.cos(y / (25 + 5 * i % 30)),
                128 + 80 * np.sin((x + y) / (50 + i % 20)),
            ],
            -1,
        )
        image = Image.fromarray(
            np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype('uint8')
        )
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x0, y0 = rng.integers(0, w - 60), rng.integers(0, h - 60)
            box = [x0, y0, x0 + rng.integers(20, 160), y0 + rng.integers(20, 120)]
            draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        image.save(buf, 'JPEG', quality=quality)
        out.append(buf.getvalue())
    return out


def write_files(directory: str, num_images: int, repeats: int) -> dict:
    """The same serialized examples as `data.tfrecord` and `data.array_record`."""
    import tensorflow as tf
    from array_record.python.array_record_module import ArrayRecordWriter

    jpegs = photo_like_jpegs(num_images)
    records = []
    for _ in range(repeats):
        for i, data in enumerate(jpegs):
            feature = {
                'image': tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
                'label': tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 1000])),
            }
            records.append(
                tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
            )
    paths = {k: os.path.join(directory, f'data.{k}') for k in ('tfrecord', 'array_record')}
    with tf.io.TFRecordWriter(paths['tfrecord']) as writer:
        for record in records:
            writer.write(record)
    writer = ArrayRecordWriter(paths['array_record'], 'group_size:1')
    for record in records:
        writer.write(record)
    writer.close()
    return {
        **paths,
        'num_examples': len(records),
        'mean_jpeg_kib': float(np.mean([len(j) for j in jpegs])) / 1024,
    }


def _data_config(resolution: int, randaugment: bool, mix: bool):
    from configs.base import get_data_config

    config = get_data_config()
    config.resolution = resolution
    config.augment = 'randaugment' if randaugment else 'none'
    if mix:
        config.mixup_alpha, config.cutmix_alpha = 0.2, 1.0
    return config


def _one_thread(ds):
    import tensorflow as tf

    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    return ds.with_options(options)


def stream_dataset(files: dict, resolution: int, randaugment: bool, start_step: int = 0):
    """The path before the global order, rebuilt for comparison: records streamed in file order
    through a 16k shuffle buffer, skipped on resume, then parsed and transformed one by one."""
    import tensorflow as tf

    from input_pipeline import augment, preprocessing

    spec = {
        'image': tf.io.FixedLenFeature([], tf.string),
        'label': tf.io.FixedLenFeature([], tf.int64),
    }
    n = files['num_examples']
    records = tf.data.TFRecordDataset(files['tfrecord'])
    ds = tf.data.Dataset.range(2**62).flat_map(
        lambda e: records.shuffle(min(16384, n), seed=e, reshuffle_each_iteration=False)
    )
    ds = ds.enumerate().skip(start_step * BATCH)

    def process(position, record):
        example = tf.io.parse_single_example(record, spec)
        seed = tf.stack([tf.constant(1, tf.int64), position])
        image = preprocessing.preprocess_train(example['image'], seed, resolution)
        if randaugment:
            image = augment.randaugment(image, seed + 7, 2, 9.0)
        return {'image': image, 'label': tf.cast(example['label'], tf.int32)}

    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(BATCH, drop_remainder=True).prefetch(1)


def global_dataset(files: dict, resolution: int, randaugment: bool, mix: bool, start_step=0):
    """`build_train_dataset` on the array_record file (the path tfds array_record datasets take)."""
    import tensorflow_datasets as tfds
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    from input_pipeline.pipeline import build_train_dataset
    from input_pipeline.sources.tfds_source import serialized_examples

    examples = serialized_examples(
        ArrayRecordDataSource([files['array_record']]),
        tfds.features.Image(),
        tfds.features.ClassLabel(num_classes=1000),
    )
    return build_train_dataset(
        _data_config(resolution, randaugment, mix),
        global_batch_size=BATCH,
        seed=0,
        start_step=start_step,
        examples=examples,
    )


def _dataset(variant: str, files: dict, resolution: int, start_step: int = 0):
    randaugment, mix = '+ra' in variant, '+mix' in variant
    if variant.startswith('stream'):
        return stream_dataset(files, resolution, randaugment, start_step)
    return global_dataset(files, resolution, randaugment, mix, start_step)


def measure_variant(variant: str, files: dict, resolution: int, seconds: float) -> float:
    """Images per process-CPU-second (TF on one thread): the per-core rate, unaffected by other
    jobs sharing the machine, unlike wall-clock time."""
    it = iter(_one_thread(_dataset(variant, files, resolution)))
    next(it)  # warm-up: tracing, first reads and decodes
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        count += int(next(it)['image'].shape[0])
    return count / (time.process_time() - cpu)


def measure_resume(files: dict, resolution: int) -> dict:
    """Seconds from building at step k to the first batch (RandAugment on), after one untimed
    build of each path (tracing and compiling the transforms is paid once per process)."""
    steps_per_epoch = files['num_examples'] // BATCH
    out = {}
    for kind in ('stream+ra', 'global+ra'):  # warm-up: the first build in a process also traces
        next(iter(_dataset(kind, files, resolution, 0)))
    for name, kind, step in [
        ('stream_early', 'stream+ra', 1),
        ('stream_late', 'stream+ra', steps_per_epoch - 1),
        ('global_early', 'global+ra', 1),
        ('global_late', 'global+ra', 10**6),
        ('global_very_late', 'global+ra', 10**9),
    ]:
        t = time.perf_counter()
        next(iter(_dataset(kind, files, resolution, step)))
        out[f'{name}_s'] = time.perf_counter() - t
        out[f'{name}_step'] = step
    # What a stream resume pays per record consumed in the epoch: re-reading it through the
    # shuffle buffer (no decode), timed over 4 passes of the file.
    import tensorflow as tf

    n = 4 * files['num_examples']
    records = tf.data.TFRecordDataset(files['tfrecord']).repeat(4)
    skip = records.shuffle(min(16384, n), seed=0).skip(n - 1)
    t = time.perf_counter()
    next(iter(skip))
    out['stream_skip_records_per_s'] = n / (time.perf_counter() - t)
    out['stream_imagenet_epoch_end_s'] = IMAGENET_TRAIN / out['stream_skip_records_per_s']
    return out


def _child(args) -> None:
    import tensorflow as tf

    tf.config.set_visible_devices([], 'GPU')
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    files = json.loads(args.files)
    if args.variant == 'resume':
        result = measure_resume(files, args.resolution)
    else:
        result = measure_variant(args.variant, files, args.resolution, args.seconds)
    print(json.dumps({'result': result}))


def _run_child(variant: str, files: dict, args) -> object:
    cmd = [
        sys.executable, os.path.abspath(__file__), '--child', variant, '--files',
        json.dumps(files), '--seconds', str(args.seconds), '--resolution', str(args.resolution),
    ]  # fmt: skip
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if p.returncode:
        raise RuntimeError(f'{variant} failed:\n{p.stderr[-3000:]}')
    return json.loads(p.stdout.strip().splitlines()[-1])['result']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--json', action='store_true', help='print a JSON object only')
    parser.add_argument('--seconds', type=float, default=8.0, help='per measurement')
    parser.add_argument('--rounds', type=int, default=2, help='alternations of all variants')
    parser.add_argument('--resolution', type=int, default=224)
    parser.add_argument('--images', type=int, default=128, help='distinct generated JPEGs')
    parser.add_argument('--repeats', type=int, default=16, help='copies of them in the files')
    parser.add_argument('--variants', default=','.join(VARIANTS))
    parser.add_argument('--no-resume', action='store_true', help='skip the resume measurement')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    parser.add_argument('--files', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(argparse.Namespace(**{**vars(args), 'variant': args.child}))
        return

    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    variants = args.variants.split(',')
    with tempfile.TemporaryDirectory(prefix='bench_input_') as directory:
        files = write_files(directory, args.images, args.repeats)
        rates: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v in variants:
                rates[v].append(_run_child(v, files, args))
        resume = None if args.no_resume else _run_child('resume', files, args)
    mean = {v: float(np.mean(r)) for v, r in rates.items()}
    result = {
        'per_core': mean,
        'per_core_rounds': rates,
        'resolution': args.resolution,
        'mean_jpeg_kib': files['mean_jpeg_kib'],
        'num_examples': files['num_examples'],
    }
    ratios = {}
    for num, den in [
        ('stream+ra', 'stream'), ('global', 'stream'), ('global+ra', 'global'),
        ('global+ra', 'stream+ra'), ('global+ra+mix', 'global'),
    ]:  # fmt: skip
        if num in mean and den in mean:
            ratios[f'{num} / {den}'] = mean[num] / mean[den]
    result['ratios'] = ratios
    if resume:
        result['resume'] = resume
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(
        f'JPEG 500x375 q90, mean {files["mean_jpeg_kib"]:.0f} KiB, {files["num_examples"]} '
        f'records, output {args.resolution} px, images per CPU-second (one thread), '
        f'{args.rounds} rounds'
    )
    for v in variants:
        rounds = ', '.join(f'{r:.0f}' for r in rates[v])
        print(f'  {v:14s} {mean[v]:8.1f}   ({rounds})')
    for k, v in ratios.items():
        print(f'  {k:26s} {v:.2f}')
    if resume:
        r = resume
        print(
            f'resume → first batch: stream step {r["stream_early_step"]} '
            f'{r["stream_early_s"]:.2f} s, step {r["stream_late_step"]} '
            f'{r["stream_late_s"]:.2f} s, '
            f'plus {r["stream_skip_records_per_s"]:.0f} records/s skipped (the end of an ImageNet '
            f'epoch: {r["stream_imagenet_epoch_end_s"]:.0f} s); global step 1 '
            f'{r["global_early_s"]:.2f} s, step 10^6 {r["global_late_s"]:.2f} s, step 10^9 '
            f'{r["global_very_late_s"]:.2f} s'
        )


if __name__ == '__main__':
    main()
