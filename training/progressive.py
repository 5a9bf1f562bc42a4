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
code. A None bound is the constant setting of config.data / config.model. The training loop
does not consume these yet; this is the one place that turns the config into stage values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from efficientnet import arch

RULES = ('official', 'paper')


@dataclasses.dataclass(frozen=True)
class Stage:
    index: int
    start_epoch: int
    end_epoch: int
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
    lo_res = int(p.min_resolution) if m > 1 else resolution
    hi_res = resolution if p.max_resolution is None else int(p.max_resolution)
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
                start_epoch=int(k / m * epochs),
                end_epoch=int((k + 1) / m * epochs),
                resolution=size,
                **values,
            )
        )
    return out
