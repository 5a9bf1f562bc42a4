"""Classification loss: softmax cross-entropy with label smoothing, always in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_targets(
    labels: jax.Array, num_classes: int, label_smoothing: float | jax.Array = 0.0
) -> jax.Array:
    """Targets ``(1 - eps) * onehot + eps / K`` (docs/reference.md §4); soft targets (MixUp,
    [B, K] float) are smoothed the same way. Integer labels [B] are one-hot encoded. ``eps``
    may be per row ([B, 1]: Noisy Student's teacher probabilities are not smoothed)."""
    if jnp.issubdtype(labels.dtype, jnp.integer):
        targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    else:
        targets = labels.astype(jnp.float32)
        if targets.shape[-1] != num_classes:
            raise ValueError(
                f'soft targets have {targets.shape[-1]} classes, expected {num_classes}'
            )
    if not isinstance(label_smoothing, (int, float)) or label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    return targets


def cross_entropy(
    logits: jax.Array, labels: jax.Array, label_smoothing: float | jax.Array = 0.0
) -> jax.Array:
    """Per-example softmax cross-entropy in float32, whatever the logits' dtype (bf16 losses
    drift late in training)."""
    logits = logits.astype(jnp.float32)
    targets = smooth_targets(labels, logits.shape[-1], label_smoothing)
    return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
