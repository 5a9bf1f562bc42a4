"""The official optimizer (docs/reference.md §4): TF1 RMSProp, warmup + staircase (or cosine)
schedule, L2 weight decay in the loss (BatchNorm excluded) or decoupled, clipping,
accumulation."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]


def create_learning_rate_schedule(
    base_lr: float,
    *,
    kind: str = 'exponential',
    warmup_steps: int = 0,
    total_steps: int = 1,
    decay_steps: int = 1,
    decay_factor: float = 0.97,
    min_lr: float = 0.0,
) -> Schedule:
    """Learning rate per optimizer update.

    'exponential' is the official staircase: ``base * factor ** floor(step / decay_steps)``
    counted from step 0 (so warmup does not delay the decay), replaced by the linear warmup
    ``base * step / warmup`` while ``step < warmup``. 'cosine' is ``0.5 base (1 + cos(pi t/T))``
    with the same warmup; 'constant' only warms up. ``min_lr`` floors the decayed value.
    """
    if kind not in ('exponential', 'cosine', 'constant'):
        raise ValueError(f'unknown schedule {kind!r}; expected exponential, cosine or constant')
    decay_steps = max(int(decay_steps), 1)
    total_steps = max(int(total_steps), 1)

    def schedule(step: jax.Array) -> jax.Array:
        t = jnp.asarray(step, jnp.float32)
        if kind == 'exponential':
            lr = base_lr * decay_factor ** jnp.floor(t / decay_steps)
        elif kind == 'cosine':
            lr = (
                0.5 * base_lr * (1.0 + jnp.cos(math.pi * jnp.minimum(t, total_steps) / total_steps))
            )
        else:
            lr = jnp.full_like(t, base_lr)
        lr = jnp.maximum(lr, min_lr)
        if warmup_steps > 0:
            lr = jnp.where(t < warmup_steps, base_lr * t / warmup_steps, lr)
        return lr

    return schedule


class TF1RMSPropState(NamedTuple):
    count: jax.Array  # optimizer updates applied so far
    ms: Any  # mean square of the gradients, starts at 1.0
    mom: Any  # momentum buffer, already scaled by the learning rate


def tf1_rmsprop(
    learning_rate: float | Schedule,
    decay: float = 0.9,
    momentum: float = 0.9,
    eps: float = 1e-3,
    initial_ms: float = 1.0,
) -> optax.GradientTransformation:
    """RMSProp exactly as ``tf.compat.v1.train.RMSPropOptimizer`` (non-centred)::

        ms  = decay * ms + (1 - decay) * g**2          # ms starts at 1.0, not 0
        mom = momentum * mom + lr * g / sqrt(ms + eps)  # eps inside the sqrt, lr inside mom
        w  -= mom

    optax.rmsprop differs on all three counts (eps outside, nu from 0, lr outside the trace),
    which changes the dynamics whenever the learning rate moves.
    The update is the final one (learning rate included): chain nothing that rescales it.
    """
    lr_fn = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init(params):
        return TF1RMSPropState(
            count=jnp.zeros([], jnp.int32),
            ms=jax.tree.map(lambda p: jnp.full(p.shape, initial_ms, jnp.float32), params),
            mom=jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
        )

    def update(grads, state, params=None):
        del params
        lr = lr_fn(state.count)
        ms = jax.tree.map(lambda s, g: decay * s + (1.0 - decay) * jnp.square(g), state.ms, grads)
        mom = jax.tree.map(
            lambda m, g, s: momentum * m + lr * g * jax.lax.rsqrt(s + eps), state.mom, grads, ms
        )
        updates = jax.tree.map(lambda m, g: (-m).astype(g.dtype), mom, grads)
        return updates, TF1RMSPropState(count=state.count + 1, ms=ms, mom=mom)

    return optax.GradientTransformation(init, update)


class DecoupledDecayState(NamedTuple):
    count: jax.Array


def decoupled_weight_decay(
    learning_rate: float | Schedule, rate: float, mask: Any = None
) -> optax.GradientTransformation:
    """Adds ``-lr * rate * w`` to the update (AdamW-style decay, scaled by the schedule)."""
    lr_fn = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init(params):
        del params
        return DecoupledDecayState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params):
        if params is None:
            raise ValueError('decoupled weight decay needs the params')
        lr = lr_fn(state.count)
        m = mask if mask is not None else jax.tree.map(lambda _: True, params)
        updates = jax.tree.map(
            lambda u, p, keep: u - lr * rate * p if keep else u, updates, params, m
        )
        return updates, DecoupledDecayState(count=state.count + 1)

    return optax.GradientTransformation(init, update)


def weight_decay_mask(params: Any, batch_stats: Any) -> Any:
    """True for every trainable leaf that weight decay covers: all but BatchNorm's scale/bias.

    A BatchNorm is recognised structurally, as a module that also owns 'batch_stats'
    (moving mean/var), not by its name; conv kernels, SE biases and the dense head are covered.
    """
    bn_modules = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(batch_stats)[0]:
        bn_modules.add(tuple(_key(k) for k in path[:-1]))

    def keep(path, _):
        return tuple(_key(k) for k in path[:-1]) not in bn_modules

    return jax.tree_util.tree_map_with_path(keep, params)


def _key(k: Any) -> str:
    return str(getattr(k, 'key', getattr(k, 'name', k)))


def l2_penalty(params: Any, mask: Any) -> jax.Array:
    """``sum(w**2) / 2`` over the masked leaves, in float32 (tf.nn.l2_loss summed)."""
    leaves = [
        jnp.sum(jnp.square(p.astype(jnp.float32)))
        for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))
        if m
    ]
    return 0.5 * sum(leaves) if leaves else jnp.zeros([], jnp.float32)


def create_optimizer(
    opt_config: Any,
    schedule: Schedule,
    decay_mask: Any = None,
) -> optax.GradientTransformation:
    """The optimizer from ``config.optim``.

    Chain: [clip by global norm] -> RMSProp (or SGD momentum / AdamW) -> [decoupled decay],
    wrapped in optax.MultiSteps when ``grad_accum_steps > 1`` (the schedule then counts real
    updates, since MultiSteps only calls the inner chain every k micro-steps). L2 decay in the
    loss ('l2' mode) is added by the train step, not here.
    """
    c = opt_config
    parts = []
    if c.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(c.grad_clip_norm))
    if c.name == 'rmsprop':
        parts.append(
            tf1_rmsprop(schedule, decay=c.rmsprop_decay, momentum=c.momentum, eps=c.rmsprop_epsilon)
        )
    elif c.name == 'momentum':
        parts.append(optax.sgd(schedule, momentum=c.momentum, nesterov=True))
    elif c.name == 'adamw':
        parts.append(optax.adam(schedule))
    else:
        raise ValueError(f'unknown optimizer {c.name!r}; expected rmsprop, momentum or adamw')
    if c.weight_decay_mode == 'decoupled' and c.weight_decay:
        parts.append(decoupled_weight_decay(schedule, c.weight_decay, decay_mask))
    tx = optax.chain(*parts) if len(parts) > 1 else parts[0]
    if c.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=c.grad_accum_steps)
    return tx
