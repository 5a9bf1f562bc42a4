"""Magnitude pruning as tensorflow-model-optimization (tfmot) does it.

Schedule (tfmot ``pruning_schedule.PolynomialDecay``)::

    p        = clip((step - begin_step) / (end_step - begin_step), 0, 1)
    sparsity = final + (initial - final) * (1 - p) ** power          # power 3

and the masks are recomputed only on the steps where ``begin_step <= step <= end_step`` and
``(step - begin_step) % frequency == 0``. Masks (tfmot ``pruning_impl._update_mask``): per
tensor, keep the ``k = max(round(size * (1 - sparsity)), 1)`` weights of largest magnitude
(ties at the threshold kept), zero the rest; a stage's repeated blocks, stacked in the train
state (``scan_blocks``), each keep their own. Prunable: the kernels of convolutions (regular,
depthwise, squeeze-excite) and of the dense head; never biases or BatchNorm.

``step`` counts optimizer updates done before the current one, as tfmot's ``pruning_step``.
The masks live in the train state (so they are checkpointed) as a sub-tree of ``params``
holding only the prunable kernels (bool). The train step recomputes them on schedule from the
weights before the update and multiplies them into the weights and into their EMA after every
update, so the EMA weights that evaluation and export use are exactly as sparse.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from efficientnet.model import stacked_range


@dataclasses.dataclass(frozen=True)
class PolynomialDecay:
    """tfmot's PolynomialDecay schedule (same arguments, same validation)."""

    initial_sparsity: float
    final_sparsity: float
    begin_step: int
    end_step: int
    power: float = 3.0
    frequency: int = 100

    def problems(self, prefix: str = 'config.pruning') -> list[str]:
        errors = []
        for name in ('initial_sparsity', 'final_sparsity'):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                errors.append(f'{prefix}.{name} must be in [0, 1), got {v}')
        if not (isinstance(self.begin_step, int) and self.begin_step >= 0):
            errors.append(f'{prefix}.begin_step must be an integer >= 0, got {self.begin_step!r}')
        if not (isinstance(self.end_step, int) and self.end_step >= self.begin_step):
            errors.append(
                f'{prefix}.end_step must be an integer >= begin_step ({self.begin_step}), got '
                f'{self.end_step!r}'
            )
        if not (isinstance(self.frequency, int) and self.frequency >= 1):
            errors.append(f'{prefix}.frequency must be a positive integer, got {self.frequency!r}')
        return errors

    def sparsity(self, step: jax.Array) -> jax.Array:
        """The target sparsity at ``step`` (float32, as tfmot computes it)."""
        step = jnp.asarray(step, jnp.float32)
        span = max(self.end_step - self.begin_step, 1)  # tfmot: end == begin jumps to final
        p = jnp.clip((step - self.begin_step) / span, 0.0, 1.0)
        if self.end_step == self.begin_step:
            p = jnp.where(step >= self.begin_step, 1.0, 0.0)
        return (
            self.final_sparsity
            + (self.initial_sparsity - self.final_sparsity) * (1.0 - p) ** self.power
        )

    def should_update(self, step: jax.Array) -> jax.Array:
        """True on the steps where the masks are recomputed."""
        step = jnp.asarray(step, jnp.int32)
        return (
            (step >= self.begin_step)
            & (step <= self.end_step)
            & ((step - self.begin_step) % self.frequency == 0)
        )


def from_config(config: Any) -> PolynomialDecay | None:
    """``config.pruning`` -> the schedule, or None when pruning is off."""
    c = config.get('pruning')
    if c is None or not c.enabled:
        return None
    return PolynomialDecay(
        initial_sparsity=c.initial_sparsity,
        final_sparsity=c.final_sparsity,
        begin_step=c.begin_step,
        end_step=c.end_step,
        power=c.power,
        frequency=c.frequency,
    )


def config_problems(config: Any) -> list[str]:
    schedule = from_config(config)
    return [] if schedule is None else schedule.problems()


def is_prunable(path: tuple[str, ...], x: Any) -> bool:
    """Conv and dense kernels (rank >= 2, named 'kernel'); not biases, not BatchNorm."""
    return path[-1] == 'kernel' and len(x.shape) >= 2


def init_masks(params: Any) -> dict:
    """All-true masks for every prunable kernel: a nested dict, a sub-tree of ``params``."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {k: jnp.ones(v.shape, jnp.bool_) for k, v in flat.items() if is_prunable(k, v)}
    )


def topk_mask(w: jax.Array, sparsity: jax.Array) -> jax.Array:
    """Keeps the ``max(round(n * (1 - sparsity)), 1)`` largest |w| (ties at the threshold kept).

    ``round`` is round-half-to-even and ``n * (1 - sparsity)`` is computed in float32, as
    tf.round in tfmot."""
    a = jnp.abs(w.astype(jnp.float32)).reshape(-1)
    n = a.shape[0]
    k = jnp.round(jnp.float32(n) * (1.0 - jnp.asarray(sparsity, jnp.float32)))
    k = jnp.clip(k.astype(jnp.int32), 1, n)
    threshold = jnp.sort(a)[n - k]  # the k-th largest
    return jnp.abs(w.astype(jnp.float32)) >= threshold


def update_masks(params: Any, masks: dict, sparsity: jax.Array) -> dict:
    """New masks from the magnitudes of ``params`` at ``sparsity``."""
    flat_p = traverse_util.flatten_dict(params)
    flat_m = traverse_util.flatten_dict(masks)

    def mask(k):
        if any(stacked_range(part) is not None for part in k):  # one kernel per block
            return jax.vmap(topk_mask, in_axes=(0, None))(flat_p[k], sparsity)
        return topk_mask(flat_p[k], sparsity)

    return traverse_util.unflatten_dict({k: mask(k) for k in flat_m})


def apply_masks(params: Any, masks: dict) -> Any:
    """``params`` with every masked kernel multiplied by its mask."""
    flat_m = traverse_util.flatten_dict(masks)
    flat_p = traverse_util.flatten_dict(params)
    out = {
        k: (jnp.where(flat_m[k], v, jnp.zeros((), v.dtype)) if k in flat_m else v)
        for k, v in flat_p.items()
    }
    return traverse_util.unflatten_dict(out)


def step_masks(
    schedule: PolynomialDecay, masks: dict, params: Any, opt_step: jax.Array, boundary: Any = True
) -> dict:
    """The masks for this step: recomputed from ``params`` (the weights before the update)
    when the schedule says so at ``opt_step`` (and ``boundary``: the call that updates the
    optimizer under gradient accumulation), else unchanged. Sorting every kernel is not free,
    so it runs under ``lax.cond``."""
    update = schedule.should_update(opt_step) & jnp.asarray(boundary)
    return jax.lax.cond(
        update,
        lambda: update_masks(params, masks, schedule.sparsity(opt_step)),
        lambda: masks,
    )


def sparsity_of(params: Any, masks: dict) -> dict[str, float]:
    """Fraction of exact zeros per masked kernel and overall (host numbers, for reports)."""
    import numpy as np

    flat_m = traverse_util.flatten_dict(masks)
    flat_p = traverse_util.flatten_dict(params)
    out, zeros, total = {}, 0, 0
    for k in flat_m:
        w = np.asarray(flat_p[k])
        z = int(np.sum(w == 0))
        out['/'.join(k)] = z / w.size
        zeros, total = zeros + z, total + w.size
    out['overall'] = zeros / max(total, 1)
    return out
