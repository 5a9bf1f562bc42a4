"""Every config file and sweep under configs/, loaded as train.py loads it and resolved; the
b0..b7 configs against the EfficientNet paper's table, written here as independent facts, and
their BatchNorm groups against the official TPU code's, reimplemented here from its source.

No dataset is read: ``dataset_info`` below gives each dataset's sizes (the fake dataset's come
from the config itself), and full-size models are traced with ``jax.eval_shape``, which
allocates nothing.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

import input_pipeline
from efficientnet import layers
from scripts import sweep
from training.config_model import official_bn_group_size
from training.config_resolve import build_model, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'configs')
SWEEPS = os.path.join(CONFIGS, 'sweeps')


def _py_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith('.py') and f != '__init__.py')


CONFIG_FILES = _py_files(CONFIGS)
# The config each sweep is written for (the one its docstring runs it with).
SWEEP_CONFIGS = {
    'finetune_lr.py': 'finetune.py',
    'progressive.py': 'v2_fashion.py',
    'smoke_grid.py': 'smoke.py',
    'smoke_random.py': 'smoke.py',
}
DEVICE_COUNT = 8

SIZES = {
    'imagenet2012': {'num_classes': 1000, 'num_train': 1_281_167, 'num_eval': 50_000},
    'fashion_mnist': {'num_classes': 10, 'num_train': 60_000, 'num_eval': 10_000},
    # A stand-in image folder for configs/finetune.py (tf_flowers' 3670 images, 20% held out).
    'folder': {'num_classes': 5, 'num_train': 2936, 'num_eval': 734},
}

# The paper's Table 1 and the official builder: native resolution, dropout before the
# classifier and trainable parameters with a 1000-class head. Stochastic depth (drop-connect)
# is 0.2 for every variant.
PAPER = {
    'b0': (224, 0.2, 5_288_548),
    'b1': (240, 0.2, 7_794_184),
    'b2': (260, 0.3, 9_109_994),
    'b3': (300, 0.3, 12_233_232),
    'b4': (380, 0.4, 19_341_616),
    'b5': (456, 0.4, 30_389_784),
    'b6': (528, 0.5, 43_040_704),
    'b7': (600, 0.5, 66_347_960),
}
DROP_PATH_RATE = 0.2
# The augmentation each published checkpoint was trained with: AutoAugment, except the
# RandAugment B5 and B7 (N=2 layers, magnitude M).
RANDAUGMENT_MAGNITUDE = {'b5': 17, 'b7': 28}


# The official runs: global batch 4096 on TPU v3, BatchNorm statistics over groups of at least
# 8 cores, about 1024 images per group.
OFFICIAL_BATCH, OFFICIAL_BN_GROUP = 4096, 1024


def dataset_info(data) -> dict:
    if data.name == 'fake':
        return input_pipeline.dataset_info(data)
    return SIZES[data.name]


def load(filename: str, *args: str):
    """The locked config train.py builds from ``--config=configs/<filename> ARGS``."""
    argv = ['train.py', f'--config={os.path.join(CONFIGS, filename)}', *args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        'config', None, 'config', flag_values=fv, lock_config=True, sys_argv=argv
    )
    flags.DEFINE_string('workdir', None, 'workdir', flag_values=fv)
    fv(argv)
    return fv.config


def param_count(config, num_classes: int) -> int:
    """Trainable parameters (not batch statistics) of the model the config builds."""
    model = build_model(config, num_classes)
    x = jnp.zeros((1, config.data.resolution, config.data.resolution, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    return sum(math.prod(p.shape) for p in jax.tree.leaves(shapes['params']))


@pytest.mark.parametrize('filename', CONFIG_FILES)
def test_config_resolves(filename):
    config = load(filename)
    plan = resolve(config, device_count=DEVICE_COUNT, dataset_info_fn=dataset_info)
    assert plan.total_steps > 0 and plan.micro_batch % DEVICE_COUNT == 0
    if config.data.name == 'imagenet2012':
        # The official recipe at batch 4096: 0.016 per 256 examples, 312 steps an epoch.
        assert plan.learning_rate == pytest.approx(0.256)
        assert (plan.steps_per_epoch, plan.warmup_steps, plan.total_steps) == (312, 1560, 109_200)
        assert plan.decay_steps == 749  # x 0.97 every 2.4 epochs: round(2.4 * 312)
        recipe = {
            'optim.name': 'rmsprop', 'optim.schedule': 'exponential', 'optim.decay_factor': 0.97,
            'optim.rmsprop_decay': 0.9, 'optim.momentum': 0.9, 'optim.rmsprop_epsilon': 1e-3,
            'optim.weight_decay': 1e-5, 'optim.weight_decay_mode': 'l2', 'label_smoothing': 0.1,
            'ema_decay': 0.9999,
        }  # fmt: skip
        for key, value in recipe.items():
            node = config
            for part in key.split('.'):
                node = node[part]
            assert node == value, key
        # float16 with loss scaling for GPUs without bfloat16 (configs/fp16.py)
        fp16 = config.loss_scale.mode == 'dynamic'
        assert config.model.compute_dtype == ('float16' if fp16 else 'bfloat16')


@pytest.mark.parametrize('filename', CONFIG_FILES)
def test_config_is_locked(filename):
    config = load(filename)
    with pytest.raises(AttributeError, match='batch_sise'):
        config.batch_sise = 1024
    with pytest.raises(AttributeError, match='dropout_rat'):
        config.model.dropout_rat = 0.1
    with pytest.raises(AttributeError, match='batch_sise'):  # train.py's command line
        load(filename, '--config.batch_sise=1024')


def test_every_sweep_has_its_config():
    assert sorted(SWEEP_CONFIGS) == _py_files(SWEEPS)


@pytest.mark.parametrize('filename', sorted(SWEEP_CONFIGS))
def test_sweep_runs_resolve(filename):
    config_path = os.path.join(CONFIGS, SWEEP_CONFIGS[filename])
    trials = sweep.load_sweep(os.path.join(SWEEPS, filename))
    sweep.check_overrides(sweep.load_config(config_path), trials)
    for trial in trials:
        # The overrides exactly as the sweep passes them to train.py.
        args = sweep.train_args(config_path, '/tmp/unused', trial)
        config = load(SWEEP_CONFIGS[filename], *args[2:])
        for key, value in trial.items():
            assert config[key] == value  # a dotted key reads the nested field
        resolve(config, device_count=DEVICE_COUNT, dataset_info_fn=dataset_info)


@pytest.mark.parametrize('name', list(PAPER))
def test_variant_config_matches_the_paper(name):
    resolution, dropout, params = PAPER[name]
    config = load(f'{name}.py')
    assert config.model.name == f'efficientnet-{name}'
    assert config.data.resolution == resolution
    assert config.model.dropout_rate == dropout
    assert config.model.drop_path_rate == DROP_PATH_RATE
    if name in RANDAUGMENT_MAGNITUDE:
        assert config.data.augment == 'randaugment'
        assert config.data.randaugment_layers == 2
        assert config.data.randaugment_magnitude == RANDAUGMENT_MAGNITUDE[name]
    else:
        assert config.data.augment == 'autoaugment'
    plan = resolve(config, device_count=DEVICE_COUNT, dataset_info_fn=dataset_info)
    assert plan.num_classes == 1000
    assert param_count(config, plan.num_classes) == params
    assert plan.global_batch == OFFICIAL_BATCH
    assert plan.bn_group_size == OFFICIAL_BN_GROUP
    assert build_model(config, plan.num_classes).bn_group_size == OFFICIAL_BN_GROUP


def official_tpu_batchnorm(x: np.ndarray, num_shards: int, epsilon: float = 1e-3) -> np.ndarray:
    """The training-mode output of tensorflow/tpu's ``TpuBatchNormalization`` (EfficientNet's
    utils.py, ``_moments`` and ``_cross_replica_average``) at scale 1 and offset 0, in numpy:
    the batch is split evenly over ``num_shards`` cores; each core takes its own moments; on
    more than 8 cores, replicas ``[[x for x in range(n) if x // k == y] for y in range(n // k)]``
    with ``k = max(8, n // 8)`` average their means and mean squares (a cross-replica sum
    divided by k), and the variance is E[x^2] - E[x]^2."""
    shards = np.split(x.astype(np.float64), num_shards)
    mean = [s.mean(axis=(0, 1, 2)) for s in shards]
    var = [s.var(axis=(0, 1, 2)) for s in shards]
    k = 1 if num_shards <= 8 else max(8, num_shards // 8)
    if k > 1:
        assert num_shards % k == 0
        groups = [[i for i in range(num_shards) if i // k == y] for y in range(num_shards // k)]
        group_of = {i: g for g in groups for i in g}
        square = [v + m**2 for m, v in zip(mean, var)]
        g_mean = [sum(mean[j] for j in group_of[i]) / k for i in range(num_shards)]
        g_square = [sum(square[j] for j in group_of[i]) / k for i in range(num_shards)]
        mean, var = g_mean, [sq - m**2 for m, sq in zip(g_mean, g_square)]
    return np.concatenate([(s - m) / np.sqrt(v + epsilon) for s, m, v in zip(shards, mean, var)])


@pytest.mark.parametrize(
    'cores,batch',
    [(32, OFFICIAL_BATCH), (32, 2048), (8, 64), (4, 32), (16, 256), (128, 1024)],
)
def test_batchnorm_groups_are_the_official_tpu_ones(cores, batch):
    """``config.model.bn_tpu_cores`` with ``--config.batch_size``: the derived group
    normalises a batch as the official code does on that slice, whatever the batch."""
    config = load('b0.py', f'--config.batch_size={batch}', f'--config.model.bn_tpu_cores={cores}')
    plan = resolve(config, device_count=DEVICE_COUNT, dataset_info_fn=dataset_info)
    assert plan.global_batch == batch and plan.bn_group_size < batch
    # Each core's examples drawn around their own mean, so the grouping shows in the output.
    rng = np.random.default_rng(cores)
    x = (
        rng.normal(size=(batch, 1, 2, 3))
        + np.repeat(rng.normal(size=cores) * 3, batch // cores)[:, None, None, None]
    )
    bn = layers.BatchNorm(use_running_average=False, group_size=plan.bn_group_size)
    v = bn.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
    ours, _ = bn.apply(v, jnp.asarray(x, jnp.float32), mutable=['batch_stats'])
    np.testing.assert_allclose(ours, official_tpu_batchnorm(x, cores), rtol=1e-4, atol=1e-4)


def test_official_rule_rejects_what_the_official_code_rejects():
    assert official_bn_group_size(OFFICIAL_BATCH, 32) == OFFICIAL_BN_GROUP
    with pytest.raises(ValueError, match='does not split evenly over 3 TPU cores'):
        official_bn_group_size(4096, 3)
    with pytest.raises(ValueError, match='100 TPU cores do not split into groups of 12'):
        official_bn_group_size(3200, 100)
