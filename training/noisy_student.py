"""Noisy Student (Xie et al. 2020): the teacher's predictions over an unlabeled split, the
official confidence filter with class balancing, and the config checks of a student run.

``scripts/noisy_student.py`` drives the iterations (teacher → predict → select → student →
the student is the next teacher); the student's batches come from
``input_pipeline/pseudo_labels.py``.

The selection rule is the official ``filter_unlabel.py``'s (google-research/noisystudent):
every image gets the teacher's argmax class and its probability (the confidence); per class,
the threshold is the highest of 0.00, 0.01, ..., 1.00 (not below ``min_threshold``) at which
the class still has ``images_per_class`` images, or ``min_threshold`` when it has fewer; every
image of the class at or above it is kept ``images_per_class / total`` times on average:
⌊that⌋ copies, plus one more with the probability of its fractional part. So a class with too
many images is down-sampled at random and one with too few is duplicated. ``images_per_class``
0 keeps every image at or above ``min_threshold`` once.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from efficientnet import paths
from input_pipeline import pseudo_labels

# The official thresholds: 0.00, 0.01, ..., 1.00.
THRESHOLDS = np.arange(101) / 100.0


def select(
    classes: np.ndarray,
    confidence: np.ndarray,
    *,
    num_classes: int,
    min_threshold: float,
    images_per_class: int,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Positions kept (repeated for duplicates, grouped by class) and per-class statistics."""
    rng = np.random.default_rng(seed)
    kept, stats = [], {}
    grid = np.union1d(THRESHOLDS[THRESHOLDS >= min_threshold], [min_threshold])[::-1]
    for c in range(num_classes):
        idx = np.flatnonzero(classes == c)
        p = confidence[idx]
        threshold = min_threshold
        if images_per_class > 0:
            for t in grid:  # highest first
                if np.count_nonzero(p >= t) >= images_per_class:
                    threshold = t
                    break
        chosen = idx[p >= threshold]
        if images_per_class > 0 and len(chosen):
            copies = images_per_class / len(chosen)
            whole = int(copies)
            n = whole + (rng.random(len(chosen)) < copies - whole).astype(np.int64)
        else:
            n = np.ones(len(chosen), np.int64)
        kept.append(np.repeat(chosen, n))
        stats[str(c)] = {
            'predicted': int(len(idx)),
            'threshold': float(threshold),
            'above_threshold': int(len(chosen)),
            'selected': int(n.sum()),
        }
    return np.concatenate(kept) if kept else np.zeros([0], np.int64), stats


# ----------------------------------------------------------------------------- predictions


def shard_path(directory: str, process_index: int, process_count: int) -> str:
    return os.path.join(directory, f'shard-{process_index:05d}-of-{process_count:05d}.npz')


def predict_shard(
    teacher: Any,
    data_config: Any,
    *,
    temperature: float,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> dict[str, np.ndarray]:
    """The teacher (an ``inference.loading.LoadedModel``, evaluation mode) over this process's
    contiguous part of ``data_config.eval_split``, preprocessed for evaluation at the teacher's
    own size: {'index' (positions in the split), 'classes', 'confidence', 'probs' =
    softmax(logits / temperature)}."""
    import jax

    import input_pipeline
    from input_pipeline.sources.base import shard_bounds

    n = input_pipeline.dataset_info(data_config)['num_eval']
    lo, hi = shard_bounds(n, process_index, process_count)
    logits = []
    for batch in input_pipeline.create_eval_iterator(
        data_config,
        global_batch_size=batch_size * process_count,
        process_index=process_index,
        process_count=process_count,
    ):
        out = teacher.logits(batch['image'])
        logits.append(out[batch['mask']])
    logits = np.concatenate(logits).astype(np.float32) if logits else np.zeros([0, 1], np.float32)
    if len(logits) != hi - lo:
        raise RuntimeError(f'predicted {len(logits)} examples, expected {hi - lo}')
    probs = np.asarray(jax.nn.softmax(logits / temperature, axis=-1), np.float32)
    classes = probs.argmax(-1).astype(np.int32)
    return {
        'index': np.arange(lo, hi, dtype=np.int64),
        'classes': classes,
        'confidence': probs[np.arange(len(probs)), classes],
        'probs': probs,
    }


def gather_shards(
    directory: str, process_count: int, *, poll_s: float = 5.0, timeout_s: float | None = None
) -> dict[str, np.ndarray]:
    """Every process's predictions, in split order, waiting for shards still being written."""
    files = [shard_path(directory, i, process_count) for i in range(process_count)]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not all(paths.as_path(f).exists() for f in files):
        if deadline is not None and time.monotonic() > deadline:
            missing = [f for f in files if not paths.as_path(f).exists()]
            raise TimeoutError(f'predictions not written: {missing}')
        time.sleep(poll_s)
    shards = [pseudo_labels.read_npz(f) for f in files]
    return {k: np.concatenate([s[k] for s in shards]) for k in shards[0]}


def wait_for(path: str, poll_s: float = 5.0) -> None:
    while not paths.as_path(path).exists():
        time.sleep(poll_s)


# ----------------------------------------------------------------------------- checks


def config_problems(config: Any) -> list[str]:
    """What is wrong with a student run's pseudo-label fields (``config.data``), one line
    each; the file itself is read by the pipeline."""
    d = config.data
    if not d.get('pseudo_labels'):
        return []
    errors = []
    if not d.get('unlabeled_split'):
        errors.append(
            'config.data.pseudo_labels is set but config.data.unlabeled_split is not: name the '
            'split the selection file indexes (e.g. train[10%:])'
        )
    ratio = d.get('unlabeled_ratio')
    if not isinstance(ratio, int) or isinstance(ratio, bool) or ratio < 1:
        errors.append(f'config.data.unlabeled_ratio must be an integer >= 1, got {ratio!r}')
    elif config.batch_size % ((1 + ratio) * config.optim.grad_accum_steps):
        errors.append(
            f'config.batch_size={config.batch_size} does not split into labeled and '
            f'pseudo-labeled rows 1:{ratio} at every step: make it a multiple of '
            f'(1 + data.unlabeled_ratio) x optim.grad_accum_steps = '
            f'{(1 + ratio) * config.optim.grad_accum_steps}'
        )
    if d.mixup_alpha > 0 or d.cutmix_alpha > 0:
        errors.append(
            'MixUp/CutMix with pseudo-labels is not supported (the official Noisy Student '
            'recipe has none): set config.data.mixup_alpha and cutmix_alpha to 0'
        )
    if not paths.as_path(d.pseudo_labels).exists():
        errors.append(f'config.data.pseudo_labels={d.pseudo_labels}: no such file')
    return errors


def driver_problems(config: Any) -> list[str]:
    """What is wrong with ``config.noisy_student`` (the driver's own settings)."""
    ns = config.get('noisy_student')
    if ns is None:
        return ['the config has no noisy_student section (configs/base.py defines it)']
    errors = []
    if not isinstance(ns.iterations, int) or ns.iterations < 1:
        errors.append(f'config.noisy_student.iterations must be >= 1, got {ns.iterations!r}')
    if not 0.0 <= ns.min_threshold <= 1.0:
        errors.append(
            f'config.noisy_student.min_threshold must be in [0, 1], got {ns.min_threshold}'
        )
    if ns.images_per_class < 0:
        errors.append(
            f'config.noisy_student.images_per_class must be >= 0 (0: keep all above the '
            f'threshold), got {ns.images_per_class}'
        )
    if not ns.temperature > 0:
        errors.append(f'config.noisy_student.temperature must be > 0, got {ns.temperature}')
    if not ns.labeled_split or not ns.unlabeled_split:
        errors.append('config.noisy_student.labeled_split and unlabeled_split must be set')
    if len(ns.students) not in (0, 1, ns.iterations):
        errors.append(
            f'config.noisy_student.students has {len(ns.students)} entries: give one per '
            f'iteration ({ns.iterations}), one for all, or none'
        )
    return errors
