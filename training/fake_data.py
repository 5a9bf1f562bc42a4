"""A synthetic dataset with the input pipeline's contract (docs/interfaces.md), for tests and
smoke runs: batches are a pure function of (seed, step), so resumption is exact.

Images are a class-dependent colour plus noise, so a model can learn them and accuracy moves.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np


def _class_colours(num_classes: int) -> np.ndarray:
    return np.random.default_rng(12345).integers(40, 216, (num_classes, 3)).astype(np.int16)


def _make_examples(rng: np.random.Generator, labels: np.ndarray, resolution: int,
                   num_classes: int) -> np.ndarray:
    noise = rng.integers(-40, 41, (len(labels), resolution, resolution, 3), dtype=np.int16)
    images = _class_colours(num_classes)[labels][:, None, None, :] + noise
    return np.clip(images, 0, 255).astype(np.uint8)


class FakeTrainIterator:
    """Infinite train batches; batch k of the global batch is drawn from rng(seed, k) and each
    process keeps its contiguous slice of rows."""

    def __init__(self, data_config: Any, *, global_batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, start_step: int = 0):
        if global_batch_size % process_count:
            raise ValueError(f'global batch {global_batch_size} does not split over '
                             f'{process_count} processes')
        self.config = data_config
        self.global_batch_size = global_batch_size
        self.local_batch = global_batch_size // process_count
        self.process_index = process_index
        self.seed = seed
        self.step = start_step

    def __iter__(self) -> FakeTrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        c = self.config
        rng = np.random.default_rng([self.seed, self.step])
        labels = rng.integers(0, c.num_classes, self.global_batch_size).astype(np.int32)
        lo = self.process_index * self.local_batch
        rows = slice(lo, lo + self.local_batch)
        images = _make_examples(rng, labels, c.resolution, c.num_classes)[rows]
        self.step += 1
        return {'image': images, 'label': labels[rows]}

    def get_state(self) -> bytes:
        return json.dumps({'step': self.step, 'seed': self.seed}).encode()

    def set_state(self, state: bytes) -> None:
        d = json.loads(state.decode())
        if d['seed'] != self.seed:
            raise ValueError(f'data state was saved with seed {d["seed"]}, not {self.seed}')
        self.step = int(d['step'])


def create_eval_iterator(data_config: Any, *, global_batch_size: int, process_index: int = 0,
                         process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """One pass over ``fake_num_eval`` fixed examples, the last batch padded and masked."""
    c = data_config
    n = c.fake_num_eval
    rng = np.random.default_rng(987654321)
    labels = rng.integers(0, c.num_classes, n).astype(np.int32)
    images = _make_examples(rng, labels, c.resolution, c.num_classes)
    local = global_batch_size // process_count
    for start in range(0, n, global_batch_size):
        idx = np.arange(start, start + global_batch_size)[process_index * local:][:local]
        mask = idx < n
        idx = np.where(mask, idx, 0)
        yield {'image': images[idx], 'label': labels[idx], 'mask': mask}


def create_train_iterator(data_config: Any, **kwargs: Any) -> FakeTrainIterator:
    return FakeTrainIterator(data_config, **kwargs)


def dataset_info(data_config: Any) -> dict[str, int]:
    return {'num_classes': data_config.num_classes, 'num_train': data_config.fake_num_train,
            'num_eval': data_config.fake_num_eval}
