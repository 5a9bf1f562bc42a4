"""The jitted train and eval steps.

The step bodies are plain single-device code: the batch arrives as a global array split over
the mesh, and XLA partitions the computation (BatchNorm means and gradient sums become
cross-device reductions). No pmap, no axis names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from efficientnet.normalization import normalize_images
from training import ema as ema_lib
from training import metrics as metrics_lib
from training import optim, sharding
from training.losses import cross_entropy
from training.state import TrainState


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optim.Schedule,
    *,
    mesh: Mesh,
    state_shardings: Any,
    seed: int,
    label_smoothing: float = 0.0,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    ema_decay: float = 0.0,
    grad_accum_steps: int = 1,
    normalization: str = 'imagenet',
    compute_dtype: Any = jnp.float32,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns ``train_step(state, batch) -> (state, metrics)``, jitted with the state donated.

    ``weight_decay`` here is the L2 term in the loss (official mode): ``wd * sum(w**2) / 2``
    over ``weight_decay_mask``. Dropout and stochastic depth draw from
    ``fold_in(key(seed), step)``, so a resumed run draws the same numbers. With
    ``grad_accum_steps = k`` the optimizer (optax.MultiSteps) and the EMA move every k-th call.
    """
    base_key = jax.random.key(seed)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(base_key, state.step)
        images = normalize_images(batch['image'], normalization, compute_dtype)
        labels = batch['label']

        def loss_fn(params):
            logits, new_vars = model.apply(
                {'params': params, 'batch_stats': state.batch_stats},
                images,
                train=True,
                rngs={'dropout': rng},
                mutable=['batch_stats'],
            )
            data_loss = jnp.mean(cross_entropy(logits, labels, label_smoothing))
            l2 = optim.l2_penalty(params, weight_decay_mask) if weight_decay else 0.0
            total = data_loss + weight_decay * l2
            return total, (data_loss, logits, new_vars['batch_stats'])

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (total, (data_loss, logits, batch_stats)), grads = grad_fn(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        opt_steps = (state.step + 1) // grad_accum_steps  # updates done after this call
        if ema_decay:
            new_ema_p = ema_lib.update_ema(state.ema_params, params, opt_steps, ema_decay)
            new_ema_bs = ema_lib.update_ema(
                state.ema_batch_stats, batch_stats, opt_steps, ema_decay
            )
            if grad_accum_steps > 1:
                boundary = (state.step + 1) % grad_accum_steps == 0
                pick = lambda new, old: jax.tree.map(
                    lambda a, b: jnp.where(boundary, a, b), new, old
                )
                new_ema_p = pick(new_ema_p, state.ema_params)
                new_ema_bs = pick(new_ema_bs, state.ema_batch_stats)
        else:  # no averaging: the "EMA" follows the weights
            new_ema_p = jax.tree.map(jnp.copy, params)
            new_ema_bs = jax.tree.map(jnp.copy, batch_stats)

        int_labels = labels if labels.ndim == 1 else jnp.argmax(labels, axis=-1)
        metrics = {
            'loss': data_loss,
            'total_loss': total,
            'top1': jnp.mean(metrics_lib.topk_correct(logits, int_labels, 1).astype(jnp.float32)),
            'grad_norm': optax.global_norm(grads),
            'learning_rate': schedule(state.step // grad_accum_steps),
        }
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            ema_params=new_ema_p,
            ema_batch_stats=new_ema_bs,
        )
        return new_state, metrics

    batch_s = sharding.batch_sharding(mesh)
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_s),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def make_eval_step(
    model: nn.Module,
    *,
    mesh: Mesh,
    state_shardings: Any,
    normalization: str = 'imagenet',
    compute_dtype: Any = jnp.float32,
) -> Callable[[TrainState, dict], dict]:
    """Returns ``eval_step(state, batch) -> {'raw': sums, 'ema': sums}`` (masked sums, see
    metrics.eval_sums): one pass over the data scores both the raw and the EMA weights."""

    def eval_step(state: TrainState, batch: dict) -> dict:
        images = normalize_images(batch['image'], normalization, compute_dtype)
        mask = batch.get('mask')
        out = {}
        for name, params, stats in (
            ('raw', state.params, state.batch_stats),
            ('ema', state.ema_params, state.ema_batch_stats),
        ):
            logits = model.apply({'params': params, 'batch_stats': stats}, images, train=False)
            out[name] = metrics_lib.eval_sums(logits, batch['label'], mask)
        return out

    return jax.jit(
        eval_step,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )
