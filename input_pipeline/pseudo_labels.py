"""Pseudo-labeled examples for Noisy Student: a selection file over an unlabeled split, and the
train stream that puts labeled and pseudo-labeled rows side by side in every batch.

A selection file (``.npz``, local or gs://, written by ``training/noisy_student.py``) holds
``index`` int64 [n]: positions in ``data.unlabeled_split`` (an image chosen twice appears twice:
class balancing duplicates), and the teacher's targets: ``probs`` float32 [n, K] (soft
pseudo-labels) or ``classes`` int32 [n] (hard). Every train batch of ``batch_size`` rows is then
``batch_size / (1 + r)`` labeled rows followed by ``r`` times as many pseudo-labeled rows
(``r = data.unlabeled_ratio``), per process, each stream in its own global order, so a
pipeline rebuilt at step k yields exactly batch k as before. The labels become float targets
[B, K] and the batch carries ``smooth`` [B] (1: the loss applies label smoothing to the row, 0:
it does not): labeled rows and hard pseudo-labels are smoothed, the teacher's probabilities
are not (as in the official Noisy Student code).
"""

from __future__ import annotations

import dataclasses
import functools
import io
from typing import Any

import numpy as np
import tensorflow as tf

from input_pipeline.sources.base import Examples, cfg_get

# The unlabeled stream's order and augmentation draw from a seed of their own.
_STREAM_SALT = 0x5EED0010


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> str:
    """Writes ``arrays`` as one ``.npz`` atomically (local or gs://); returns the path."""
    from efficientnet import paths

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return paths.write_atomic(path, buf.getvalue())


def read_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (local or gs://), read as ``write_npz`` writes it
    (``efficientnet.paths``)."""
    from efficientnet import paths

    with np.load(io.BytesIO(paths.as_path(path).read_bytes())) as data:
        return {k: data[k] for k in data.files}


def write(
    path: str,
    index: np.ndarray,
    *,
    probs: np.ndarray | None = None,
    classes: np.ndarray | None = None,
) -> str:
    """Writes a selection file atomically; exactly one of ``probs`` / ``classes``."""
    if (probs is None) == (classes is None):
        raise ValueError('a selection file holds either probs (soft) or classes (hard)')
    arrays = {'index': np.asarray(index, np.int64)}
    if probs is not None:
        arrays['probs'] = np.asarray(probs, np.float32)
    else:
        arrays['classes'] = np.asarray(classes, np.int32)
    return write_npz(path, arrays)


@functools.lru_cache(maxsize=4)
def read(path: str) -> dict[str, np.ndarray]:
    """{'index', 'probs' or 'classes'} of a selection file."""
    arrays = read_npz(path)
    if 'index' not in arrays or ('probs' in arrays) == ('classes' in arrays):
        raise ValueError(f'{path}: not a selection file (index plus probs or classes)')
    return arrays


def count(config: Any) -> int:
    """Rows in the configured selection file (0 when there is none)."""
    path = cfg_get(config, 'pseudo_labels')
    return len(read(path)['index']) if path else 0


def batch_split(global_batch_size: int, ratio: int, process_count: int = 1) -> tuple[int, int]:
    """(labeled, pseudo-labeled) rows of a global batch: B / (1 + r) and r times that."""
    if ratio < 1 or global_batch_size % (1 + ratio):
        raise ValueError(
            f'a batch of {global_batch_size} does not split into labeled and pseudo-labeled rows '
            f'1:{ratio}: make batch_size a multiple of 1 + data.unlabeled_ratio = {1 + ratio}'
        )
    labeled = global_batch_size // (1 + ratio)
    if labeled % process_count:
        raise ValueError(
            f'the {labeled} labeled rows per step do not split over {process_count} processes: '
            f'make batch_size a multiple of {(1 + ratio) * process_count}'
        )
    return labeled, global_batch_size - labeled


def stream_seed(seed: int) -> int:
    from input_pipeline import order

    return order.mix64(seed, _STREAM_SALT)


def examples(config: Any, source: Any) -> Examples:
    """The selection as a split: example i is row i of the file, its image from
    ``data.unlabeled_split`` and its 'label' the teacher's target (float [K] or int)."""
    selection = read(cfg_get(config, 'pseudo_labels'))
    base = source.examples(cfg_get(config, 'unlabeled_split'))
    index = selection['index']
    if len(index) == 0:
        raise ValueError(f'{cfg_get(config, "pseudo_labels")}: the selection is empty')
    if index.min() < 0 or index.max() >= base.num_examples:
        raise ValueError(
            f'{cfg_get(config, "pseudo_labels")}: positions up to {index.max()}, but '
            f'{cfg_get(config, "unlabeled_split")!r} has {base.num_examples} examples: the file '
            'was written for another unlabeled split'
        )
    positions = tf.constant(index)
    targets = tf.constant(selection['probs'] if 'probs' in selection else selection['classes'])

    def read_rows(ids):
        return {'record': base.read(tf.gather(positions, ids)), 'target': tf.gather(targets, ids)}

    def load(record):
        return {**base.load(record['record']), 'label': record['target']}

    return dataclasses.replace(base, num_examples=len(index), read=read_rows, load=load)


def combine(labeled: dict, pseudo: dict, num_classes: int) -> dict:
    """One batch: the labeled rows, then the pseudo-labeled ones, with float targets and the
    per-row ``smooth`` flag."""
    lab = tf.one_hot(labeled['label'], num_classes, dtype=tf.float32)
    soft = pseudo['label'].dtype.is_floating
    unl = (
        tf.cast(pseudo['label'], tf.float32)
        if soft
        else tf.one_hot(pseudo['label'], num_classes, dtype=tf.float32)
    )
    smooth = tf.concat(
        [tf.ones(tf.shape(lab)[:1]), tf.fill(tf.shape(unl)[:1], 0.0 if soft else 1.0)], 0
    )
    out = {k: tf.concat([labeled[k], pseudo[k]], 0) for k in labeled if k != 'label'}
    return {**out, 'label': tf.concat([lab, unl], 0), 'smooth': smooth}
