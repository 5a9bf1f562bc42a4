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

from efficientnet import dropblock as dropblock_lib
from efficientnet.normalization import normalize_images
from training import distill as distill_lib
from training import ema as ema_lib
from training import loss_scale as loss_scale_lib
from training import metrics as metrics_lib
from training import optim, sharding
from training import pruning as pruning_lib
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
    pruning: pruning_lib.PolynomialDecay | None = None,
    teacher: distill_lib.Teacher | None = None,
    teacher_variables: Any = None,
    dropblock_keep_prob: float = 1.0,
    total_steps: int = 1,
    data_loss_weight: float = 1.0,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns ``train_step(state, batch) -> (state, metrics)``, jitted with the state donated.

    ``weight_decay`` here is the L2 term in the loss (official mode): ``wd * sum(w**2) / 2``
    over ``weight_decay_mask``. Dropout and stochastic depth draw from
    ``fold_in(key(seed), step)``, so a resumed run draws the same numbers. With
    ``grad_accum_steps = k`` the optimizer (optax.MultiSteps) and the EMA move every k-th call.

    Techniques (each off unless given; see their modules): a ``state.loss_scale`` scales the
    loss and skips steps with non-finite gradients (training/loss_scale.py); ``pruning``
    keeps ``state.prune_masks`` on its schedule and masks the weights after each update
    (training/pruning.py); ``teacher`` with its ``teacher_variables`` (on the device, in the
    shardings the caller chose) adds the distillation term (training/distill.py);
    ``dropblock_keep_prob < 1`` passes the model DropBlock's keep probability, falling linearly
    from 1 to it over ``total_steps`` updates (efficientnet/dropblock.py). A batch with
    ``smooth`` [B] (Noisy Student's pseudo-labeled batches, input_pipeline/pseudo_labels.py)
    smooths only the rows flagged 1, and ``data_loss_weight`` (1 + the unlabeled ratio there)
    multiplies the mean over the batch, which makes it the official labeled mean plus ratio
    times the pseudo-labeled mean.
    """
    base_key = jax.random.key(seed)

    def train_step_with_teacher(state: TrainState, batch: dict, teacher_vars: Any = None):
        rng = jax.random.fold_in(base_key, state.step)
        images = normalize_images(batch['image'], normalization, compute_dtype)
        labels = batch['label']
        smoothing = label_smoothing
        if 'smooth' in batch:  # techniques: Noisy Student, per-row label smoothing
            smoothing = label_smoothing * batch['smooth'][:, None]

        extra = {}
        if dropblock_keep_prob < 1.0:  # techniques: DropBlock, keep_prob from 1 down linearly
            extra['dropblock_keep_prob'] = dropblock_lib.scheduled_keep_prob(
                state.step // grad_accum_steps, total_steps, dropblock_keep_prob
            )

        def loss_fn(params):
            logits, new_vars = model.apply(
                {'params': params, 'batch_stats': state.batch_stats},
                images,
                train=True,
                rngs={'dropout': rng},
                mutable=['batch_stats'],
                **extra,
            )
            if teacher is None:
                data_loss = jnp.mean(cross_entropy(logits, labels, smoothing))
            else:  # techniques: distillation
                data_loss = jnp.mean(teacher.loss(logits, teacher_logits, labels, smoothing))
            data_loss = data_loss * data_loss_weight
            l2 = optim.l2_penalty(params, weight_decay_mask) if weight_decay else 0.0
            total = data_loss + weight_decay * l2
            return total, (data_loss, logits, new_vars['batch_stats'])

        if teacher is not None:  # techniques: distillation (frozen, eval mode)
            teacher_logits = teacher.logits(teacher_vars, batch)

        if state.loss_scale is None:
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (total, (data_loss, logits, batch_stats)), grads = grad_fn(state.params)
        else:  # techniques: dynamic loss scaling
            grad_fn = state.loss_scale.value_and_grad(loss_fn, has_aux=True)
            new_scale, finite, (total, (data_loss, logits, batch_stats)), grads = grad_fn(
                state.params
            )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        opt_steps = (state.step + 1) // grad_accum_steps  # updates done after this call
        masks = state.prune_masks
        if pruning is not None:  # techniques: magnitude pruning
            masks = pruning_lib.step_masks(
                pruning,
                masks,
                state.params,
                state.step // grad_accum_steps,
                (state.step + 1) % grad_accum_steps == 0,
            )
            params = pruning_lib.apply_masks(params, masks)
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
        if pruning is not None:  # the weights that evaluation and export use are sparse too
            new_ema_p = pruning_lib.apply_masks(new_ema_p, masks)

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
            prune_masks=masks,
        )
        if state.loss_scale is not None:  # a non-finite step changes nothing but the scale
            new_state = loss_scale_lib.select(finite, new_state, state.replace(step=state.step + 1))
            new_state = new_state.replace(loss_scale=new_scale)
            metrics['loss_scale'] = state.loss_scale.scale
            metrics['grads_finite'] = finite.astype(jnp.float32)
        return new_state, metrics

    batch_s = sharding.batch_sharding(mesh)
    if teacher is None:

        def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
            return train_step_with_teacher(state, batch)

        return jax.jit(
            train_step,
            in_shardings=(state_shardings, batch_s),
            out_shardings=(state_shardings, sharding.replicated(mesh)),
            donate_argnums=(0,),
        )

    # techniques: distillation. The teacher's variables are a (never donated) argument, placed
    # by the caller, so they are neither constants in the program nor part of the state.
    jitted = jax.jit(
        train_step_with_teacher,
        in_shardings=(state_shardings, batch_s, sharding.shardings_of(teacher_variables)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    return lambda state, batch: jitted(state, batch, teacher_variables)


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
