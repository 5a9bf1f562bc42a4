"""Exponential moving average of the weights and BatchNorm statistics (docs/reference.md §4)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def ema_decay(num_updates: jax.Array, decay: float) -> jax.Array:
    """``min(decay, (1 + t) / (10 + t))``, as tf.train.ExponentialMovingAverage with
    ``num_updates``: the official code applies the EMA after the optimizer has incremented the
    global step, so ``t`` is the number of updates done *including* the current one."""
    t = jnp.asarray(num_updates, jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def update_ema(ema: Any, new: Any, num_updates: jax.Array, decay: float) -> Any:
    """``ema <- d * ema + (1 - d) * new`` for every leaf, with the warmup decay ``d``."""
    d = ema_decay(num_updates, decay)
    return jax.tree.map(lambda e, x: (d * e + (1.0 - d) * x).astype(e.dtype), ema, new)
