"""Derived run values, computed once from the config and checked before anything compiles.

Config files hold choices (global batch, epochs, base learning rate per 256 examples); the
learning rate, steps per epoch, warmup/decay/total steps follow here, so that command-line
overrides stay consistent. ``resolve`` first collects every problem of the config
(``training.config_checks``: one line each, in one ConfigError, before anything is compiled or
written), then derives the ``RunPlan``. The model a config describes is built by
``training.config_model``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

from efficientnet import arch, paths
from efficientnet.cli import format_problems
from training import config_checks
from training.config_checks import ConfigError
from training.config_model import COMPUTE_DTYPES, bn_group_size, build_model

__all__ = ['COMPUTE_DTYPES', 'ConfigError', 'RunPlan', 'build_model', 'resolve', 'write_resolved']


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Everything derived from the config. Step counts are optimizer updates unless named
    ``micro``; with gradient accumulation k, one update is k train-step calls."""

    num_classes: int
    num_train: int
    num_eval: int
    device_count: int
    process_count: int
    global_batch: int  # examples per optimizer update
    grad_accum_steps: int
    micro_batch: int  # examples per train-step call (global)
    local_micro_batch: int  # per process
    eval_batch: int
    bn_group_size: int | None  # examples per BatchNorm statistics group; None: the whole batch
    normalization: str  # config.data.normalization, else the variant's own
    learning_rate: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    decay_steps: int
    total_micro_steps: int
    eval_every_micro_steps: int
    checkpoint_every_micro_steps: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve(
    config: Any,
    *,
    device_count: int,
    process_count: int = 1,
    dataset_info_fn: Callable[[Any], dict] | None = None,
    workdir: str | None = None,
) -> RunPlan:
    """Validates ``config`` (and the ``workdir`` it will run in, when given) and derives the
    run plan; raises ConfigError listing every problem."""
    errors, info = config_checks.problems(
        config,
        device_count=device_count,
        process_count=process_count,
        dataset_info_fn=dataset_info_fn,
        workdir=workdir,
    )
    if errors:
        raise ConfigError(format_problems('invalid config', errors))
    c, o, m = config, config.optim, config.model
    accum = o.grad_accum_steps
    micro = c.batch_size // accum
    eval_batch = c.eval_batch_size if c.eval_batch_size is not None else c.batch_size
    steps_per_epoch = max(1, info['num_train'] // c.batch_size)
    total = c.total_steps or max(1, int(math.ceil(c.num_epochs * steps_per_epoch)))
    eval_every = (
        max(1, int(round(c.eval_every_epochs * steps_per_epoch)))
        if (c.eval_every_epochs and c.eval_every_epochs > 0)
        else total
    )
    return RunPlan(
        num_classes=info['num_classes'],
        num_train=info['num_train'],
        num_eval=info['num_eval'],
        device_count=device_count,
        process_count=process_count,
        global_batch=c.batch_size,
        grad_accum_steps=accum,
        micro_batch=micro,
        local_micro_batch=micro // process_count,
        eval_batch=eval_batch,
        bn_group_size=bn_group_size(c),
        normalization=c.data.normalization or arch.get_variant(m.name).normalization,
        learning_rate=o.base_learning_rate * c.batch_size / 256.0,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=int(round(o.warmup_epochs * steps_per_epoch)),
        decay_steps=max(1, int(round(o.decay_epochs * steps_per_epoch))),
        total_micro_steps=total * accum,
        eval_every_micro_steps=min(eval_every, total) * accum,
        checkpoint_every_micro_steps=c.checkpoint.every_steps,
    )


def write_resolved(config: Any, plan: RunPlan, workdir: str) -> str:
    """Writes the config and the derived plan to ``workdir/config.json`` (local or gs://,
    atomically); returns the path."""
    text = json.dumps(
        {'config': config.to_dict(), 'derived': plan.to_dict()},
        indent=2,
        sort_keys=True,
        default=str,
    )
    return paths.write_atomic(paths.as_path(workdir, 'config.json'), text)
