"""What every source hands the pipeline: a split addressed by example index.

For a split a source gives `Examples`: its size N, a batched `read` (int64 indices [k] → records
[k], inside the tf.data graph; sources that need Python make one call per batch, never one per
image) and a per-record `load` that turns a record into `{'image': encoded bytes or uint8
[H, W, C], 'label': int32}`. Records are kept cheap (encoded bytes, file paths, example ids);
`load` runs inside the pipeline's parallel map, where the decoding happens. Index i is the same
example on every host and in every run, which is what the global order (`order.py`) needs.
"""

from __future__ import annotations

import dataclasses
import logging
import types
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Examples:
    """One split, addressed by index in [0, num_examples)."""

    num_examples: int
    read: Callable[[tf.Tensor], Any]  # int64 [k] → records [k] (a nest of tensors)
    load: Callable[[Any], dict]  # one record → {'image', 'label'}

    def in_memory(self, chunk: int = 1024) -> Examples:
        """The same split with every record read once into memory (encoded bytes stay encoded):
        later reads are gathers. For small datasets on slow storage."""
        ds = tf.data.Dataset.range(self.num_examples).batch(chunk).map(self.read)
        parts = list(ds)
        records = tf.nest.map_structure(lambda *xs: tf.concat(xs, axis=0), *parts)
        return dataclasses.replace(
            self, read=lambda ids: tf.nest.map_structure(lambda r: tf.gather(r, ids), records)
        )


def cfg_get(config: Any, key: str, default: Any = None) -> Any:
    """Reads a field from a ConfigDict or a mapping, with a default for fields a config lacks."""
    if isinstance(config, Mapping) or hasattr(config, 'get'):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None and default is not None else value


def shard_bounds(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, end) of process `process_index`'s contiguous part of n examples (evaluation)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    base, extra = divmod(n, process_count)
    start = process_index * base + min(process_index, extra)
    return start, start + base + (1 if process_index < extra else 0)


def _slice_indices(spec: str, split_sizes: dict[str, int]) -> np.ndarray:
    """Indices, in order, selected by a tfds-style split string ('train[:10%]', 'a+b')."""
    infos = {k: types.SimpleNamespace(num_examples=v) for k, v in split_sizes.items()}
    offsets = dict(zip(split_sizes, np.cumsum([0, *split_sizes.values()])))
    parts = []
    for inst in tfds.core.ReadInstruction.from_spec(spec).to_absolute(infos):
        if inst.splitname not in split_sizes:
            raise ValueError(f'unknown split {inst.splitname!r}; have {sorted(split_sizes)}')
        lo = 0 if inst.from_ is None else inst.from_
        hi = split_sizes[inst.splitname] if inst.to is None else inst.to
        parts.append(np.arange(lo, hi) + offsets[inst.splitname])
    return np.concatenate(parts) if parts else np.zeros([0], np.int64)


class Source:
    """A dataset: split sizes, classes, and random access to each split."""

    name: str = ''
    num_classes: int | None = None

    def num_examples(self, split: str) -> int:
        raise NotImplementedError

    def examples(self, split: str) -> Examples:
        raise NotImplementedError


class IndexedSource(Source):
    """A source held as arrays over all its splits (ids, file paths, small images); a split is
    a list of positions in them."""

    split_sizes: dict[str, int]
    aliases: dict[str, str] = {}

    def _indices(self, split: str) -> np.ndarray:
        spec = self.aliases.get(split, split)
        if spec != split:
            logger.info('%s: using split %r for %r', self.name, spec, split)
        return _slice_indices(spec, self.split_sizes)

    def num_examples(self, split: str) -> int:
        return len(self._indices(split))

    def examples(self, split: str) -> Examples:
        positions = tf.constant(self._indices(split).astype(np.int64))
        records, load = self._records()
        read = lambda ids: tf.nest.map_structure(
            lambda r: tf.gather(r, tf.gather(positions, ids)), records
        )
        return Examples(int(positions.shape[0]), read, load)

    def _records(self) -> tuple[Any, Callable[[Any], dict]]:
        """(records of every example as tensors with a leading axis, load)."""
        raise NotImplementedError
