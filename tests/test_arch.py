"""efficientnet/arch.py: the stage table, the variants and the scaling rules against the
paper's and the official builder's numbers (channels, repeats, blocks, parameter counts)."""

import math

import jax
import jax.numpy as jnp
import pytest

import efficientnet
from efficientnet import arch

# docs/reference.md §1: (stem, stage out-channels, head, repeats, blocks, params).
REFERENCE_TABLE = {
    'b0': (32, (16, 24, 40, 80, 112, 192, 320), 1280, (1, 2, 2, 3, 3, 4, 1), 16, 5_288_548),
    'b1': (32, (16, 24, 40, 80, 112, 192, 320), 1280, (2, 3, 3, 4, 4, 5, 2), 23, 7_794_184),
    'b2': (32, (16, 24, 48, 88, 120, 208, 352), 1408, (2, 3, 3, 4, 4, 5, 2), 23, 9_109_994),
    'b3': (40, (24, 32, 48, 96, 136, 232, 384), 1536, (2, 3, 3, 5, 5, 6, 2), 26, 12_233_232),
    'b4': (48, (24, 32, 56, 112, 160, 272, 448), 1792, (2, 4, 4, 6, 6, 8, 2), 32, 19_341_616),
    'b5': (48, (24, 40, 64, 128, 176, 304, 512), 2048, (3, 5, 5, 7, 7, 9, 3), 39, 30_389_784),
    'b6': (56, (32, 40, 72, 144, 200, 344, 576), 2304, (3, 6, 6, 8, 8, 11, 3), 45, 43_040_704),
    'b7': (64, (32, 48, 80, 160, 224, 384, 640), 2560, (4, 7, 7, 10, 10, 13, 4), 55, 66_347_960),
    'b8': (72, (32, 56, 88, 176, 248, 424, 704), 2816, (4, 8, 8, 11, 11, 15, 4), 61, 87.4e6),
    'l2': (136, (72, 104, 176, 344, 480, 824, 1376), 5504, (6, 11, 11, 16, 16, 22, 6), 88, 480.3e6),
}
REFERENCE_SCALING = {  # (width, depth, resolution, dropout)
    'b0': (1.0, 1.0, 224, 0.2),
    'b1': (1.0, 1.1, 240, 0.2),
    'b2': (1.1, 1.2, 260, 0.3),
    'b3': (1.2, 1.4, 300, 0.3),
    'b4': (1.4, 1.8, 380, 0.4),
    'b5': (1.6, 2.2, 456, 0.4),
    'b6': (1.8, 2.6, 528, 0.5),
    'b7': (2.0, 3.1, 600, 0.5),
    'b8': (2.2, 3.6, 672, 0.5),
    'l2': (4.3, 5.3, 800, 0.5),
    'lite0': (1.0, 1.0, 224, 0.2),
    'lite1': (1.0, 1.1, 240, 0.2),
    'lite2': (1.1, 1.2, 260, 0.3),
    'lite3': (1.2, 1.4, 280, 0.3),
    'lite4': (1.4, 1.8, 300, 0.3),
}


def param_count(model, res=32):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, res, res, 3))))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes['params']))


@pytest.mark.parametrize('name', list(REFERENCE_TABLE))
def test_architecture_table(name):
    stem, outs, head, repeats, blocks, params = REFERENCE_TABLE[name]
    v = arch.get_variant(name)
    assert (v.width, v.depth, v.resolution, v.dropout) == REFERENCE_SCALING[name]
    assert arch.stem_channels(v) == stem
    assert arch.head_channels(v) == head
    assert tuple(arch.stage_repeats(v)) == repeats
    specs = arch.build_blocks(v)
    assert len(specs) == blocks
    assert tuple(sorted({b.out_channels for b in specs})) == tuple(sorted(outs))
    got = param_count(efficientnet.create_model(name))
    if isinstance(params, int):
        assert got == params  # exact, B0-B7
    else:
        assert abs(got - params) / params < 0.001  # docs/reference.md §1 gives B8 and L2 to 0.1M


def test_b0_block_table_and_se_channels():
    specs = arch.build_blocks(arch.get_variant('b0'))
    stage_first = {}
    for b in specs:
        stage_first.setdefault(b.stage, b)
    # docs/reference.md §2: kernel, stride, expand, in, out of each stage's first block.
    table = [
        (3, 1, 1, 32, 16),
        (3, 2, 6, 16, 24),
        (5, 2, 6, 24, 40),
        (3, 2, 6, 40, 80),
        (5, 1, 6, 80, 112),
        (5, 2, 6, 112, 192),
        (3, 1, 6, 192, 320),
    ]
    for s, row in enumerate(table):
        b = stage_first[s]
        assert (b.kernel, b.stride, b.expand, b.in_channels, b.out_channels) == row
    for b in specs:
        if b is not stage_first[b.stage]:
            assert b.stride == 1 and b.in_channels == b.out_channels and b.has_residual
    # SE reduces from the block's *input* channels: stage 2 block 1 has 16 in, 96 expanded, r=4.
    b = stage_first[1]
    assert (b.in_channels, b.expanded_channels, b.se_channels) == (16, 96, 4)
    assert specs[0].se_channels == 8


def test_round_filters_formula():
    assert arch.round_filters(32, 1.0) == 32
    assert arch.round_filters(32, 1.1) == 32  # 35.2 -> 32 (not below 0.9 * 35.2)
    assert arch.round_filters(40, 1.1) == 48  # 44 -> int(48) // 8 * 8 = 48
    assert arch.round_filters(24, 1.4) == 32  # 33.6 -> 32
    assert arch.round_filters(1280, 4.3) == 5504
    assert arch.round_filters(16, 0.1) == 8  # floor at the divisor
    assert arch.round_filters(12, 1.0) == 16  # 12 -> 16 rounds half up
    assert arch.round_repeats(3, 1.1) == 4 and arch.round_repeats(1, 3.1) == 4


def test_lite_variants():
    for i, (params_m, res) in enumerate(
        [(4.652008, 224), (None, 240), (None, 260), (None, 280), (13.006568, 300)]
    ):
        v = arch.get_variant(f'lite{i}')
        assert v.activation == 'relu6' and not v.use_se and v.resolution == res
        assert arch.stem_channels(v) == 32 and arch.head_channels(v) == 1280
        reps = arch.stage_repeats(v)
        assert reps[0] == 1 and reps[-1] == 1  # first and last stages unscaled
        assert all(b.se_channels == 0 for b in arch.build_blocks(v))
        if params_m:  # docs/reference.md §1: lite0 4.7M, lite4 13.0M
            assert round(param_count(efficientnet.create_model(f'lite{i}')) / 1e6, 1) == round(
                params_m, 1
            )
    assert efficientnet.model_info('lite0')['mean'] == (127.0,) * 3
    assert efficientnet.model_info('lite0')['std'] == (128.0,) * 3


def test_stochastic_depth_ramp():
    specs = arch.build_blocks(arch.get_variant('b0'))
    n = len(specs)
    for b in specs:
        assert b.survival == pytest.approx(1 - 0.2 * b.index / n)
    assert specs[0].survival == 1.0
    assert specs[-1].survival == pytest.approx(0.8125)
    b7 = arch.build_blocks(arch.get_variant('b7'))
    assert b7[-1].survival == pytest.approx(1 - 0.2 * 54 / 55)
