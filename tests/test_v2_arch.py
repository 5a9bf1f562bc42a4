"""EfficientNetV2 as data (efficientnet/arch.py, model.py, summary.py): block tables, widths,
parameter, BatchNorm-statistic and multiply-add counts against timm's tf_efficientnetv2_*
(built live on torch's meta device, which allocates nothing) and against figures measured from
keras.applications EfficientNetV2* and timm (written here as independent facts), plus the
input contract of every V2 variant.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficientnet
from efficientnet import arch, normalization
from efficientnet.summary import PAPER, count_flops
from scripts.timm_import import import_timm

# The official builder's tables after scaling (google/automl efficientnetv2): stem, (out
# channels, repeats) per stage, head, blocks. B3's first stage is 16 wide: V2 has no V1
# "round up when below 90%" guard, which would make it 24.
TABLES = {
    'b0': (32, ((16, 1), (32, 2), (48, 2), (96, 3), (112, 5), (192, 8)), 1280, 21),
    'b1': (32, ((16, 2), (32, 3), (48, 3), (96, 4), (112, 6), (192, 9)), 1280, 27),
    'b2': (32, ((16, 2), (32, 3), (56, 3), (104, 4), (120, 6), (208, 10)), 1408, 28),
    'b3': (40, ((16, 2), (40, 3), (56, 3), (112, 5), (136, 7), (232, 12)), 1536, 32),
    's': (24, ((24, 2), (48, 4), (64, 4), (128, 6), (160, 9), (256, 15)), 1280, 40),
    'm': (24, ((24, 3), (48, 5), (80, 5), (160, 7), (176, 14), (304, 18), (512, 5)), 1280, 57),
    'l': (32, ((32, 4), (64, 7), (96, 7), (192, 10), (224, 19), (384, 25), (640, 7)), 1280, 79),
    'xl': (32, ((32, 4), (64, 8), (96, 8), (192, 16), (256, 24), (512, 32), (640, 8)), 1280, 100),
}  # fmt: skip
# Measured from keras.applications (trainable weights; its non-trainable count equals timm's
# BatchNorm buffers) and from timm (parameters, running mean/var), which agree exactly; XL from
# timm only (keras has no XL). Multiply-adds at the eval size from torch's FlopCounterMode over
# timm, confirmed by an analytic count over the keras layers.
MEASURED = {  # params, BatchNorm statistics, GMACs at the eval size
    'b0': (7_139_704, 60_608, 0.718),
    'b1': (8_141_052, 71_072, 1.197),
    'b2': (10_096_086, 82_288, 1.698),
    'b3': (14_358_406, 109_216, 3.011),
    's': (21_458_488, 153_872, 8.366),
    'm': (54_139_356, 292_032, 24.582),
    'l': (118_515_272, 512_576, 56.080),
    'xl': (208_119_808, 777_024, 93.353),
}
# Eval size, official training size, dropout, normalisation, interpolation, crop fraction.
CONTRACT = {
    'b0': (224, 192, 0.2, 'imagenet', 'bicubic', 224 / 256),
    'b1': (240, 192, 0.2, 'imagenet', 'bicubic', 240 / 272),
    'b2': (260, 208, 0.3, 'imagenet', 'bicubic', 260 / 292),
    'b3': (300, 240, 0.3, 'imagenet', 'bicubic', 300 / 332),
    's': (384, 300, 0.2, 'v2', 'bilinear', 1.0),
    'm': (480, 384, 0.3, 'v2', 'bilinear', 1.0),
    'l': (480, 384, 0.4, 'v2', 'bilinear', 1.0),
    'xl': (512, 384, 0.4, 'v2', 'bilinear', 1.0),
}


def ours(name: str) -> tuple[int, int]:
    """(parameters, BatchNorm statistics) of create_model(name), from shapes only."""
    model = efficientnet.create_model(f'v2-{name}', depthwise_impl='xla')
    tree = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return tuple(
        sum(math.prod(x.shape) for x in jax.tree.leaves(tree[c])) for c in ('params', 'batch_stats')
    )


def timm_meta(name: str):
    import torch

    timm = import_timm()
    with torch.device('meta'):
        return timm.create_model(f'tf_efficientnetv2_{name}', pretrained=False).eval()


def timm_counts(net) -> tuple[int, int]:
    params = sum(p.numel() for p in net.parameters())
    stats = sum(b.numel() for n, b in net.named_buffers() if n.endswith(('mean', 'var')))
    return params, stats


def timm_macs(net, res: int) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.zeros(1, 3, res, res, device='meta'))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize('name', list(TABLES))
def test_block_table(name):
    stem, stages, head, n = TABLES[name]
    v = arch.get_variant(f'efficientnetv2-{name}')
    assert v.is_v2 and v.round_limit == 0.0 and v.bn_momentum == 0.9
    assert arch.stem_channels(v) == stem and arch.head_channels(v) == head
    blocks = arch.build_blocks(v)
    assert len(blocks) == n
    assert tuple(arch.stage_repeats(v)) == tuple(r for _, r in stages)
    for s, (out, _) in enumerate(stages):
        assert {b.out_channels for b in blocks if b.stage == s} == {out}
    # The first three stages are Fused-MBConv without squeeze-excite, the rest MBConv with it.
    assert all(b.fused == (b.stage < 3) for b in blocks)
    assert all((b.se_channels > 0) == (not b.fused) for b in blocks)
    assert blocks[-1].survival == pytest.approx(1 - 0.2 * (n - 1) / n)  # N after depth scaling


@pytest.mark.parametrize('name', list(TABLES))
def test_counts_match_keras_and_timm(name):
    params, stats, gmacs = MEASURED[name]
    assert ours(name) == (params, stats)
    net = timm_meta(name)
    assert timm_counts(net) == (params, stats)
    res = arch.get_variant(f'v2-{name}').resolution
    macs = count_flops(f'v2-{name}')
    assert macs == timm_macs(net, res)  # the same network, multiply-add for multiply-add
    assert round(macs / 1e9, 3) == gmacs
    if name == 'b0':  # an odd size: TF SAME's ceil(size / stride) at every stride
        assert count_flops('v2-b0', resolution=193) == timm_macs(net, 193)


def test_published_figures():
    """Ours beside the published ones (summary.PAPER): V2-B0..B3 to the README's digits; S, M
    and XL within the paper's rounding. L is 118.5M and 56.1B against the paper's 120M and
    53B: the official README says 119.5M and 56.3B, keras and timm both build 118.5M, so the
    paper's figures, not the network, are off."""
    for name in ('b0', 'b1', 'b2', 'b3'):
        params, _, gmacs = MEASURED[name]
        paper_m, paper_b, _ = PAPER[f'efficientnetv2-{name}']
        assert round(params / 1e6, 1) == paper_m
        assert round(gmacs, len(str(paper_b).split('.')[1])) == paper_b
    for name in ('s', 'm', 'xl'):
        params, _, gmacs = MEASURED[name]
        paper_m, paper_b, _ = PAPER[f'efficientnetv2-{name}']
        assert abs(params / 1e6 / paper_m - 1) < 0.03
        assert abs(gmacs / paper_b - 1) < 0.05  # S: 8.37 against 8.8 (README: 8.4)
    assert 0.98 < MEASURED['l'][0] / 1e6 / PAPER['efficientnetv2-l'][0] < 0.99


def test_v1_rounding_guard_would_change_b3():
    assert arch.round_filters(16, 1.2, round_limit=0.0) == 16  # 19.2 rounds down
    assert arch.round_filters(16, 1.2) == 24  # V1's guard: 16 < 0.9 * 19.2
    assert arch.build_blocks(arch.get_variant('v2-b3'))[0].out_channels == 16


def test_block_details():
    s = arch.build_blocks(arch.get_variant('v2-s'))
    # Stage 1 of S is 24 -> 24 Fused-MBConv without expansion: every block keeps its shape and
    # has the skip; in B0 its one block goes 32 -> 16 and has none.
    assert all(b.fused and b.expand == 1 and b.has_residual for b in s if b.stage == 0)
    b0 = arch.build_blocks(arch.get_variant('v2-b0'))
    assert (b0[0].in_channels, b0[0].out_channels, b0[0].has_residual) == (32, 16, False)
    # Squeeze-excite reduces from the block's input width: stage 4 of S, 64 -> 16, then 32.
    stage4 = [b for b in s if b.stage == 3]
    assert (stage4[0].in_channels, stage4[0].se_channels) == (64, 16)
    assert {b.se_channels for b in stage4[1:]} == {32}
    assert (stage4[0].expanded_channels, stage4[0].stride) == (256, 2)


@pytest.mark.parametrize('name', list(CONTRACT))
def test_input_contract(name):
    res, train_res, dropout, norm, interp, crop = CONTRACT[name]
    info = efficientnet.model_info(f'efficientnetv2-{name}')
    assert (info['resolution'], info['train_resolution'], info['dropout']) == (
        res,
        train_res,
        dropout,
    )
    assert (info['normalization'], info['interpolation']) == (norm, interp)
    assert info['crop_fraction'] == pytest.approx(crop)
    assert (info['mean'], info['std']) == normalization.NORMALIZATIONS[norm]


def test_v2_normalization_is_minus_128_over_128():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    got = normalization.normalize_images(jnp.asarray(pixels), 'v2')
    np.testing.assert_array_equal(np.asarray(got), (pixels.astype(np.float32) - 128) / 128)


def test_names_and_aliases():
    v2 = [n for n in efficientnet.list_models() if n.startswith('efficientnetv2-')]
    assert v2 == [f'efficientnetv2-{n}' for n in TABLES]
    for alias in ('v2-s', 'V2_S', 'efficientnet_v2_s', 'tf_efficientnetv2_s'):
        assert arch.get_variant(alias).name == 'efficientnetv2-s'
    tiny = efficientnet.create_model('v2-tiny')
    assert tiny.variant.name not in efficientnet.list_models() and tiny.variant.is_v2
    with pytest.raises(ValueError, match='v2-s'):
        arch.get_variant('efficientnetv2-xxl')


def test_training_mode_and_remat():
    """Training mode (batch statistics, dropout, stochastic depth) through every block kind:
    BatchNorm moving averages with V2's momentum 0.9, checked on the stem, whose batch
    statistics are computed here with lax; remat keeps the parameter tree."""
    model = efficientnet.create_model('v2-tiny', num_classes=4, depthwise_impl='xla')
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    logits, new = jax.jit(
        lambda v: model.apply(
            v, x, train=True, rngs={'dropout': jax.random.key(1)}, mutable=['batch_stats']
        )
    )(variables)
    assert np.all(np.isfinite(logits))
    stem = jax.lax.conv_general_dilated(
        x,
        variables['params']['stem_conv']['kernel'],
        (2, 2),
        [(0, 1), (0, 1)],  # TF SAME at 32 px, stride 2: the extra pixel bottom/right
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        precision='highest',
    )
    batch_mean = np.asarray(stem).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(
        new['batch_stats']['stem_bn']['mean'], 0.1 * batch_mean, rtol=1e-4, atol=1e-6
    )
    remat = efficientnet.create_model('v2-tiny', num_classes=4, remat=True)
    shapes = jax.eval_shape(remat.init, jax.random.key(0), x)
    assert jax.tree.structure(shapes) == jax.tree.structure(variables)
