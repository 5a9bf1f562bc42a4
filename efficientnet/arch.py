"""EfficientNet architectures as data: the stage tables, the variants, and the scaling rules.

Everything here is plain Python; the Flax modules only read the ``BlockSpec`` list that
``build_blocks`` returns. EfficientNet (V1) and Lite numbers follow docs/reference.md §1-3 (the
official tensorflow/tpu builders); EfficientNetV2 follows docs/models.md (the official
google/automl ``efficientnetv2`` builder, which keras.applications and timm reproduce).
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
    """One row of a stage table (docs/reference.md §2, docs/models.md)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int
    se_ratio: float = 0.25
    # Fused-MBConv (EfficientNetV2): one k x k convolution (with the stride) replaces the 1x1
    # expansion and the depthwise convolution; with expand 1 it is the only convolution.
    fused: bool = False


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


def _fused(repeats: int, expand: int, stride: int, cin: int, cout: int) -> StageSpec:
    """A Fused-MBConv stage of EfficientNetV2: 3x3, no squeeze-excite."""
    return StageSpec(repeats, 3, stride, expand, cin, cout, se_ratio=0.0, fused=True)


def _mbconv(repeats: int, expand: int, stride: int, cin: int, cout: int) -> StageSpec:
    """An MBConv stage of EfficientNetV2: 3x3 depthwise, squeeze-excite 0.25."""
    return StageSpec(repeats, 3, stride, expand, cin, cout)


# EfficientNetV2 (google/automl efficientnetv2/effnetv2_configs.py; docs/models.md). The base
# table is scaled by width/depth into V2-B0..B3; S, M, L and XL are written out in full and built
# unscaled. The stem is the first stage's input width, the head 1280 (both width-scaled).
V2_BASE_STAGES: tuple[StageSpec, ...] = (
    _fused(1, 1, 1, 32, 16),
    _fused(2, 4, 2, 16, 32),
    _fused(2, 4, 2, 32, 48),
    _mbconv(3, 4, 2, 48, 96),
    _mbconv(5, 6, 1, 96, 112),
    _mbconv(8, 6, 2, 112, 192),
)
V2_S_STAGES: tuple[StageSpec, ...] = (
    _fused(2, 1, 1, 24, 24),
    _fused(4, 4, 2, 24, 48),
    _fused(4, 4, 2, 48, 64),
    _mbconv(6, 4, 2, 64, 128),
    _mbconv(9, 6, 1, 128, 160),
    _mbconv(15, 6, 2, 160, 256),
)
V2_M_STAGES: tuple[StageSpec, ...] = (
    _fused(3, 1, 1, 24, 24),
    _fused(5, 4, 2, 24, 48),
    _fused(5, 4, 2, 48, 80),
    _mbconv(7, 4, 2, 80, 160),
    _mbconv(14, 6, 1, 160, 176),
    _mbconv(18, 6, 2, 176, 304),
    _mbconv(5, 6, 1, 304, 512),
)
V2_L_STAGES: tuple[StageSpec, ...] = (
    _fused(4, 1, 1, 32, 32),
    _fused(7, 4, 2, 32, 64),
    _fused(7, 4, 2, 64, 96),
    _mbconv(10, 4, 2, 96, 192),
    _mbconv(19, 6, 1, 192, 224),
    _mbconv(25, 6, 2, 224, 384),
    _mbconv(7, 6, 1, 384, 640),
)
V2_XL_STAGES: tuple[StageSpec, ...] = (
    _fused(4, 1, 1, 32, 32),
    _fused(8, 4, 2, 32, 64),
    _fused(8, 4, 2, 64, 96),
    _mbconv(16, 4, 2, 96, 192),
    _mbconv(24, 6, 1, 192, 256),
    _mbconv(32, 6, 2, 256, 512),
    _mbconv(8, 6, 1, 512, 640),
)

# A variant names its table (Variant.table).
STAGE_TABLES: dict[str, tuple[StageSpec, ...]] = {
    'b0': B0_STAGES,
    'v2-base': V2_BASE_STAGES,
    'v2-s': V2_S_STAGES,
    'v2-m': V2_M_STAGES,
    'v2-l': V2_L_STAGES,
    'v2-xl': V2_XL_STAGES,
}
# The eval preprocessing a variant's published weights expect (Variant.preprocessing):
# (normalisation name in efficientnet.normalization, resize interpolation).
# 'v1': ImageNet mean/std, bicubic, centre crop S / (S + 32) (EfficientNet and V2-B0..B3);
# 'lite': (x - 127) / 128, bilinear, the same crop;
# 'v2': (x - 128) / 128, bilinear, the crop only below 320 px (V2-S/M/L/XL; above it the whole
# image is resized).
PREPROCESSING = {
    'v1': ('imagenet', 'bicubic'),
    'lite': ('lite', 'bilinear'),
    'v2': ('v2', 'bilinear'),
}
V2_CROP_BELOW = 320


@dataclasses.dataclass(frozen=True)
class Variant:
    """A member of the family: the compound-scaling record plus the family's block flavour."""

    name: str
    width: float
    depth: float
    resolution: int  # the native (eval) size
    dropout: float
    family: str = 'efficientnet'  # 'efficientnet', 'lite' or 'efficientnetv2'
    table: str = 'b0'  # the stage table (STAGE_TABLES) that width and depth scale
    preprocessing: str = ''  # a PREPROCESSING key; '' is the family's ('lite' or 'v1')
    # The final training size of the official recipe when it differs from ``resolution``
    # (EfficientNetV2 trains smaller than it evaluates); None: ``resolution``.
    train_resolution: int | None = None

    @property
    def is_lite(self) -> bool:
        return self.family == 'lite'

    @property
    def is_v2(self) -> bool:
        return self.family == 'efficientnetv2'

    @property
    def stages(self) -> tuple[StageSpec, ...]:
        return STAGE_TABLES[self.table]

    @property
    def activation(self) -> str:
        return 'relu6' if self.is_lite else 'swish'

    @property
    def use_se(self) -> bool:
        """Squeeze-excite where the stage table asks for it (never in Lite)."""
        return not self.is_lite

    @property
    def round_limit(self) -> float:
        """round_filters' guard: V1 rounds up a width rounded below 90% of its target; V2's
        builder has no such guard (it would make V2-B3's first stage 24 wide instead of 16)."""
        return 0.0 if self.is_v2 else 0.9

    @property
    def bn_momentum(self) -> float:
        """BatchNorm moving-average momentum of the official code: 0.99 (tensorflow/tpu), 0.9
        for V2 (automl hparams; the V2 paper says 0.99, its code and keras use 0.9)."""
        return 0.9 if self.is_v2 else 0.99

    @property
    def input_preprocessing(self) -> str:
        return self.preprocessing or ('lite' if self.is_lite else 'v1')

    @property
    def crop_fraction(self) -> float:
        """Eval centre-crop fraction S / (S + 32) (docs/reference.md §5); V2-S/M/L/XL take no
        crop at 320 px and above (1.0: the whole image is resized)."""
        if self.input_preprocessing == 'v2' and self.resolution >= V2_CROP_BELOW:
            return 1.0
        return self.resolution / (self.resolution + CROP_PADDING)

    @property
    def interpolation(self) -> str:
        """The resize the official evaluation uses: bicubic (V1, V2-B*), bilinear (Lite,
        V2-S/M/L/XL)."""
        return PREPROCESSING[self.input_preprocessing][1]

    @property
    def normalization(self) -> str:
        """The input contract: the name (in ``efficientnet.normalization.NORMALIZATIONS``) of
        the normalisation this variant's published weights expect on [0, 255] input."""
        return PREPROCESSING[self.input_preprocessing][0]

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
    # EfficientNetV2 (docs/models.md): table, width, depth, eval size, train size, dropout,
    # preprocessing. B0-B3 scale the base table and keep V1's preprocessing.
    v2 = {
        'efficientnetv2-b0': ('v2-base', 1.0, 1.0, 224, 192, 0.2, 'v1'),
        'efficientnetv2-b1': ('v2-base', 1.0, 1.1, 240, 192, 0.2, 'v1'),
        'efficientnetv2-b2': ('v2-base', 1.1, 1.2, 260, 208, 0.3, 'v1'),
        'efficientnetv2-b3': ('v2-base', 1.2, 1.4, 300, 240, 0.3, 'v1'),
        'efficientnetv2-s': ('v2-s', 1.0, 1.0, 384, 300, 0.2, 'v2'),
        'efficientnetv2-m': ('v2-m', 1.0, 1.0, 480, 384, 0.3, 'v2'),
        'efficientnetv2-l': ('v2-l', 1.0, 1.0, 480, 384, 0.4, 'v2'),
        'efficientnetv2-xl': ('v2-xl', 1.0, 1.0, 512, 384, 0.4, 'v2'),
    }
    out = {n: Variant(n, *v) for n, v in table.items()}
    out.update({n: Variant(n, *v, family='lite') for n, v in lite.items()})
    for n, (tab, w, d, res, train_res, drop, pre) in v2.items():
        out[n] = Variant(n, w, d, res, drop, 'efficientnetv2', tab, pre, train_res)
    return out


VARIANTS: dict[str, Variant] = _variants()

# Test-only variants: the real block structure at a fraction of the cost, for fast tests and
# smoke runs. Reachable by name but not listed by list_models().
TEST_VARIANTS: dict[str, Variant] = {
    'efficientnet-tiny': Variant('efficientnet-tiny', 0.25, 0.5, 32, 0.1),
    'efficientnet-lite-tiny': Variant('efficientnet-lite-tiny', 0.25, 0.5, 32, 0.1, 'lite'),
    'efficientnetv2-tiny': Variant(
        'efficientnetv2-tiny', 0.25, 0.5, 32, 0.1, 'efficientnetv2', 'v2-base', 'v1'
    ),
}

# Short aliases: 'b0' == 'efficientnet-b0', 'lite0' == 'efficientnet-lite0',
# 'v2-s' == 'efficientnetv2-s'.
_ALIASES = {
    n.removeprefix('efficientnet-').removeprefix('efficientnet'): n
    for n in (*VARIANTS, *TEST_VARIANTS)
}


def list_models() -> list[str]:
    """Canonical names of every variant, in table order."""
    return list(VARIANTS)


def get_variant(name: str) -> Variant:
    """Looks a variant up by name or short alias ('b4', 'lite0'); ValueError if unknown."""
    if not isinstance(name, str):
        raise TypeError(f'model name must be a string, got {type(name).__name__}')
    key = name.strip().lower().replace('_', '-')
    # timm's spellings: 'efficientnet_v2_s', 'tf_efficientnetv2_s'.
    key = key.removeprefix('tf-').replace('efficientnet-v2', 'efficientnetv2')
    key = _ALIASES.get(key, key)
    if key in TEST_VARIANTS:
        return TEST_VARIANTS[key]
    if key not in VARIANTS:
        raise ValueError(
            f'unknown EfficientNet variant {name!r}; valid names: {", ".join(list_models())} '
            f'(short forms such as "b0", "lite0" or "v2-s" work too)'
        )
    return VARIANTS[key]


def round_filters(channels: int, width: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Scales a channel count by ``width`` and rounds to a multiple of ``divisor``
    (docs/reference.md §3). A result below ``round_limit`` times the target gains one more
    ``divisor`` (V1's guard; V2 passes 0: no guard, ``Variant.round_limit``)."""
    f = channels * width
    new = max(divisor, int(f + divisor / 2) // divisor * divisor)
    if new < round_limit * f:  # V1: never round down by more than 10%
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    """Scales a stage's repeat count by ``depth``, rounding up (docs/reference.md §3)."""
    return int(math.ceil(depth * repeats))


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One MBConv or Fused-MBConv block after scaling, with its position in the network."""

    index: int  # 0-based over all blocks
    stage: int  # 0-based stage
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int
    se_channels: int  # 0 means no squeeze-excite
    survival: float  # stochastic-depth survival probability (1.0 for block 0)
    fused: bool = False  # Fused-MBConv (StageSpec.fused)

    @property
    def expanded_channels(self) -> int:
        return self.in_channels * self.expand

    @property
    def has_residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


def _round(variant: Variant, channels: int) -> int:
    return round_filters(channels, variant.width, round_limit=variant.round_limit)


def stem_channels(variant: Variant) -> int:
    """The first stage's input width, scaled (Lite keeps 32)."""
    stem = variant.stages[0].in_channels
    return stem if variant.is_lite else _round(variant, stem)


def head_channels(variant: Variant) -> int:
    return B0_HEAD if variant.is_lite else _round(variant, B0_HEAD)


def stage_repeats(variant: Variant) -> list[int]:
    """Repeats per stage; Lite keeps the first and last stages unscaled."""
    stages = variant.stages
    out = []
    for i, stage in enumerate(stages):
        fixed = variant.is_lite and i in (0, len(stages) - 1)
        out.append(stage.repeats if fixed else round_repeats(stage.repeats, variant.depth))
    return out


def build_blocks(variant: Variant, drop_path_rate: float = DROP_PATH_RATE) -> list[BlockSpec]:
    """Expands the variant's stage table into the scaled list of blocks.

    Block i of N survives stochastic depth with probability ``1 - drop_path_rate * i / N``
    (docs/reference.md §3: 0.2 in the official code).
    """
    repeats = stage_repeats(variant)
    total = sum(repeats)
    blocks = []
    in_ch = stem_channels(variant)
    for s, (stage, n) in enumerate(zip(variant.stages, repeats)):
        out_ch = _round(variant, stage.out_channels)
        for r in range(n):
            i = len(blocks)
            use_se = variant.use_se and stage.se_ratio > 0
            se = max(1, int(in_ch * stage.se_ratio)) if use_se else 0
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
                    fused=stage.fused,
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
