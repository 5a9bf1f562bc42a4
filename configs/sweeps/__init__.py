"""Sweeps: a sweep file defines ``get_sweep() -> list[dict]``, one dict of config overrides per
run, keyed by dotted config paths (``'optim.base_learning_rate'``). ``scripts/sweep.py`` runs
them or prints one ``train.py`` command per run. These helpers build the lists; a sweep file may
also write its list out by hand or concatenate several.

    grid({'optim.base_learning_rate': [0.016, 0.032], 'label_smoothing': [0.0, 0.1]})
    random_search({'optim.base_learning_rate': log_uniform(1e-3, 1e-1),
                   'ema_decay': [0.99, 0.999]}, num_trials=8, seed=0)

Configs import ml_collections and ``efficientnet.arch`` only, so this module uses ``random`` and
``itertools``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any


def grid(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the values, the last key varying fastest; keys keep their order."""
    for key, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f'grid axis {key!r} needs a non-empty list of values, got {values!r}')
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


@dataclasses.dataclass(frozen=True)
class Distribution:
    """A value drawn afresh for each random-search trial."""

    kind: str  # uniform, log_uniform, randint
    low: float
    high: float

    def sample(self, rng: random.Random) -> float | int:
        if self.kind == 'uniform':
            return rng.uniform(self.low, self.high)
        if self.kind == 'log_uniform':
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.randint(int(self.low), int(self.high))


def uniform(low: float, high: float) -> Distribution:
    """A float drawn uniformly from [low, high]."""
    return Distribution('uniform', low, high)


def log_uniform(low: float, high: float) -> Distribution:
    """A float whose logarithm is uniform on [log low, log high] (learning rates, decays)."""
    if not 0 < low <= high:
        raise ValueError(f'log_uniform needs 0 < low <= high, got {low}, {high}')
    return Distribution('log_uniform', low, high)


def randint(low: int, high: int) -> Distribution:
    """An integer drawn uniformly from [low, high], both included."""
    return Distribution('randint', low, high)


def _round_significant(x: float, digits: int) -> float:
    """Rounds to ``digits`` significant digits, so run names stay short (0.00312, not
    0.0031234977...) and the value a run used is the value its name shows."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - math.floor(math.log10(abs(x))))


def random_search(
    space: Mapping[str, Any], num_trials: int, seed: int, significant_digits: int = 3
) -> list[dict[str, Any]]:
    """``num_trials`` independent draws from ``space``: each value is a distribution
    (``uniform``, ``log_uniform``, ``randint``), a list (one element chosen uniformly) or a
    constant. The same seed gives the same list; floats keep ``significant_digits`` digits."""
    if num_trials < 1:
        raise ValueError(f'num_trials must be positive, got {num_trials}')
    rng = random.Random(seed)
    trials, seen = [], set()
    for _ in range(num_trials):
        trial = {}
        for key, dist in space.items():
            if isinstance(dist, Distribution):
                value = dist.sample(rng)
            elif isinstance(dist, Sequence) and not isinstance(dist, (str, bytes)):
                value = rng.choice(list(dist))
            else:
                value = dist
            if isinstance(value, float):
                value = _round_significant(value, significant_digits)
            trial[key] = value
        frozen = tuple(sorted((k, repr(v)) for k, v in trial.items()))
        if frozen not in seen:  # a repeated draw would be the same run
            seen.add(frozen)
            trials.append(trial)
    return trials
