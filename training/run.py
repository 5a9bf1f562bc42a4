"""One wiring of a training run from a config: mesh, model, learning-rate schedule, optimizer,
state shapes and shardings, and the jitted train and eval steps.

``train.py`` and the tests build their runs through ``create_run``, so the pieces meet in one
place and a test runs exactly the step that training runs. The benchmarks wire the official
recipe's step from the same modules without the config library (``scripts/bench_recipe.py``:
they must run where only jax, flax, optax and torch are installed); ``tests/test_benchmarks.py``
checks that it compiles to the program ``create_run`` builds. Restoring or initialising the state
stays with the caller (``train.py`` resumes from checkpoints; tests call ``Run.init_state``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from efficientnet import EfficientNet
from training import config_resolve, optim, sharding
from training import distill as distill_lib
from training import loss_scale as loss_scale_lib
from training import pruning as pruning_lib
from training import state as state_lib
from training.state import TrainState
from training.train_step import make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything a training loop needs besides the state and the data."""

    config: Any
    plan: config_resolve.RunPlan
    mesh: Mesh
    model: EfficientNet
    schedule: optim.Schedule
    tx: optax.GradientTransformation
    weight_decay_mask: Any
    abstract_variables: Any  # the model's variables as shapes (eval_shape; nothing allocated)
    abstract_state: TrainState
    state_shardings: Any
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    eval_step: Callable[[TrainState, dict], dict]
    # Distillation (training/distill.py): the frozen teacher and its variables on the mesh.
    teacher: Any = None
    teacher_variables: Any = None
    # The train step of another model of the same parameters (progressive learning's dropout).
    step_for_model: Callable[[EfficientNet], Callable] | None = None
    _stage_steps: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def stage_train_step(self, dropout_rate: float) -> Callable[[TrainState, dict], Any]:
        """The train step of a progressive-learning stage (training/progressive.py): the run's
        own when the stage keeps the model's dropout rate, else one built once for a model that
        differs only in it. Each distinct image size compiles once, on its first call."""
        if dropout_rate == self.model.dropout_rate or (
            self.model.dropout_rate is None and dropout_rate == self.model.variant.dropout
        ):
            return self.train_step
        if dropout_rate not in self._stage_steps:
            model = self.model.clone(dropout_rate=dropout_rate)
            self._stage_steps[dropout_rate] = self.step_for_model(model)
        return self._stage_steps[dropout_rate]

    def init_state(self, seed: int | None = None) -> TrainState:
        """The step-0 state, created directly in its shardings from ``seed`` (default:
        ``config.seed``)."""
        seed = self.config.seed if seed is None else seed
        return self._jitted_init(jax.random.key(seed))

    @functools.cached_property
    def _jitted_init(self) -> Callable[[jax.Array], TrainState]:
        """The initialisation, jitted once per run (the seed is an argument: one compile for
        every seed)."""
        init = state_lib.make_init_fn(
            self.model,
            self.tx,
            self.config.data.resolution,
            loss_scale_lib.from_config(self.config),
            pruning_lib.from_config(self.config) is not None,
        )
        return state_lib.jit_init(init, self.state_shardings, self.mesh)


def create_run(
    config: Any, plan: config_resolve.RunPlan | None = None, *, mesh: Mesh | None = None
) -> Run:
    """Wires a run from ``config``. ``plan`` defaults to ``config_resolve.resolve`` over the
    mesh's devices; ``mesh`` defaults to a (data, fsdp) mesh over every device."""
    mesh = mesh or sharding.create_mesh(config.mesh.fsdp)
    if plan is None:
        plan = config_resolve.resolve(
            config, device_count=mesh.size, process_count=jax.process_count()
        )
    o = config.optim
    model = config_resolve.build_model(config, plan.num_classes)
    schedule = optim.create_learning_rate_schedule(
        plan.learning_rate,
        kind=o.schedule,
        warmup_steps=plan.warmup_steps,
        total_steps=plan.total_steps,
        decay_steps=plan.decay_steps,
        decay_factor=o.decay_factor,
        min_lr=o.min_learning_rate,
    )
    variables = state_lib.abstract_variables(model, config.data.resolution)
    decay_mask = optim.weight_decay_mask(variables['params'], variables.get('batch_stats', {}))
    tx = optim.create_optimizer(o, schedule, decay_mask)
    pruning = pruning_lib.from_config(config)
    abstract = state_lib.abstract_state_from_variables(
        variables, tx, loss_scale_lib.from_config(config), pruning is not None
    )
    shardings = sharding.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
    dtype = config_resolve.COMPUTE_DTYPES[config.model.compute_dtype]
    teacher, teacher_variables = None, None
    try:
        loaded = distill_lib.load_teacher(config, plan.num_classes)
    except (FileNotFoundError, ValueError) as e:  # before anything compiles: one line
        raise config_resolve.ConfigError(
            f'config.distill.teacher={config.distill.teacher}: {e}'
        ) from e
    if loaded is not None:  # placed once, by the rules that place the student's parameters
        teacher, host_variables = loaded
        teacher_variables = sharding.place(host_variables, mesh, config.mesh.fsdp_min_size)
    step_for_model = functools.partial(
        make_train_step,
        tx=tx,
        schedule=schedule,
        mesh=mesh,
        state_shardings=shardings,
        seed=config.seed,
        label_smoothing=config.label_smoothing,
        weight_decay=o.weight_decay if o.weight_decay_mode == 'l2' else 0.0,
        weight_decay_mask=decay_mask,
        ema_decay=config.ema_decay,
        grad_accum_steps=plan.grad_accum_steps,
        normalization=plan.normalization,
        compute_dtype=dtype,
        pruning=pruning,
        teacher=teacher,
        teacher_variables=teacher_variables,
        dropblock_keep_prob=config.dropblock.keep_prob if 'dropblock' in config else 1.0,
        total_steps=plan.total_steps,
        data_loss_weight=1.0 + config.data.unlabeled_ratio if config.data.pseudo_labels else 1.0,
    )
    train_step = step_for_model(model)
    eval_step = make_eval_step(
        model,
        mesh=mesh,
        state_shardings=shardings,
        normalization=plan.normalization,
        compute_dtype=dtype,
    )
    return Run(
        config=config,
        plan=plan,
        mesh=mesh,
        model=model,
        schedule=schedule,
        tx=tx,
        weight_decay_mask=decay_mask,
        abstract_variables=variables,
        abstract_state=abstract,
        state_shardings=shardings,
        train_step=train_step,
        eval_step=eval_step,
        teacher=teacher,
        teacher_variables=teacher_variables,
        step_for_model=step_for_model,
    )
