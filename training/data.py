"""The bridge from the input pipeline's host-local numpy batches to global device arrays: the
pipeline's iterators for this process, and a small device prefetcher. The train stream's resume
state is the step (``input_pipeline.StreamState``), so nothing here tracks iterator state."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import jax
from jax.sharding import Mesh

import input_pipeline
from training import sharding


def create_train_iterator(
    data_config: Any,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    overrides: dict[str, Any] | None = None,
) -> input_pipeline.TrainIterator:
    """This process's train batches (``input_pipeline.create_train_iterator``)."""
    return input_pipeline.create_train_iterator(
        data_config,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        start_step=start_step,
        overrides=overrides,
    )


def create_eval_iterator(data_config: Any, *, global_batch_size: int) -> Iterator[dict]:
    """This process's part of one exact pass over the eval split."""
    return input_pipeline.create_eval_iterator(
        data_config,
        global_batch_size=global_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


class DevicePrefetcher:
    """Turns host batches into global jax.Arrays ``depth`` steps ahead of the consumer, never
    reading past batch ``stop`` (the end of a progressive-learning stage; None: no end)."""

    def __init__(self, iterator: Any, mesh: Mesh, *, depth: int = 2, stop: int | None = None):
        self.iterator = iterator
        self.mesh = mesh
        self.depth = max(0, depth)
        self.stop = stop
        self.queue: collections.deque = collections.deque()

    def next(self) -> dict[str, jax.Array]:
        while len(self.queue) < self.depth + 1 and (
            self.stop is None or self.iterator.step < self.stop
        ):
            self.queue.append(sharding.global_batch(next(self.iterator), self.mesh))
        return self.queue.popleft()
