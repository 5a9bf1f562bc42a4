"""The bridge from the input pipeline's host-local numpy batches to global device arrays: the
pipeline's iterators for this process, and a small device prefetcher that keeps the iterator
state needed by checkpoints."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.sharding import Mesh

import input_pipeline
from training import sharding


def create_train_iterator(
    data_config: Any, *, global_batch_size: int, seed: int, start_step: int = 0
) -> input_pipeline.TrainIterator:
    """This process's train batches (``input_pipeline.create_train_iterator``)."""
    return input_pipeline.create_train_iterator(
        data_config,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        start_step=start_step,
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
    """Turns host batches into global jax.Arrays ``depth`` steps ahead of the consumer.

    The iterator runs ahead, so its current state is not the state of the next batch to be
    consumed. For the steps where ``capture(step)`` is true (checkpoint steps), the state is
    recorded just before that batch is drawn; ``state_before(step)`` returns it.
    """

    def __init__(
        self,
        iterator: Any,
        mesh: Mesh,
        *,
        start_step: int,
        depth: int = 2,
        capture: Callable[[int], bool] = lambda step: False,
    ):
        self.iterator = iterator
        self.mesh = mesh
        self.depth = max(0, depth)
        self.capture = capture
        self.next_step = start_step  # step index of the next batch drawn from the iterator
        self.queue: collections.deque = collections.deque()
        self.states: dict[int, bytes] = {}

    def _pull(self) -> None:
        if self.capture(self.next_step):
            self.states[self.next_step] = self.iterator.get_state()
        self.queue.append(sharding.global_batch(next(self.iterator), self.mesh))
        self.next_step += 1

    def next(self) -> dict[str, jax.Array]:
        while len(self.queue) < self.depth + 1:
            self._pull()
        return self.queue.popleft()

    def state_before(self, step: int) -> bytes | None:
        """The iterator state from which batch ``step`` is the next one, if known."""
        if step == self.next_step:
            return self.iterator.get_state()
        for s in [s for s in self.states if s < step]:
            del self.states[s]
        return self.states.get(step)
