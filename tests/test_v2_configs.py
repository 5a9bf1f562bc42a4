"""configs/v2_*.py against the official EfficientNetV2 recipe, and training/progressive.py's
stage values against the official code's schedule and the paper's Table 6, written here as
independent facts (google/automl efficientnetv2 effnetv2_configs.py, hparams.py, main_tf2.py;
the paper's Algorithm 1). The configs load as train.py loads them (tests/test_configs.py also
resolves every config file, these included)."""

import pytest

from tests.test_configs import DEVICE_COUNT, dataset_info, load
from training import progressive
from training.config_resolve import resolve

# Eval size, dropout, augmentation, final RandAugment magnitude, final MixUp = CutMix alpha.
RECIPE = {
    'b0': (224, 0.2, 'autoaugment', None, 0.0),
    'b1': (240, 0.2, 'autoaugment', None, 0.0),
    'b2': (260, 0.3, 'autoaugment', None, 0.0),
    'b3': (300, 0.3, 'autoaugment', None, 0.0),
    's': (384, 0.2, 'randaugment', 10, 0.0),
    'm': (480, 0.3, 'randaugment', 15, 0.2),
    'l': (480, 0.4, 'randaugment', 20, 0.5),
    'xl': (512, 0.4, 'randaugment', 20, 0.5),
}
# The official code's stage sizes: int(128 + (train size - 128) * (k + 1) / 4).
OFFICIAL_SIZES = {
    'b0': (144, 160, 176, 192),
    'b1': (144, 160, 176, 192),
    'b2': (148, 168, 188, 208),
    'b3': (156, 184, 212, 240),
    's': (171, 214, 257, 300),
    'm': (192, 256, 320, 384),
    'l': (192, 256, 320, 384),
    'xl': (192, 256, 320, 384),
}
STAGE_EPOCHS = ((0, 87), (87, 175), (175, 262), (262, 350))
# The paper's Table 6, (min, max): size, RandAugment magnitude, MixUp alpha, dropout; and the
# per-stage values of Algorithm 1 (linspace over 4 stages).
TABLE6 = {
    's': ((128, 300), (5, 15), (0, 0), (0.1, 0.3)),
    'm': ((128, 380), (5, 20), (0, 0.2), (0.1, 0.4)),
    'l': ((128, 380), (5, 25), (0, 0.4), (0.1, 0.5)),
}
PAPER_STAGES = {
    's': ((128, 185, 243, 300), (5, 8.333, 11.667, 15), (0.1, 0.1667, 0.2333, 0.3)),
    'm': ((128, 212, 296, 380), (5, 10, 15, 20), (0.1, 0.2, 0.3, 0.4)),
}


@pytest.mark.parametrize('name', list(RECIPE))
def test_v2_config_is_the_official_recipe(name):
    res, dropout, augment, magnitude, alpha = RECIPE[name]
    config = load(f'v2_{name}.py')
    assert config.model.name == f'efficientnetv2-{name}'
    assert (config.data.resolution, config.model.dropout_rate) == (res, dropout)
    assert config.data.augment == augment
    if magnitude is not None:
        assert config.data.randaugment_magnitude == magnitude
        assert config.data.randaugment_layers == 2
    assert config.data.mixup_alpha == config.data.cutmix_alpha == alpha
    assert config.data.normalization is None  # the variant's own (efficientnet.arch)
    if name in ('s', 'm', 'l', 'xl'):
        assert (config.data.interpolation, config.data.crop_fraction) == ('bilinear', 1.0)
    else:
        assert (config.data.interpolation, config.data.crop_fraction) == ('bicubic', None)
    plan = resolve(config, device_count=DEVICE_COUNT, dataset_info_fn=dataset_info)
    assert plan.learning_rate == pytest.approx(0.256)  # 0.016 per 256 at batch 4096
    assert (plan.steps_per_epoch, plan.warmup_steps) == (312, 1560)
    assert config.optim.decay_factor == 0.97 and config.optim.decay_epochs == 2.4
    assert (config.ema_decay, config.label_smoothing, config.optim.weight_decay) == (
        0.9999,
        0.1,
        1e-5,
    )


@pytest.mark.parametrize('name', list(RECIPE))
def test_official_progressive_schedule(name):
    _, dropout, augment, magnitude, alpha = RECIPE[name]
    config = load(f'v2_{name}.py')
    stages = progressive.stage_values(config)
    assert tuple(s.resolution for s in stages) == OFFICIAL_SIZES[name]
    assert tuple((s.start_epoch, s.end_epoch) for s in stages) == STAGE_EPOCHS
    want_mix = [alpha * k / 3 for k in range(4)]
    assert [s.mixup_alpha for s in stages] == pytest.approx(want_mix)
    assert [s.cutmix_alpha for s in stages] == pytest.approx(want_mix)
    assert all(s.dropout == dropout for s in stages)  # not scheduled by the official code
    if augment == 'randaugment':
        want = [5 + (magnitude - 5) * k / 3 for k in range(4)]  # linspace(5, max, 4)
        assert [s.randaugment_magnitude for s in stages] == pytest.approx(want)


@pytest.mark.parametrize('name', list(PAPER_STAGES))
def test_paper_rule_reproduces_algorithm_1(name):
    (r0, r1), (m0, m1), (a0, a1), (d0, d1) = TABLE6[name]
    overrides = [
        '--config.progressive.rule=paper',
        f'--config.progressive.min_resolution={r0}',
        f'--config.progressive.max_resolution={r1}',
        f'--config.progressive.min_randaugment_magnitude={m0}',
        f'--config.progressive.max_randaugment_magnitude={m1}',
        f'--config.progressive.min_mixup_alpha={a0}',
        f'--config.progressive.max_mixup_alpha={a1}',
        f'--config.progressive.min_dropout={d0}',
        f'--config.progressive.max_dropout={d1}',
    ]
    stages = progressive.stage_values(load(f'v2_{name}.py', *overrides))
    sizes, magnitudes, dropouts = PAPER_STAGES[name]
    assert tuple(s.resolution for s in stages) == sizes
    assert [s.randaugment_magnitude for s in stages] == pytest.approx(magnitudes, abs=1e-3)
    assert [s.dropout for s in stages] == pytest.approx(dropouts, abs=1e-4)


def test_one_stage_is_no_progression():
    config = load('b0.py')
    (stage,) = progressive.stage_values(config)
    assert (stage.resolution, stage.start_epoch, stage.end_epoch) == (224, 0, 350)
    assert stage.randaugment_magnitude == config.data.randaugment_magnitude
    assert stage.dropout == 0.2
    with pytest.raises(ValueError, match='rule must be one of'):
        progressive.stage_values(load('v2_s.py', '--config.progressive.rule=cosine'))
    with pytest.raises(ValueError, match='at most max_resolution'):
        progressive.stage_values(load('v2_s.py', '--config.progressive.min_resolution=400'))


def test_v2_finetune_config():
    config = load('v2_finetune.py', '--config.data.folder=/data', '--config.init_from=w.msgpack')
    assert config.model.name == 'efficientnetv2-s'
    assert (config.data.resolution, config.data.interpolation, config.data.crop_fraction) == (
        384,
        'bilinear',
        1.0,
    )
    assert (config.optim.name, config.num_epochs, config.model.drop_path_rate) == (
        'momentum',
        10.0,
        0.1,
    )
    assert config.init_from == 'w.msgpack'
    config.init_from = None  # resolve checks that the file exists (tests/test_faults_config.py)
    plan = resolve(config, device_count=DEVICE_COUNT, dataset_info_fn=dataset_info)
    assert plan.normalization == 'v2' and plan.num_classes == 5
