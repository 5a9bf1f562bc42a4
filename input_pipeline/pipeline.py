"""The tf.data graphs for training and evaluation, and the train iterator.

Training reads the global order of `order.py`, from any step, on any number of processes:
  global step k (from start_step on)
  → this process's positions g of batch k, and the examples at them    [int64 math, no I/O]
  → one batched read of those examples from the source                 [one call per batch]
  → parallel map: load, crop, resize, flip, RandAugment/AutoAugment; seeds = (key, g)
  → batch(local_batch) → MixUp/CutMix in fixed groups of global rows; seeds = (key, k)
  → prefetch.
Every random draw is keyed by a global position or the global step, never by the process or by
how far an iterator ran, so the processes' batches side by side are the global batch whatever
the process count, and a pipeline rebuilt at step k yields exactly batches k, k+1, ... of an
uninterrupted one at the cost of building it: the resume state is the step
(`order.StreamState`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import tensorflow as tf

from input_pipeline import augment, mixup, order, preprocessing, pseudo_labels, sources
from input_pipeline.order import StreamState, local_batch_size
from input_pipeline.sources.base import Examples, cfg_get, shard_bounds

logger = logging.getLogger(__name__)


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


def train_examples(config: Any) -> Examples:
    """The train split of the configured source, in memory when `config.cache` is set."""
    source = sources.get_source(config)
    split = cfg_get(config, 'train_split', 'train')
    examples = source.examples(split)
    if examples.num_examples == 0:
        raise ValueError(f'{source.name}: the train split {split!r} has no examples')
    return examples.in_memory() if cfg_get(config, 'cache', False) else examples


def _mix_group_size(config: Any, local_batch: int) -> int:
    group = int(cfg_get(config, 'mix_group_size', 2))
    if group <= 0 or local_batch % group:
        raise ValueError(
            f'config.data.mix_group_size={group} must divide the per-process batch {local_batch}'
            ' (MixUp/CutMix pair rows within groups of the global batch): set it to a '
            'divisor of it, or change batch_size'
        )
    return group


def build_train_dataset(
    config: Any,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
    resolution: int | None = None,
    examples: Examples | None = None,
) -> tf.data.Dataset:
    """Infinite dataset of this process's rows of global batches start_step, start_step + 1, ...

    `resolution` (default: config.resolution) is the output side, a parameter so that a run may
    change it between stages. `examples` (default: the config's train split) can be passed in to
    reuse an opened source.
    """
    hide_accelerators_from_tensorflow()
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    if cfg_get(config, 'pseudo_labels'):  # Noisy Student: labeled and pseudo-labeled rows
        return _with_pseudo_labels(
            config,
            global_batch_size=global_batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            start_step=start_step,
            resolution=resolution,
            examples=examples,
        )
    local_batch = local_batch_size(global_batch_size, process_count)
    examples = examples or train_examples(config)
    num_examples = examples.num_examples
    resolution = int(resolution or cfg_get(config, 'resolution', 224))
    crop_fraction = cfg_get(config, 'crop_fraction')
    interpolation = cfg_get(config, 'interpolation', 'bicubic')
    random_crop = bool(cfg_get(config, 'random_crop', True))
    random_flip = bool(cfg_get(config, 'random_flip', True))
    random_translate = int(cfg_get(config, 'random_translate', 0))
    augment_fn = _augment_fn(config)
    teacher_resolution = cfg_get(config, 'teacher_resolution')
    mixup_alpha = float(cfg_get(config, 'mixup_alpha', 0.0))
    cutmix_alpha = float(cfg_get(config, 'cutmix_alpha', 0.0))
    mixing = mixup_alpha > 0 or cutmix_alpha > 0
    if mixing:
        group = _mix_group_size(config, local_batch)
        num_classes = int(
            cfg_get(config, 'num_classes') or sources.get_source(config).num_classes or 1000
        )

    def read_step(step):
        positions = order.local_positions(step, global_batch_size, process_index, process_count)
        indices = order.example_indices(positions, seed, num_examples)
        return positions, examples.read(indices)

    example_key = order.example_key(seed)

    def process(position, record):
        example = examples.load(record)
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
            random_translate=random_translate,
        )
        if augment_fn is not None:
            image = augment_fn(image, aug_seed)
        label = example['label']  # a pseudo-labeled example's may be the teacher's probabilities
        out = {
            'image': image,
            'label': label if label.dtype.is_floating else tf.cast(label, tf.int32),
        }
        if teacher_resolution:  # distillation's clean teacher view (training/distill.py)
            out['teacher_image'] = preprocessing.preprocess_eval(
                example['image'],
                int(teacher_resolution),
                interpolation=interpolation,
                crop_fraction=cfg_get(config, 'teacher_crop_fraction'),
            )
        return out

    ds = tf.data.Dataset.range(start_step, 2**62)
    ds = ds.map(read_step, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    if mixing:
        mix_key = order.mix_key(seed)
        groups_per_process = local_batch // group
        ds = ds.enumerate(start=start_step).map(
            lambda step, batch: mixup.mix_batch(
                batch,
                tf.stack([mix_key, step]),
                num_classes,
                mixup_alpha,
                cutmix_alpha,
                group_size=group,
                num_groups=global_batch_size // group,
                first_group=process_index * groups_per_process,
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def _with_pseudo_labels(
    config: Any, *, global_batch_size: int, seed: int, examples: Examples | None, **layout: Any
) -> tf.data.Dataset:
    """Each batch: this process's labeled rows, then its pseudo-labeled rows
    (``pseudo_labels.py``), each stream in its own global order from ``start_step``."""
    ratio = int(cfg_get(config, 'unlabeled_ratio', 1))
    labeled_batch, pseudo_batch = pseudo_labels.batch_split(
        global_batch_size, ratio, layout['process_count']
    )
    plain = {**_config_items(config), 'pseudo_labels': None}
    num_classes = int(
        cfg_get(config, 'num_classes') or sources.get_source(config).num_classes or 1000
    )
    labeled = build_train_dataset(
        plain, global_batch_size=labeled_batch, seed=seed, examples=examples, **layout
    )
    pseudo = build_train_dataset(
        plain,
        global_batch_size=pseudo_batch,
        seed=pseudo_labels.stream_seed(seed),
        examples=pseudo_labels.examples(config, sources.get_source(config)),
        **layout,
    )
    ds = tf.data.Dataset.zip(labeled, pseudo).map(
        lambda a, b: pseudo_labels.combine(a, b, num_classes),
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
    local_batch = local_batch_size(global_batch_size, process_count)
    examples = sources.get_source(config).examples(cfg_get(config, 'eval_split', 'validation'))
    lo, hi = shard_bounds(examples.num_examples, process_index, process_count)
    num_batches = eval_batches_per_process(examples.num_examples, local_batch, process_count)
    resolution = int(cfg_get(config, 'resolution', 224))
    crop_fraction = cfg_get(config, 'crop_fraction')
    interpolation = cfg_get(config, 'interpolation', 'bicubic')

    def process(record):
        example = examples.load(record)
        image = preprocessing.preprocess_eval(
            example['image'], resolution, interpolation=interpolation, crop_fraction=crop_fraction
        )
        return {'image': image, 'label': tf.cast(example['label'], tf.int32), 'mask': True}

    # This process's contiguous block of the split, read a batch at a time.
    ds = tf.data.Dataset.range(lo, hi).batch(local_batch).map(examples.read).unbatch()
    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    padding = {
        'image': tf.zeros([resolution, resolution, 3], tf.uint8),
        'label': tf.constant(0, tf.int32),
        'mask': tf.constant(False),
    }
    num_padding = num_batches * local_batch - (hi - lo)
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


# What a stage of progressive learning may change in the train batches (training/progressive.py):
# how the examples are processed, never which examples they are.
STAGE_FIELDS = ('resolution', 'randaugment_magnitude', 'mixup_alpha', 'cutmix_alpha')


def _stage_overrides(overrides: dict[str, Any] | None) -> dict[str, Any]:
    unknown = sorted(set(overrides or {}) - set(STAGE_FIELDS))
    if unknown:
        raise ValueError(f'a stage may override only {STAGE_FIELDS}, not {unknown}')
    return dict(overrides or {})


class TrainIterator(Iterator[dict]):
    """Infinite iterator of this process's numpy train batches. Its resume state is the step:
    `stream.at(step)` is what a checkpoint stores, `stream.check_resume(saved)` what a resumed
    run checks before it builds the iterator at the saved step. `overrides` (`STAGE_FIELDS`)
    change how the examples are processed, for a stage of progressive learning (`restart`
    switches them); the examples are always those of `config`'s source and split."""

    def __init__(
        self,
        config: Any,
        *,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        start_step: int = 0,
        overrides: dict[str, Any] | None = None,
    ):
        self._config = config
        self._overrides = _stage_overrides(overrides)
        self._examples = train_examples(config)
        self.stream = StreamState(int(seed), self._examples.num_examples, int(global_batch_size))
        self._layout = dict(process_index=process_index, process_count=process_count)
        self._start(start_step)

    def restart(self, step: int, overrides: dict[str, Any] | None = None) -> None:
        """Continues from global batch ``step``, with new ``overrides`` if given: batch ``step``
        is then the one an iterator built with them at ``step`` yields."""
        if overrides is not None:
            self._overrides = _stage_overrides(overrides)
        self._start(step)

    def _start(self, step: int) -> None:
        self._step = int(step)
        config = self._config
        if self._overrides:  # the examples stay those of the config's source and split
            config = {**_config_items(config), **self._overrides}
        ds = build_train_dataset(
            config,
            global_batch_size=self.stream.global_batch_size,
            seed=self.stream.seed,
            start_step=self._step,
            examples=self._examples,
            **self._layout,
        )
        self._iterator = ds.as_numpy_iterator()

    @property
    def step(self) -> int:
        """Index of the global batch the next `next()` returns."""
        return self._step

    def state(self) -> dict:
        """The resume state before the next batch (the same on every process)."""
        return self.stream.at(self._step)

    def __next__(self) -> dict:
        batch = next(self._iterator)
        self._step += 1
        return batch
