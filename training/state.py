"""The train state: one pytree, created already sharded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

import efficientnet
from training import compilation, sharding
from training import pruning as pruning_lib


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue; no functions inside, so it checkpoints as is.

    ``step`` counts train-step calls (micro-steps when gradients are accumulated).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    ema_batch_stats: Any
    # Optional techniques (None when off; None holds no arrays, so checkpoints of runs without
    # them keep their layout): the dynamic loss scale (training/loss_scale.py) and the pruning
    # masks (training/pruning.py).
    loss_scale: Any = None
    prune_masks: Any = None


def init_variables(model: nn.Module, image_size: int, rng: jax.Array) -> Any:
    """The model's initial variables ({'params', 'batch_stats'}), as the train state uses them:
    with ``scan_blocks`` each stage's repeated blocks stacked (``efficientnet.stack_blocks``;
    the scan reads them as they are, and the optimizer and EMA update one array per stage
    instead of one per block). Checkpoints hold them per block (``per_block``)."""
    variables = model.init({'params': rng}, jnp.zeros((1, image_size, image_size, 3)), train=False)
    return efficientnet.stack_blocks(variables, efficientnet.stacked_runs(model))


def per_block(tree: Any) -> Any:
    """``tree`` (a train state, variables, their shapes or shardings) with every stacked run
    of blocks split back into one subtree per block: the layout of checkpoints, weight files
    and ``model.init``. Lossless; ``stacked_like`` is its inverse."""
    return efficientnet.unstack_blocks(tree)


def stacked_like(tree: Any, layout: Any) -> Any:
    """``tree`` in per-block layout with the runs of blocks that ``layout`` (a tree of the
    train state's layout, e.g. the abstract state) holds stacked, stacked the same way."""
    runs = []
    for leaf_path, _ in jax.tree_util.tree_flatten_with_path(layout)[0]:
        for key in leaf_path:
            indices = efficientnet.model.stacked_range(getattr(key, 'key', None))
            if indices is not None and indices not in runs:
                runs.append(indices)
    return efficientnet.stack_blocks(tree, runs)


def state_from_variables(
    variables: Any,
    tx: optax.GradientTransformation,
    loss_scale: Any = None,
    pruning: bool = False,
) -> TrainState:
    """The step-0 train state around the model's initial ``variables``; ``loss_scale`` (a
    training.loss_scale state) and ``pruning`` (all-true masks) when those techniques are on."""
    params = variables['params']
    batch_stats = variables.get('batch_stats', {})
    # The EMA starts at the initial values (as TF's ExponentialMovingAverage shadows do);
    # copies so that params and EMA never share a buffer (the step donates the state).
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        ema_batch_stats=jax.tree.map(jnp.copy, batch_stats),
        loss_scale=loss_scale,
        prune_masks=pruning_lib.init_masks(params) if pruning else None,
    )


def make_init_fn(
    model: nn.Module,
    tx: optax.GradientTransformation,
    image_size: int,
    loss_scale: Any = None,
    pruning: bool = False,
) -> Callable[[jax.Array], TrainState]:
    def init(rng: jax.Array) -> TrainState:
        variables = init_variables(model, image_size, rng)
        return state_from_variables(variables, tx, loss_scale, pruning)

    return init


def abstract_variables(model: nn.Module, image_size: int) -> Any:
    """Shapes and dtypes of the model's variables (traces the model once)."""
    return jax.eval_shape(lambda: init_variables(model, image_size, jax.random.key(0)))


def abstract_state_from_variables(
    variables: Any,
    tx: optax.GradientTransformation,
    loss_scale: Any = None,
    pruning: bool = False,
) -> TrainState:
    """Shapes and dtypes of the state, from ``abstract_variables`` without tracing the model
    again (the tracing shows in the time to the first step; docs/benchmarks.md)."""
    return jax.eval_shape(lambda v: state_from_variables(v, tx, loss_scale, pruning), variables)


def jit_init(
    init: Callable[[jax.Array], TrainState], shardings: Any, mesh: Mesh
) -> Callable[[jax.Array], TrainState]:
    """``init`` jitted to produce the state directly in ``shardings`` (compiled with
    compilation.init_compiler_options: faster to compile on CPU, same values)."""
    return jax.jit(
        init, out_shardings=shardings, compiler_options=compilation.init_compiler_options(mesh)
    )


def abstract_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    image_size: int,
) -> TrainState:
    """Shapes and dtypes of the state, computed without allocating anything."""
    return abstract_state_from_variables(abstract_variables(model, image_size), tx)


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    image_size: int,
    rng: jax.Array,
    mesh: Mesh,
    fsdp_min_size: int = 2**14,
) -> tuple[TrainState, Any]:
    """Initialises the state directly into its shardings (no host round trip, no full copy on
    one device). Returns (state, shardings)."""
    init = make_init_fn(model, tx, image_size)
    abstract = abstract_train_state(model, tx, image_size)
    shardings = sharding.state_shardings(abstract, mesh, fsdp_min_size)
    state = jit_init(init, shardings, mesh)(rng)
    return state, shardings
