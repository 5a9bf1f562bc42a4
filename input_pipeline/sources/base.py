"""What every source hands the pipeline: `Shard`s of cheap records, split sizes and classes.

For a (split, process) pair a source gives a `Shard`: a finite `tf.data.Dataset` of *records* in
a fixed order, its length, and a `load` function that turns a record into
`{'image': encoded bytes or uint8 [H, W, C], 'label': int32}`. Records are kept cheap (encoded
bytes, file paths, example ids) so shuffling and skipping them on resume never decodes an image;
`load` runs inside the pipeline's parallel map.

Processes get disjoint, contiguous shards whose sizes differ by at most one example.
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
class Shard:
    """One process's part of a split."""

    records: tf.data.Dataset
    num_examples: int
    load: Callable[[Any], dict]


def cfg_get(config: Any, key: str, default: Any = None) -> Any:
    """Reads a field from a ConfigDict or a mapping, with a default for fields a config lacks."""
    if isinstance(config, Mapping) or hasattr(config, 'get'):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None and default is not None else value


def shard_bounds(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, end) of process `process_index`'s contiguous part of n examples."""
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
    """A dataset: split sizes, classes, and per-process shards."""

    name: str = ''
    num_classes: int | None = None
    # Whether the pipeline walks one global train order on every process (each keeping its rows
    # of every global batch), independent of the process count. Only the fake source does so
    # today: it is what the multi-process tests compare against one process. Real sources keep
    # per-process shards until the data order is reworked for pod scale.
    global_order: bool = False

    def num_examples(self, split: str) -> int:
        raise NotImplementedError

    def shard(self, split: str, process_index: int, process_count: int) -> Shard:
        raise NotImplementedError


class IndexedSource(Source):
    """A source whose examples are addressable by an integer index (arrays, file lists, ids)."""

    split_sizes: dict[str, int]
    aliases: dict[str, str] = {}

    def _indices(self, split: str) -> np.ndarray:
        spec = self.aliases.get(split, split)
        if spec != split:
            logger.info('%s: using split %r for %r', self.name, spec, split)
        return _slice_indices(spec, self.split_sizes)

    def num_examples(self, split: str) -> int:
        return len(self._indices(split))

    def shard(self, split: str, process_index: int, process_count: int) -> Shard:
        indices = self._indices(split)
        lo, hi = shard_bounds(len(indices), process_index, process_count)
        return self._make_shard(indices[lo:hi])

    def _make_shard(self, indices: np.ndarray) -> Shard:
        raise NotImplementedError
