"""The tf.data graphs for training and evaluation, and the resumable train iterator.

Training order is a pure function of (seed, stream, step). A stream is the records one process
walks: for indexed sources (fake, folder, Fashion-MNIST: records are ids, paths or small arrays)
every process walks the whole split, one stream shared by all, and keeps its rows of each global
batch, so the batches do not depend on the process count; for tfds sources each process walks
its own shard of the files (stream = process index).
  records of the stream
  → epoch e: shuffle(min(shuffle_buffer, n), seed = hash(seed, stream, e))  [cheap records]
  → concatenated epochs, enumerated: example position t in the stream
  → skip(start_step · examples per step in the stream)                      [resume: no decode]
  → shared stream: keep t if (t // local_batch) mod process_count = process index
  → parallel map: load, crop, resize, flip, RandAugment/AutoAugment; seeds = (seed, stream, t)
  → batch(local_batch) → MixUp/CutMix with seeds (seed, process, step) → prefetch.
Every random draw is stateless and keyed by a position, never by how far an iterator ran, so a
pipeline rebuilt at step k yields exactly batches k, k+1, ... of an uninterrupted one. The
resume state is therefore a few integers; restoring re-reads (but does not decode) the records
consumed in the current epoch. For datasets no larger than `shuffle_buffer` (and for every
indexed source sized under it) the epoch shuffle is a full permutation. MixUp/CutMix mixes
within a process's batch, so it alone depends on the process count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from input_pipeline import augment, mixup, preprocessing, sources
from input_pipeline.sources.base import cfg_get, shard_bounds

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_EPOCH_SALT, _EXAMPLE_SALT, _BATCH_SALT = 0x5EED0001, 0x5EED0002, 0x5EED0003


def hide_accelerators_from_tensorflow() -> None:
    """TF only runs the input pipeline: keep it off the GPUs and TPUs (they belong to JAX)."""
    for kind in ('GPU', 'TPU'):
        try:
            tf.config.set_visible_devices([], kind)
        except RuntimeError:  # TF already initialised its devices; check none is in use
            if tf.config.get_visible_devices(kind):
                logger.warning(
                    'TensorFlow was initialised with %ss visible before the pipeline', kind
                )


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = True
    options.experimental_optimization.map_parallelization = True
    options.threading.max_intra_op_parallelism = 1
    return options


@dataclasses.dataclass(frozen=True)
class TrainOrder:
    """What the train batches depend on besides the data config and the step."""

    global_batch_size: int
    seed: int
    process_index: int = 0
    process_count: int = 1


def _local_batch(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(f'global batch {global_batch_size} not divisible by {process_count}')
    return global_batch_size // process_count


def _mixed_seed(*parts: int) -> tf.Tensor:
    """A stateless seed [2] from integers: a 64-bit hash of the parts and the last part."""
    key = np.uint64(0x9E3779B97F4A7C15)
    for part in parts:
        key = np.uint64((int(key) * 6364136223846793005 + int(part) + 1442695040888963407) % 2**64)
    return tf.constant([int(key) % 2**63, parts[-1]], tf.int64)


@contextlib.contextmanager
def _independent_of_global_tf_seed():
    """tf.data's `shuffle(seed=s)` draws from (global seed, s) when a global TF seed is set
    (`tf.random.set_seed`, `keras.utils.set_random_seed`) and from (TF's default, s) otherwise,
    so the same config gave another example order in a process whose user or library had set
    one. The epoch shuffles are built with no global seed; the caller's seed is put back (which,
    as `tf.random.set_seed` always does, restarts its sequence of op seeds)."""
    global_seed = tf.compat.v1.get_seed(None)[0]
    if global_seed is None:
        yield
        return
    tf.random.set_seed(None)
    try:
        yield
    finally:
        tf.random.set_seed(global_seed)


def _augment_fn(config):
    name = cfg_get(config, 'augment', 'none') or 'none'
    if name == 'none':
        return None
    if name == 'randaugment':
        n = int(cfg_get(config, 'randaugment_layers', 2))
        m = float(cfg_get(config, 'randaugment_magnitude', 9))
        return lambda image, seed: augment.randaugment(image, seed, n, m)
    if name == 'autoaugment':
        return augment.autoaugment
    raise ValueError(f"augment must be 'none', 'randaugment' or 'autoaugment', got {name!r}")


def build_train_dataset(config: Any, order: TrainOrder, start_step: int = 0) -> tf.data.Dataset:
    """Infinite dataset of this process's batches from `start_step` on (see module docstring)."""
    hide_accelerators_from_tensorflow()
    seed, process_index = order.seed, order.process_index
    local_batch = _local_batch(order.global_batch_size, order.process_count)
    source = sources.get_source(config)
    split = cfg_get(config, 'train_split', 'train')
    if source.global_order:  # one stream, walked by every process
        shard, stream, processes_in_stream = source.shard(split, 0, 1), 0, order.process_count
    else:
        shard = source.shard(split, process_index, order.process_count)
        stream, processes_in_stream = process_index, 1
    if shard.num_examples == 0:
        raise ValueError(f'{source.name}: process {process_index} has no training examples')
    resolution = int(cfg_get(config, 'resolution', 224))
    num_classes = int(cfg_get(config, 'num_classes', source.num_classes or 1000))
    crop_fraction = cfg_get(config, 'crop_fraction')
    interpolation = cfg_get(config, 'interpolation', 'bicubic')
    random_crop = bool(cfg_get(config, 'random_crop', True))
    random_flip = bool(cfg_get(config, 'random_flip', True))
    augment_fn = _augment_fn(config)
    teacher_resolution = cfg_get(config, 'teacher_resolution')
    mixup_alpha = float(cfg_get(config, 'mixup_alpha', 0.0))
    cutmix_alpha = float(cfg_get(config, 'cutmix_alpha', 0.0))

    records, load = shard.records, shard.load
    if cfg_get(config, 'cache', False):
        # Decoded full images in memory; crops are then taken from arrays, not JPEG bytes.
        records = records.map(
            lambda r: {**load(r), 'image': preprocessing.decode(load(r)['image'])},
            num_parallel_calls=tf.data.AUTOTUNE,
        ).cache()
        load = lambda r: r

    n = shard.num_examples
    buffer = max(1, min(int(cfg_get(config, 'shuffle_buffer', 16384)), n))
    first_example = start_step * local_batch * processes_in_stream
    first_epoch, skip = divmod(first_example, n)
    epoch_key = _mixed_seed(seed, stream, _EPOCH_SALT)[0]

    def epoch(e):
        epoch_seed = tf.random.stateless_uniform(
            [], tf.stack([epoch_key, e]), minval=None, maxval=None, dtype=tf.int64
        )
        return records.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)

    with _independent_of_global_tf_seed():  # flat_map traces `epoch`, hence the shuffle, here
        ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch)
    ds = ds.enumerate(start=first_epoch * n).skip(skip)
    if processes_in_stream > 1:  # this process's rows of each global batch
        ds = ds.filter(
            lambda position, record: position // local_batch % processes_in_stream == process_index
        )

    example_key = _mixed_seed(seed, stream, _EXAMPLE_SALT)[0]

    def process(position, record):
        example = load(record)
        example_seed = tf.stack([example_key, position])
        crop_seed, aug_seed = tf.unstack(tf.random.experimental.stateless_split(example_seed, 2))
        image = preprocessing.preprocess_train(
            example['image'],
            crop_seed,
            resolution,
            random_crop=random_crop,
            random_flip=random_flip,
            interpolation=interpolation,
            crop_fraction=crop_fraction,
        )
        if augment_fn is not None:
            image = augment_fn(image, aug_seed)
        out = {'image': image, 'label': tf.cast(example['label'], tf.int32)}
        if teacher_resolution:  # distillation's clean teacher view (training/distill.py)
            out['teacher_image'] = preprocessing.preprocess_eval(
                example['image'],
                int(teacher_resolution),
                interpolation=interpolation,
                crop_fraction=cfg_get(config, 'teacher_crop_fraction'),
            )
        return out

    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    if mixup_alpha > 0 or cutmix_alpha > 0:
        batch_key = _mixed_seed(seed, process_index, _BATCH_SALT)[0]
        ds = ds.enumerate(start=start_step).map(
            lambda step, batch: mixup.mix_batch(
                batch, tf.stack([batch_key, step]), num_classes, mixup_alpha, cutmix_alpha
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def eval_batches_per_process(num_examples: int, local_batch: int, process_count: int) -> int:
    """Batches every process yields: enough for the largest shard."""
    largest = shard_bounds(num_examples, 0, process_count)
    return math.ceil((largest[1] - largest[0]) / local_batch)


_EVAL_CACHE: dict[str, tf.data.Dataset] = {}


def build_eval_dataset(
    config: Any, *, global_batch_size: int, process_index: int = 0, process_count: int = 1
) -> tf.data.Dataset:
    """Finite dataset of padded eval batches with a 'mask'; same batch count on every process."""
    cache = bool(cfg_get(config, 'cache', False))
    key = json.dumps(
        [_config_items(config), global_batch_size, process_index, process_count], default=str
    )
    if cache and key in _EVAL_CACHE:
        return _EVAL_CACHE[key]
    hide_accelerators_from_tensorflow()
    local_batch = _local_batch(global_batch_size, process_count)
    source = sources.get_source(config)
    split = cfg_get(config, 'eval_split', 'validation')
    shard = source.shard(split, process_index, process_count)
    num_batches = eval_batches_per_process(source.num_examples(split), local_batch, process_count)
    resolution = int(cfg_get(config, 'resolution', 224))
    crop_fraction = cfg_get(config, 'crop_fraction')
    interpolation = cfg_get(config, 'interpolation', 'bicubic')
    load = shard.load

    def process(record):
        example = load(record)
        image = preprocessing.preprocess_eval(
            example['image'], resolution, interpolation=interpolation, crop_fraction=crop_fraction
        )
        return {'image': image, 'label': tf.cast(example['label'], tf.int32), 'mask': True}

    ds = shard.records.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    padding = {
        'image': tf.zeros([resolution, resolution, 3], tf.uint8),
        'label': tf.constant(0, tf.int32),
        'mask': tf.constant(False),
    }
    num_padding = num_batches * local_batch - shard.num_examples
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_padding))
    ds = ds.batch(local_batch, drop_remainder=True)
    if cache:
        ds = ds.cache()
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
    if cache:
        _EVAL_CACHE[key] = ds
    return ds


def _config_items(config: Any) -> Any:
    return config.to_dict() if hasattr(config, 'to_dict') else dict(config)


class TrainIterator(Iterator[dict]):
    """Infinite iterator of numpy train batches with `get_state`/`set_state` (a JSON blob)."""

    def __init__(self, config: Any, order: TrainOrder, start_step: int = 0):
        self._config = config
        self._order = order
        self._start(start_step)

    def _start(self, step: int) -> None:
        self._step = int(step)
        ds = build_train_dataset(self._config, self._order, self._step)
        self._iterator = ds.as_numpy_iterator()

    @property
    def step(self) -> int:
        """Index of the batch the next `next()` returns."""
        return self._step

    def __next__(self) -> dict:
        batch = next(self._iterator)
        self._step += 1
        return batch

    def get_state(self) -> bytes:
        """The position as bytes: format version, step, and the arguments the order depends on."""
        state = {'version': STATE_VERSION, 'step': self._step, **dataclasses.asdict(self._order)}
        state['dataset'] = cfg_get(self._config, 'name', 'imagenet2012')
        return json.dumps(state, sort_keys=True).encode()

    def set_state(self, state: bytes) -> None:
        """Continues from a `get_state()` value; refuses one from a differently-shaped run."""
        saved = json.loads(bytes(state).decode())
        if saved.get('version') != STATE_VERSION:
            raise ValueError(f'unknown input pipeline state version {saved.get("version")}')
        for key, value in dataclasses.asdict(self._order).items():
            if saved.get(key) != value:
                raise ValueError(f'input state has {key}={saved.get(key)}, this run {value}')
        self._start(saved['step'])
