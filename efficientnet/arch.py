"""EfficientNet architectures as data: the B0 stage table, the variants, and the scaling rules.

Everything here is plain Python; the Flax modules only read the ``BlockSpec`` list that
``build_blocks`` returns. Numbers follow docs/reference.md §1-3 (the official
tensorflow/tpu builders).
"""

from __future__ import annotations

import dataclasses
import math

from efficientnet.normalization import NORMALIZATIONS

CROP_PADDING = 32
# The stochastic-depth (drop-connect) rate of the official recipe, the same for every variant:
# block i of N is skipped with probability DROP_PATH_RATE * i / N (see build_blocks).
DROP_PATH_RATE = 0.2


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One row of the B0 table (docs/reference.md §2)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int
    se_ratio: float = 0.25


# The B0 baseline, in the official block-string order r1_k3_s11_e1_i32_o16_se0.25, ...
B0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)
B0_STEM = 32
B0_HEAD = 1280


@dataclasses.dataclass(frozen=True)
class Variant:
    """A member of the family: the compound-scaling record plus the family's block flavour."""

    name: str
    width: float
    depth: float
    resolution: int
    dropout: float
    family: str = 'efficientnet'  # 'efficientnet' or 'lite'

    @property
    def is_lite(self) -> bool:
        return self.family == 'lite'

    @property
    def activation(self) -> str:
        return 'relu6' if self.is_lite else 'swish'

    @property
    def use_se(self) -> bool:
        return not self.is_lite

    @property
    def crop_fraction(self) -> float:
        """Eval centre-crop fraction S / (S + 32) (docs/reference.md §5)."""
        return self.resolution / (self.resolution + CROP_PADDING)

    @property
    def normalization(self) -> str:
        """The input contract: the name (in ``efficientnet.normalization.NORMALIZATIONS``) of
        the normalisation this variant's published weights expect on [0, 255] input."""
        return 'lite' if self.is_lite else 'imagenet'

    @property
    def mean(self) -> tuple[float, float, float]:
        return NORMALIZATIONS[self.normalization][0]

    @property
    def std(self) -> tuple[float, float, float]:
        return NORMALIZATIONS[self.normalization][1]


def _variants() -> dict[str, Variant]:
    table = {
        'efficientnet-b0': (1.0, 1.0, 224, 0.2),
        'efficientnet-b1': (1.0, 1.1, 240, 0.2),
        'efficientnet-b2': (1.1, 1.2, 260, 0.3),
        'efficientnet-b3': (1.2, 1.4, 300, 0.3),
        'efficientnet-b4': (1.4, 1.8, 380, 0.4),
        'efficientnet-b5': (1.6, 2.2, 456, 0.4),
        'efficientnet-b6': (1.8, 2.6, 528, 0.5),
        'efficientnet-b7': (2.0, 3.1, 600, 0.5),
        'efficientnet-b8': (2.2, 3.6, 672, 0.5),
        'efficientnet-l2': (4.3, 5.3, 800, 0.5),
    }
    lite = {
        'efficientnet-lite0': (1.0, 1.0, 224, 0.2),
        'efficientnet-lite1': (1.0, 1.1, 240, 0.2),
        'efficientnet-lite2': (1.1, 1.2, 260, 0.3),
        'efficientnet-lite3': (1.2, 1.4, 280, 0.3),
        'efficientnet-lite4': (1.4, 1.8, 300, 0.3),
    }
    out = {n: Variant(n, *v) for n, v in table.items()}
    out.update({n: Variant(n, *v, family='lite') for n, v in lite.items()})
    return out


VARIANTS: dict[str, Variant] = _variants()

# Test-only variants: the real block structure at a fraction of the cost, for fast tests and
# smoke runs. Reachable by name but not listed by list_models().
TEST_VARIANTS: dict[str, Variant] = {
    'efficientnet-tiny': Variant('efficientnet-tiny', 0.25, 0.5, 32, 0.1),
    'efficientnet-lite-tiny': Variant('efficientnet-lite-tiny', 0.25, 0.5, 32, 0.1, 'lite'),
}

# Short aliases: 'b0' == 'efficientnet-b0', 'lite0' == 'efficientnet-lite0'.
_ALIASES = {n.removeprefix('efficientnet-'): n for n in (*VARIANTS, *TEST_VARIANTS)}


def list_models() -> list[str]:
    """Canonical names of every variant, in table order."""
    return list(VARIANTS)


def get_variant(name: str) -> Variant:
    """Looks a variant up by name or short alias ('b4', 'lite0'); ValueError if unknown."""
    if not isinstance(name, str):
        raise TypeError(f'model name must be a string, got {type(name).__name__}')
    key = name.strip().lower().replace('_', '-')
    key = _ALIASES.get(key, key)
    if key in TEST_VARIANTS:
        return TEST_VARIANTS[key]
    if key not in VARIANTS:
        raise ValueError(
            f'unknown EfficientNet variant {name!r}; valid names: {", ".join(list_models())} '
            f'(short forms such as "b0" or "lite0" work too)'
        )
    return VARIANTS[key]


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Scales a channel count by ``width`` and rounds to a multiple of ``divisor``
    (docs/reference.md §3)."""
    f = channels * width
    new = max(divisor, int(f + divisor / 2) // divisor * divisor)
    if new < 0.9 * f:  # never round down by more than 10%
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    """Scales a stage's repeat count by ``depth``, rounding up (docs/reference.md §3)."""
    return int(math.ceil(depth * repeats))


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One MBConv block after scaling, with its position in the network."""

    index: int  # 0-based over all blocks
    stage: int  # 0-based stage
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int
    se_channels: int  # 0 means no squeeze-excite
    survival: float  # stochastic-depth survival probability (1.0 for block 0)

    @property
    def expanded_channels(self) -> int:
        return self.in_channels * self.expand

    @property
    def has_residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


def stem_channels(variant: Variant) -> int:
    return B0_STEM if variant.is_lite else round_filters(B0_STEM, variant.width)


def head_channels(variant: Variant) -> int:
    return B0_HEAD if variant.is_lite else round_filters(B0_HEAD, variant.width)


def stage_repeats(variant: Variant) -> list[int]:
    """Repeats per stage; Lite keeps the first and last stages unscaled."""
    out = []
    for i, stage in enumerate(B0_STAGES):
        fixed = variant.is_lite and i in (0, len(B0_STAGES) - 1)
        out.append(stage.repeats if fixed else round_repeats(stage.repeats, variant.depth))
    return out


def build_blocks(variant: Variant, drop_path_rate: float = DROP_PATH_RATE) -> list[BlockSpec]:
    """Expands the B0 stage table into the scaled list of blocks.

    Block i of N survives stochastic depth with probability ``1 - drop_path_rate * i / N``
    (docs/reference.md §3: 0.2 in the official code).
    """
    repeats = stage_repeats(variant)
    total = sum(repeats)
    blocks = []
    in_ch = stem_channels(variant)
    for s, (stage, n) in enumerate(zip(B0_STAGES, repeats)):
        out_ch = round_filters(stage.out_channels, variant.width)
        for r in range(n):
            i = len(blocks)
            se = max(1, int(in_ch * stage.se_ratio)) if variant.use_se else 0
            blocks.append(
                BlockSpec(
                    index=i,
                    stage=s,
                    kernel=stage.kernel,
                    stride=stage.stride if r == 0 else 1,
                    expand=stage.expand,
                    in_channels=in_ch,
                    out_channels=out_ch,
                    se_channels=se,
                    survival=1.0 - drop_path_rate * i / total,
                )
            )
            in_ch = out_ch
    return blocks


def endpoint_blocks(blocks: list[BlockSpec]) -> dict[int, str]:
    """Maps the index of the last block at each stride to 'reduction_k' (EfficientDet naming).

    The stem gives stride 2; each stride-2 block halves again. reduction_k is the output of the
    last block computed at stride 2**k, so reduction_1..5 sit at strides 2, 4, 8, 16 and 32.
    """
    out = {}
    for b in blocks:
        nxt = blocks[b.index + 1] if b.index + 1 < len(blocks) else None
        if nxt is None or nxt.stride > 1:
            out[b.index] = f'reduction_{len(out) + 1}'
    return out
