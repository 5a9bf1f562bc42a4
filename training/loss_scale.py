"""Dynamic loss scaling for float16 compute (GPUs without bfloat16).

float16 has 5 exponent bits: small activation gradients underflow to zero in the backward pass.
The loss is multiplied by a scale S before differentiation and the gradients divided by S
after, in float32. The standard dynamic rule (tf.keras.mixed_precision.LossScaleOptimizer,
jmp.DynamicLossScale):

- S starts at 2**15;
- a step whose gradients hold an inf or NaN is skipped (parameters, optimizer state, EMA and
  BatchNorm statistics stay as they were) and S is halved;
- after ``growth_interval`` (2000) finite steps in a row S is doubled and the count restarts.

flax's ``DynamicScale`` does the arithmetic; its counter compares *before* counting the current
step (it grows on the step that finds ``fin_steps == growth_interval``, one step late), so it is
built with ``growth_interval - 1`` to double after exactly ``growth_interval`` finite steps, as
Keras does (tests/test_loss_scale.py compares the two step by step). The scale and the counter
are arrays in the train state, so they are checkpointed and a resumed run continues them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax.training.dynamic_scale import DynamicScale

MODES = ('none', 'dynamic')


def create(initial_scale: float = 2.0**15, growth_interval: int = 2000) -> DynamicScale:
    """The loss-scale state at step 0 (a pytree of two scalars: the count and the scale)."""
    return DynamicScale(
        growth_factor=2.0,
        backoff_factor=0.5,
        growth_interval=int(growth_interval) - 1,  # see the module docstring
        fin_steps=jnp.zeros([], jnp.int32),
        scale=jnp.asarray(initial_scale, jnp.float32),
        minimum_scale=1.0,  # as Keras and jmp: never below 1
    )


def from_config(config: Any) -> DynamicScale | None:
    """``config.loss_scale`` -> the initial loss-scale state, or None when scaling is off."""
    c = config.get('loss_scale')
    if c is None or c.mode == 'none':
        return None
    return create(c.initial_scale, c.growth_interval)


def config_problems(config: Any) -> list[str]:
    """What is wrong with ``config.loss_scale`` (one line each, naming the fix)."""
    c = config.get('loss_scale')
    if c is None:
        return []
    errors = []
    if c.mode not in MODES:
        errors.append(f'config.loss_scale.mode must be one of {MODES}, got {c.mode!r}')
    if not c.initial_scale >= 1.0:
        errors.append(f'config.loss_scale.initial_scale must be >= 1, got {c.initial_scale}')
    if not (isinstance(c.growth_interval, int) and c.growth_interval >= 1):
        errors.append(
            f'config.loss_scale.growth_interval must be a positive integer, got '
            f'{c.growth_interval!r}'
        )
    return errors


def select(finite: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where the step's gradients were finite, else ``old`` (the skipped step)."""
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
