"""EfficientNetV2's progressive learning: each stage's image size and regularisation strength,
derived from ``config.progressive`` (configs/base.py, docs/models.md).

    for stage in stage_values(config):
        stage.start_epoch, stage.end_epoch, stage.resolution, stage.randaugment_magnitude, ...

Two interpolation rules between the min_* and max_* bounds, for stage k of M:

- 'official' (google/automl efficientnetv2, main.py / main_tf2.py): the image size is
  ``int(min + (max - min) * (k + 1) / M)``, so the first stage already sits above the minimum
  and the last one at the maximum; RandAugment magnitude, MixUp and CutMix alpha and dropout
  follow ``linspace(min, max, M)``.
- 'paper' (Algorithm 1 of the paper): everything, the size included, follows
  ``linspace(min, max, M)``; the size is rounded to the nearest int (the paper does not say
  how; S's stages are then 128, 185, 243, 300).

Stage k covers epochs ``int(k / M * E)`` to ``int((k + 1) / M * E)`` of E, as in the official
code (E a whole number; a fractional E splits at ``k / M * E`` exactly). A None bound is the
constant setting of config.data / config.model. This is the one place that turns the config
into stage values; ``train.py`` runs each stage with ``data_overrides`` and the run's train
step for the stage's dropout (``training/run.py``), so each stage compiles once, and a resumed
run finds its stage from the step alone (``stage_at``): exact resume needs nothing more in the
checkpoint. Evaluation stays at ``data.resolution`` throughout.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from efficientnet import arch

RULES = ('official', 'paper')


@dataclasses.dataclass(frozen=True)
class Stage:
    index: int
    start_epoch: float  # an int when config.num_epochs is a whole number (the official split)
    end_epoch: float
    resolution: int
    randaugment_magnitude: float
    mixup_alpha: float
    cutmix_alpha: float
    dropout: float


def _linspace(lo: float, hi: float, k: int, stages: int) -> float:
    return hi if stages == 1 else lo + (hi - lo) * k / (stages - 1)


def _bounds(lo: Any, hi: Any, constant: float) -> tuple[float, float]:
    lo = constant if lo is None else lo
    hi = constant if hi is None else hi
    return float(lo), float(hi)


def stage_values(config: Any) -> list[Stage]:
    """The stages of ``config.progressive`` (one stage when ``stages`` is 1); ValueError for a
    rule or bounds that make no schedule."""
    p = config.progressive
    m = int(p.stages)
    if m < 1:
        raise ValueError(f'config.progressive.stages must be >= 1, got {m}')
    if p.rule not in RULES:
        raise ValueError(f'config.progressive.rule must be one of {RULES}, got {p.rule!r}')
    resolution = int(config.data.resolution)
    hi_res = resolution if p.max_resolution is None else int(p.max_resolution)
    lo_res = int(p.min_resolution) if m > 1 else hi_res  # one stage: at the final size
    if not 0 < lo_res <= hi_res:
        raise ValueError(
            f'config.progressive: min_resolution {lo_res} must be positive and at most '
            f'max_resolution {hi_res}'
        )
    dropout = config.model.dropout_rate
    if dropout is None:
        dropout = arch.get_variant(config.model.name).dropout
    bounds = {
        'randaugment_magnitude': _bounds(
            p.min_randaugment_magnitude, p.max_randaugment_magnitude,
            config.data.randaugment_magnitude,
        ),
        'mixup_alpha': _bounds(p.min_mixup_alpha, p.max_mixup_alpha, config.data.mixup_alpha),
        'cutmix_alpha': _bounds(p.min_cutmix_alpha, p.max_cutmix_alpha, config.data.cutmix_alpha),
        'dropout': _bounds(p.min_dropout, p.max_dropout, dropout),
    }  # fmt: skip
    epochs = float(config.num_epochs)
    split = int if epochs.is_integer() else float
    out = []
    for k in range(m):
        if p.rule == 'official':
            size = int(lo_res + (hi_res - lo_res) * (k + 1) / m)
        else:
            size = round(_linspace(lo_res, hi_res, k, m))
        values = {name: _linspace(lo, hi, k, m) for name, (lo, hi) in bounds.items()}
        out.append(
            Stage(
                index=k,
                start_epoch=split(k / m * epochs),
                end_epoch=split((k + 1) / m * epochs),
                resolution=size,
                **values,
            )
        )
    return out


def is_progressive(config: Any) -> bool:
    """Whether ``config.progressive`` changes the training batches or model: more than one
    stage, or one stage at ``max_resolution`` (a V2 config with ``stages=1`` trains at its
    final train size, not at the eval size ``data.resolution``)."""
    p = config.get('progressive')
    return p is not None and (int(p.stages) > 1 or p.max_resolution is not None)


@dataclasses.dataclass(frozen=True)
class StageSteps:
    """A stage and the train-step calls it covers: ``start`` <= step < ``end`` (micro-steps,
    i.e. with gradient accumulation k, k calls per optimizer update)."""

    stage: Stage
    start: int
    end: int


def stage_steps(config: Any, *, steps_per_epoch: int, total_steps: int, accum: int = 1):
    """Each stage's steps: stage k starts at the optimizer step of its start epoch (the last
    stage ends at ``total_steps``); a list of ``StageSteps`` covering [0, total * accum)."""
    stages = stage_values(config)
    out = []
    for s in stages:
        start = min(total_steps, int(round(s.start_epoch * steps_per_epoch)))
        end = (
            total_steps
            if s is stages[-1]
            else min(total_steps, int(round(s.end_epoch * steps_per_epoch)))
        )
        out.append(StageSteps(s, start * accum, end * accum))
    return out


def plan_stages(config: Any, plan: Any) -> list[StageSteps] | None:
    """The stages of a run (``config_resolve.RunPlan``'s step counts); None without
    progressive learning."""
    if not is_progressive(config):
        return None
    return stage_steps(
        config,
        steps_per_epoch=plan.steps_per_epoch,
        total_steps=plan.total_steps,
        accum=plan.grad_accum_steps,
    )


def stage_at(stages: list[StageSteps], step: int) -> StageSteps:
    """The stage that trains step ``step`` (0-based; the last stage for ``step`` >= the end)."""
    for s in stages:
        if step < s.end:
            return s
    return stages[-1]


def data_overrides(stage: Stage) -> dict[str, Any]:
    """What the stage changes in the train batches (``input_pipeline.TrainIterator``'s
    overrides): the image size, RandAugment magnitude and MixUp/CutMix alpha."""
    return {
        'resolution': stage.resolution,
        'randaugment_magnitude': stage.randaugment_magnitude,
        'mixup_alpha': stage.mixup_alpha,
        'cutmix_alpha': stage.cutmix_alpha,
    }


def describe(s: StageSteps, num_stages: int, data_config: Any) -> str:
    """One log line: the stage, its steps and what it trains with."""
    st = s.stage
    augment = data_config.augment or 'none'
    magnitude = f' {st.randaugment_magnitude:.3g}' if augment == 'randaugment' else ''
    return (
        f'progressive learning: stage {st.index + 1}/{num_stages}, steps {s.start}-{s.end} '
        f'(epochs {st.start_epoch:g}-{st.end_epoch:g}): {st.resolution} px, {augment}{magnitude}, '
        f'mixup {st.mixup_alpha:.3g}, cutmix {st.cutmix_alpha:.3g}, dropout {st.dropout:.3g}'
    )


def config_problems(config: Any, steps_per_epoch: int | None = None) -> list[str]:
    """One line per problem of ``config.progressive``; with ``steps_per_epoch``, also a stage
    that would get no training step."""
    if not is_progressive(config):
        return []
    try:
        stages = stage_values(config)
    except ValueError as e:
        return [str(e)]
    problems = [
        f'config.progressive: stage {s.index + 1} has a negative {name} ({v})'
        for s in stages
        for name, v in (
            ('RandAugment magnitude', s.randaugment_magnitude),
            ('mixup alpha', s.mixup_alpha),
            ('cutmix alpha', s.cutmix_alpha),
            ('dropout', s.dropout),
        )
        if v < 0
    ]
    if steps_per_epoch and not problems:
        total = config.total_steps or max(1, math.ceil(config.num_epochs * steps_per_epoch))
        for s in stage_steps(config, steps_per_epoch=steps_per_epoch, total_steps=total):
            if s.end <= s.start:
                problems.append(
                    f'config.progressive.stages={len(stages)}: stage {s.stage.index + 1} '
                    f'(epochs {s.stage.start_epoch:g}-{s.stage.end_epoch:g}) gets no training '
                    f'step at {steps_per_epoch} steps per epoch; train for more epochs or use '
                    'fewer stages'
                )
                break
    return problems


def mixes(config: Any) -> bool:
    """Whether any step of the run mixes images (MixUp or CutMix)."""
    if config.data.mixup_alpha or config.data.cutmix_alpha:
        return True
    if not is_progressive(config):
        return False
    try:
        return any(s.mixup_alpha or s.cutmix_alpha for s in stage_values(config))
    except ValueError:
        return False
