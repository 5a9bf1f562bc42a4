"""Input-pipeline throughput per CPU core, and the cost of saving/restoring the train position.

    python scripts/benchmark_input.py [--json] [--seconds 8] [--resolution 224]

Throughput runs the real preprocessing on generated ImageNet-sized JPEGs (500×375, quality 90,
smooth gradients, shapes and noise) with TensorFlow pinned to one thread and counts images per
CPU-second of the process, i.e. images/s per core:
  (a) decode-and-crop (Inception crop) + bicubic resize + flip,
  (b) (a) + RandAugment N=2, M=9,
  (c) (b) + MixUp (α=0.2) on batches of 128.
Resume: the size of `get_state()`, the time of `get_state`/`set_state`, and how fast skipping
encoded records runs (what a restore in the middle of a tfds epoch pays, nothing is decoded).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))


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


def throughput(tf, jpegs, resolution, *, randaugment: bool, mix: bool, seconds: float) -> float:
    from input_pipeline import augment, mixup, preprocessing

    batch = 128
    ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat().enumerate()

    def process(i, data):
        seed = tf.stack([tf.constant(1, tf.int64), i])
        image = preprocessing.preprocess_train(data, seed, resolution)
        if randaugment:
            image = augment.randaugment(image, seed + 7, 2, 9.0)
        return {'image': image, 'label': tf.cast(i % 1000, tf.int32)}

    ds = ds.map(process, num_parallel_calls=1).batch(batch).enumerate()
    if mix:
        ds = ds.map(lambda i, b: mixup.mix_batch(b, tf.stack([i, 0]), 1000, mixup_alpha=0.2))
    else:
        ds = ds.map(lambda i, b: b)
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    ds = ds.prefetch(1).with_options(options)
    it = iter(ds)
    next(it)  # warm-up: tracing, first decode
    # Images per CPU-second of this process (TF pinned to one thread): the per-core rate, and
    # unaffected by other jobs sharing the machine, unlike wall-clock time.
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        count += int(next(it)['image'].shape[0])
    return count / (time.process_time() - cpu)


def resume_costs(tf, jpegs) -> dict:
    import input_pipeline
    from configs.base import get_data_config

    root = tempfile.mkdtemp(prefix='bench_input_')
    for c in range(4):
        os.makedirs(os.path.join(root, f'c{c}'))
        for i, data in enumerate(jpegs):
            with open(os.path.join(root, f'c{c}', f'{i}.jpg'), 'wb') as f:
                f.write(data)
    config = get_data_config()
    config.name, config.folder, config.resolution = 'folder', root, 64
    it = input_pipeline.create_train_iterator(config, global_batch_size=16, seed=0)
    for _ in range(20):
        next(it)
    t = time.perf_counter()
    state = it.get_state()
    save_s = time.perf_counter() - t
    fresh = input_pipeline.create_train_iterator(config, global_batch_size=16, seed=0)
    t = time.perf_counter()
    fresh.set_state(state)
    next(fresh)
    restore_s = time.perf_counter() - t

    # A tfds epoch is a stream of TFRecords: a restore re-reads, without decoding, the records
    # consumed so far in the epoch, through the shuffle buffer.
    path = os.path.join(root, 'records.tfrecord')
    with tf.io.TFRecordWriter(path) as writer:
        for _ in range(16):
            for data in jpegs:
                writer.write(data)
    num_records = 16 * len(jpegs)
    ds = tf.data.TFRecordDataset(path).shuffle(1024, seed=1).skip(num_records - 1)
    t = time.perf_counter()
    next(iter(ds))
    skip_rate = num_records / (time.perf_counter() - t)
    mean_bytes = float(np.mean([len(j) for j in jpegs]))
    return {
        'state_bytes': len(state),
        'get_state_s': save_s,
        'set_state_to_first_batch_s': restore_s,
        'skip_records_per_s': skip_rate,
        'imagenet_epoch_skip_s_per_process': 1281167 / skip_rate,
        'mean_jpeg_kib': mean_bytes / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--json', action='store_true', help='print a JSON object only')
    parser.add_argument('--seconds', type=float, default=8.0, help='per measurement')
    parser.add_argument('--resolution', type=int, default=224)
    parser.add_argument('--images', type=int, default=64, help='distinct generated JPEGs')
    parser.add_argument('--no-resume', action='store_true', help='skip the resume measurement')
    args = parser.parse_args()

    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    import tensorflow as tf

    tf.config.set_visible_devices([], 'GPU')
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    jpegs = photo_like_jpegs(args.images)
    kw = dict(seconds=args.seconds)
    result = {
        'decode_per_core': throughput(
            tf, jpegs, args.resolution, randaugment=False, mix=False, **kw
        ),
        'randaugment_per_core': throughput(
            tf, jpegs, args.resolution, randaugment=True, mix=False, **kw
        ),
        'mixup_per_core': throughput(tf, jpegs, args.resolution, randaugment=True, mix=True, **kw),
        'resolution': args.resolution,
        'mean_jpeg_kib': float(np.mean([len(j) for j in jpegs])) / 1024,
    }
    result['randaugment_overhead'] = result['decode_per_core'] / result['randaugment_per_core'] - 1
    if not args.no_resume:
        result['resume'] = resume_costs(tf, jpegs)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f'JPEG 500x375 q90, mean {result["mean_jpeg_kib"]:.0f} KiB, output {args.resolution} px')
    print(f'(a) decode+crop+flip       {result["decode_per_core"]:8.1f} images/s per core')
    print(f'(b) + RandAugment N=2 M=9  {result["randaugment_per_core"]:8.1f} images/s per core '
          f'({100 * result["randaugment_overhead"]:+.0f}% time)')  # fmt: skip
    print(f'(c) + MixUp                {result["mixup_per_core"]:8.1f} images/s per core')
    if 'resume' in result:
        r = result['resume']
        print(f'resume: state {r["state_bytes"]} bytes, get_state {1e6 * r["get_state_s"]:.0f} us,'
              f' set_state→first batch {r["set_state_to_first_batch_s"]:.2f} s; skipping encoded'
              f' records {r["skip_records_per_s"]:.0f}/s (a full ImageNet epoch per process:'
              f' {r["imagenet_epoch_skip_s_per_process"]:.0f} s worst case)')  # fmt: skip


if __name__ == '__main__':
    main()
