"""DropBlock (Ghiasi, Lin and Le, NeurIPS 2018), as the official TensorFlow ResNet code has it.

During training, drops contiguous ``b x b`` squares of each feature map (each channel of each
example on its own) instead of independent activations, and rescales the rest:

1. seed drop rate ``gamma = (1 - keep_prob) * H * W / b**2 / ((H - b + 1) * (W - b + 1))``
   with ``b = min(block_size, H, W)``, so that about ``1 - keep_prob`` of the map is dropped;
2. Bernoulli seeds over the whole [N, H, W, C] tensor, only where a full block fits (seeds
   whose block would cross the border are never drawn);
3. each seed grows into a b x b block: a min-pool of the keep mask (window b, stride 1,
   TensorFlow SAME padding); when b covers the whole map, the whole channel is dropped;
4. ``out = x * mask / mean(mask)``: renormalised by the kept fraction of the whole tensor.

At evaluation (or with ``keep_prob`` None or 1) it is the identity. The official schedule lowers
``keep_prob`` linearly from 1 at step 0 to its final value at the last step
(``scheduled_keep_prob``), and scales the drop rate down by 4 per group before the last
(``stage_keep_prob``). EfficientNet's official code has no DropBlock; this project puts it on
the outputs of the blocks of chosen stages (by default the last two), see ``EfficientNet``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def keep_mask(noise: jax.Array, keep_prob: jax.Array, block_size: int) -> jax.Array:
    """The float32 keep mask (1 kept, 0 dropped) for uniform ``noise`` in [0, 1) of the
    feature map's [N, H, W, C] shape: a pure function of the noise, so tests can replay it."""
    _, h, w, _ = noise.shape
    b = min(block_size, h, w)
    keep_prob = jnp.asarray(keep_prob, jnp.float32)
    gamma = (1.0 - keep_prob) * (h * w) / (b * b) / ((h - b + 1) * (w - b + 1))
    # Seeds only where the whole block lies inside the map (centres as SAME pooling places them).
    rows = jnp.arange(h)
    cols = jnp.arange(w)
    valid_r = (rows >= b // 2) & (rows < h - (b - 1) // 2)
    valid_c = (cols >= b // 2) & (cols < w - (b - 1) // 2)
    valid = (valid_r[:, None] & valid_c[None, :])[None, :, :, None].astype(jnp.float32)
    pattern = ((1.0 - valid + (1.0 - gamma) + noise) >= 1.0).astype(jnp.float32)
    if b == h and b == w:
        return jnp.min(pattern, axis=(1, 2), keepdims=True) * jnp.ones_like(pattern)
    return -lax.reduce_window(-pattern, -jnp.inf, lax.max, (1, b, b, 1), (1, 1, 1, 1), 'SAME')


def dropblock(x: jax.Array, keep_prob: jax.Array, block_size: int, rng: jax.Array) -> jax.Array:
    """DropBlock on NHWC ``x`` with a (possibly traced) ``keep_prob``; the module docstring has
    the algorithm. ``keep_prob = 1`` gives back ``x`` (no seeds are drawn)."""
    noise = jax.random.uniform(rng, x.shape, jnp.float32)
    mask = keep_mask(noise, keep_prob, block_size)
    kept = jnp.maximum(jnp.mean(mask), 1e-6)  # the kept fraction of the whole batch tensor
    return (x.astype(jnp.float32) * (mask / kept)).astype(x.dtype)


def scheduled_keep_prob(step: jax.Array, total_steps: int, final_keep_prob: float) -> jax.Array:
    """Linear from 1.0 at step 0 to ``final_keep_prob`` at ``total_steps`` (then constant)."""
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 1.0)
    return 1.0 - (1.0 - final_keep_prob) * frac


def stage_keep_prob(keep_prob: Any, stage: int, num_stages: int) -> Any:
    """The keep probability of ``stage`` (0-based) of ``num_stages``: the official ResNet code's
    per-group rule ``1 - (1 - keep_prob) / 4 ** (last - group)``, counted from the network's
    last stage, which gets the full drop rate; the stage before it a quarter, and so on."""
    return 1.0 - (1.0 - keep_prob) / 4.0 ** (num_stages - 1 - stage)


def resolve_stages(stages: tuple[int, ...] | list[int], num_stages: int) -> frozenset[int]:
    """Stage indices (0-based; negative count from the end, -1 the last) -> a set in range;
    ValueError naming a stage out of range."""
    out = set()
    for s in stages:
        if not -num_stages <= s < num_stages:
            raise ValueError(
                f'DropBlock stage {s} does not exist: the model has {num_stages} stages '
                f'(0..{num_stages - 1}, or -1 for the last)'
            )
        out.add(s % num_stages)
    return frozenset(out)
