"""Exact evaluation metrics: masked sums that add up across batches, devices and processes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from training.losses import cross_entropy


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1 where the label is among the k largest logits. The rank is the number of classes with
    a strictly larger logit, so ties count in the label's favour, deterministically."""
    logits = logits.astype(jnp.float32)
    label_logit = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)
    rank = jnp.sum(logits > label_logit, axis=-1)
    return (rank < k).astype(jnp.int32)


def eval_sums(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Sums over the examples where ``mask`` is true: loss (float32, no smoothing), top-1 and
    top-5 hits (int32) and the count. Padding rows (mask false) contribute nothing."""
    if labels.ndim == 2:  # soft targets: score against the arg-max class
        labels = jnp.argmax(labels, axis=-1)
    m = jnp.ones(labels.shape, jnp.int32) if mask is None else mask.astype(jnp.int32)
    k5 = min(5, logits.shape[-1])
    return {
        'loss_sum': jnp.sum(cross_entropy(logits, labels) * m),
        'top1': jnp.sum(topk_correct(logits, labels, 1) * m),
        'top5': jnp.sum(topk_correct(logits, labels, k5) * m),
        'count': jnp.sum(m),
    }


class EvalAccumulator:
    """Host-side totals over an eval pass (int64 counts, float64 loss)."""

    def __init__(self) -> None:
        self.totals: dict[str, float | int] = {}

    def add(self, sums: dict[str, jax.Array]) -> None:
        for k, v in jax.device_get(sums).items():
            v = np.asarray(v)
            v = int(v) if np.issubdtype(v.dtype, np.integer) else float(v)
            self.totals[k] = self.totals.get(k, 0) + v

    def result(self) -> dict[str, float]:
        n = self.totals.get('count', 0)
        if n == 0:
            raise ValueError('the evaluation saw no examples (every mask was false)')
        return {
            'loss': self.totals['loss_sum'] / n,
            'top1': self.totals['top1'] / n,
            'top5': self.totals['top5'] / n,
            'count': n,
        }
