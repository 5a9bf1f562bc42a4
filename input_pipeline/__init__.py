"""Input pipeline: tf.data + tfds → host-local numpy batches (see docs/interfaces.md).

The front door for every source (tfds, image folder, Fashion-MNIST, fake): `dataset_info`,
`create_train_iterator`, `create_eval_iterator`. Never imports jax or the model. Importing
this package has no side effects; TensorFlow is kept off the GPUs when a pipeline is built.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from input_pipeline import pseudo_labels, sources
from input_pipeline.order import StreamState
from input_pipeline.pipeline import TrainIterator, build_eval_dataset
from input_pipeline.sources.base import cfg_get

__all__ = [
    'StreamState',
    'TrainIterator',
    'create_eval_iterator',
    'create_train_iterator',
    'dataset_info',
]


def create_train_iterator(
    data_config: Any,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
    overrides: dict[str, Any] | None = None,
) -> TrainIterator:
    """Infinite iterator of {'image': uint8 [B, S, S, 3], 'label'} with B = global / processes:
    process p's rows [p·B, (p + 1)·B) of global batches start_step, start_step + 1, ...

    'label' is int32 [B], or float32 [B, num_classes] mixed targets when MixUp/CutMix is on.
    The batches depend on (data config, overrides, seed, global batch, step), not on the
    process count. ``overrides``: a progressive-learning stage's image size, RandAugment
    magnitude and MixUp/CutMix alpha (``TrainIterator.restart`` changes them at a step).
    """
    return TrainIterator(
        data_config,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        start_step=start_step,
        overrides=overrides,
    )


def create_eval_iterator(
    data_config: Any, *, global_batch_size: int, process_index: int = 0, process_count: int = 1
) -> Iterator[dict]:
    """A fresh pass over the eval split: {'image', 'label', 'mask'} batches, padded and masked.

    Every process yields the same number of batches; masks over all processes sum to the split
    size, and every example appears exactly once.
    """
    ds = build_eval_dataset(
        data_config,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    return ds.as_numpy_iterator()


def dataset_info(data_config: Any) -> dict:
    """{'num_classes', 'num_train', 'num_eval'} of the configured dataset and splits."""
    source = sources.get_source(data_config)
    num_classes = source.num_classes or cfg_get(data_config, 'num_classes', 1000)
    return {
        'num_classes': int(num_classes),
        # Noisy Student: an epoch is a pass over the labeled and the pseudo-labeled examples.
        'num_train': source.num_examples(cfg_get(data_config, 'train_split', 'train'))
        + pseudo_labels.count(data_config),
        'num_eval': source.num_examples(cfg_get(data_config, 'eval_split', 'validation')),
    }
