"""The official recipe's training step for the benchmarks, wired from the model and the
training modules alone (no config library, no input pipeline, no TensorFlow), so that the
benchmarks run on a machine that has only jax, flax, optax and torch. ``recipe_run`` wires it
as ``training.run.create_run`` does from ``configs/base.py``; ``tests/test_benchmarks.py``
checks that the two compile to the same program."""

from __future__ import annotations

import dataclasses
from typing import Any

# The official recipe's step, as configs/base.py sets it (tests/test_benchmarks.py compares
# the programs), with ImageNet's sizes: the schedule's step counts do not change the cost.
RECIPE = {
    'base_learning_rate': 0.016,  # per 256 examples
    'warmup_epochs': 5.0,
    'decay_epochs': 2.4,
    'decay_factor': 0.97,
    'rmsprop_decay': 0.9,
    'momentum': 0.9,
    'rmsprop_epsilon': 1e-3,
    'weight_decay': 1e-5,  # L2 in the loss
    'label_smoothing': 0.1,
    'ema_decay': 0.9999,
    'seed': 0,
    'fsdp_min_size': 2**14,
}
IMAGENET = {'num_classes': 1000, 'num_train': 1_281_167, 'num_eval': 50_000}


@dataclasses.dataclass(frozen=True)
class BenchRun:
    """The pieces of ``training.run.Run`` that a benchmark uses."""

    model: Any
    mesh: Any
    tx: Any
    abstract_variables: Any
    abstract_state: Any
    state_shardings: Any
    init: Any  # jitted: key -> state, in its shardings
    train_step: Any
    weight_decay_mask: Any


def recipe_run(
    name: str,
    batch: int,
    res: int,
    dtype: str,
    *,
    remat: bool = False,
    scan_blocks: bool | None = None,
    devices: list | None = None,
) -> BenchRun:
    """The training step of the official recipe for ``name`` at ``batch`` and ``res`` px,
    wired as ``training.run.create_run`` wires it (same modules, same order). ``dtype``
    float16 adds dynamic loss scaling (``configs/fp16.py``: ``loss_scale.mode='dynamic'``)."""
    import jax.numpy as jnp

    import efficientnet
    from training import loss_scale as loss_scale_lib
    from training import optim, sharding
    from training import state as state_lib
    from training.train_step import make_train_step

    r = RECIPE
    model = efficientnet.create_model(
        name,
        num_classes=IMAGENET['num_classes'],
        dtype=jnp.dtype(dtype),
        resolution=res,
        remat=remat,
        scan_blocks=scan_blocks,
    )
    mesh = sharding.create_mesh(1, devices)
    steps_per_epoch = max(1, IMAGENET['num_train'] // batch)
    schedule = optim.create_learning_rate_schedule(
        r['base_learning_rate'] * batch / 256.0,
        kind='exponential',
        warmup_steps=int(round(r['warmup_epochs'] * steps_per_epoch)),
        decay_steps=max(1, int(round(r['decay_epochs'] * steps_per_epoch))),
        decay_factor=r['decay_factor'],
    )
    variables = state_lib.abstract_variables(model, res)
    decay_mask = optim.weight_decay_mask(variables['params'], variables.get('batch_stats', {}))
    tx = optim.tf1_rmsprop(
        schedule, decay=r['rmsprop_decay'], momentum=r['momentum'], eps=r['rmsprop_epsilon']
    )
    loss_scale = loss_scale_lib.create() if dtype == 'float16' else None
    abstract = state_lib.abstract_state_from_variables(variables, tx, loss_scale)
    shardings = sharding.state_shardings(abstract, mesh, r['fsdp_min_size'])
    step = make_train_step(
        model,
        tx,
        schedule,
        mesh=mesh,
        state_shardings=shardings,
        seed=r['seed'],
        label_smoothing=r['label_smoothing'],
        weight_decay=r['weight_decay'],
        weight_decay_mask=decay_mask,
        ema_decay=r['ema_decay'],
        normalization=model.variant.normalization,
        compute_dtype=jnp.dtype(dtype),
    )
    init = state_lib.jit_init(state_lib.make_init_fn(model, tx, res, loss_scale), shardings, mesh)
    return BenchRun(model, mesh, tx, variables, abstract, shardings, init, step, decay_mask)


def update_only_step(run: BenchRun):
    """The per-parameter part of ``run.train_step`` alone, jitted like it (the state donated):
    the L2 term's gradient, the optimizer update and the EMA of the weights, for gradients given
    as an argument. Its compile time is what grows with the number of parameter arrays, whatever
    the network computes (``--update-compile`` of scripts/benchmark_train.py)."""
    import jax
    import optax

    from training import ema as ema_lib
    from training import optim

    wd = RECIPE['weight_decay']

    def update(state, grads):
        l2 = jax.grad(lambda p: wd * optim.l2_penalty(p, run.weight_decay_mask))(state.params)
        grads = jax.tree.map(lambda g, d: g + d, grads, l2)
        updates, opt_state = run.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_lib.update_ema(state.ema_params, params, state.step + 1, RECIPE['ema_decay'])
        return state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema
        )

    return jax.jit(
        update,
        in_shardings=(run.state_shardings, run.state_shardings.params),
        out_shardings=run.state_shardings,
        donate_argnums=(0,),
    )


def jax_row(name: str, batch: int, res: int, dtype: str) -> dict:
    """The fields every JAX result row starts with: what ran, and on what."""
    import jax

    return {
        'framework': 'jax',
        'backend': jax.default_backend(),
        'device': str(jax.devices()[0].device_kind),
        'devices': jax.device_count(),
        'model': name,
        'batch': batch,
        'resolution': res,
        'dtype': dtype,
    }


def synthetic_batch(batch: int, res: int, mesh) -> dict:
    import numpy as np

    from training import sharding

    rng = np.random.default_rng(0)
    local = {
        'image': rng.integers(0, 256, (batch, res, res, 3), dtype=np.uint8),
        'label': rng.integers(0, 1000, (batch,), dtype=np.int32),
    }
    return sharding.global_batch(local, mesh)


def trace_lower(jitted, *args):
    """``jitted`` traced and lowered for ``args`` (``Traced.lower`` where jax has it)."""
    if hasattr(jitted, 'trace'):
        return jitted.trace(*args).lower()
    return jitted.lower(*args)


def peak_mem_gib() -> float | None:
    """The device's peak bytes in use so far, where the backend keeps statistics (GPU, TPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get('peak_bytes_in_use')
    return None if peak is None else peak / 2.0**30
