"""Config validation and derived values (training/config_resolve.py): every problem reported
at once, in one line each, before anything compiles; derived values follow overrides."""

import pytest

from configs import smoke
from training.config_resolve import ConfigError, resolve


def _resolve(**changes):
    c = smoke.get_config()
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split('.')
        for name in parents:
            node = node[name]
        node[leaf] = value
    return resolve(c, device_count=8)


@pytest.mark.parametrize(
    'changes,message',
    [
        ({'batch_size': -16}, 'config.batch_size must be a positive integer, got -16'),
        ({'batch_size': 0}, 'config.batch_size must be a positive integer, got 0'),
        ({'batch_size': 12}, 'not divisible by the 8 devices'),
        ({'eval_batch_size': 20}, 'config.eval_batch_size=20 is not divisible by the 8 devices'),
        ({'model.bn_group_size': 5}, 'bn_group_size=5 must be a positive divisor'),
        (
            {'model.bn_group_size': None, 'model.bn_tpu_cores': 3},
            'config.model.bn_tpu_cores=3: batch 16 does not split evenly over 3 TPU cores',
        ),
        (
            {'model.bn_group_size': None, 'model.bn_tpu_cores': 1, 'optim.grad_accum_steps': 2},
            'the BatchNorm group of 16 examples (config.model.bn_tpu_cores=1 at '
            'config.batch_size=16) does not divide the batch per step (8)',
        ),
        ({'model.name': 'efficientnet-b9'}, "unknown EfficientNet variant 'efficientnet-b9'"),
        ({'data.name': 'imagenet2012', 'data.data_dir': '/nonexistent/tfds'}, 'imagenet2012'),
        ({'data.num_classes': 7, 'data.name': 'fake'}, None),
    ],
)
def test_bad_configs_raise_clear_errors(changes, message):
    if message is None:  # the fake dataset takes its class count from the config: valid
        assert _resolve(**changes).num_classes == 7
        return
    with pytest.raises(ConfigError, match='invalid config') as e:
        _resolve(**changes)
    assert message in str(e.value)


def test_derived_values_follow_command_line_overrides():
    plan = _resolve(batch_size=32, **{'optim.warmup_epochs': 1.0})
    assert plan.learning_rate == pytest.approx(0.016 * 32 / 256)
    assert plan.bn_group_size == 8  # smoke's explicit group
    # The official groups on 2 cores: each core's half of the batch, following the batch.
    cores = {'model.bn_group_size': None, 'model.bn_tpu_cores': 2}
    assert _resolve(batch_size=32, **cores).bn_group_size == 16
    assert _resolve(batch_size=64, **cores).bn_group_size == 32
    assert _resolve(batch_size=32, **{'model.bn_tpu_cores': 2}).bn_group_size == 8  # set wins
    assert _resolve(**{'model.bn_group_size': None}).bn_group_size is None  # the whole batch
    assert plan.steps_per_epoch == 2 and plan.warmup_steps == 2 and plan.total_steps == 4
    plan = _resolve(**{'optim.grad_accum_steps': 2})
    assert plan.micro_batch == 8 and plan.total_micro_steps == 2 * plan.total_steps


@pytest.mark.parametrize(
    'model,normalization,expected',
    [
        ('efficientnet-b0', None, 'imagenet'),
        ('efficientnet-lite0', None, 'lite'),
        ('efficientnet-lite0', 'advprop', 'advprop'),
    ],
)
def test_normalization_defaults_to_the_variants_own(model, normalization, expected):
    plan = _resolve(**{'model.name': model, 'data.normalization': normalization})
    assert plan.normalization == expected
