"""configs/finetune.py end to end: train.py fine-tunes weights from a file on a generated image
folder, re-initialising only the classifier, and its last line is a held-out top-1 clearly
above chance; an empty folder or a wrong class count stop the run with a message that says so.

The "pretrained" weights are a tiny EfficientNet (width and depth 0.25) with 10 classes whose
parameters are drawn here with numpy (He-normal kernels), so that train.py's own
initialisation (seed 0) cannot be mistaken for them. The test is about the mechanism, not
transfer quality: random features need a few hundred steps at 32 px to separate the colour
classes, and BatchNorm's running statistics (momentum 0.99, starting from the file's mean 0 and
variance 1) need as many to settle. Measured here: held-out top-1 25% at step 100, 65-80% at
250 and 100% from step 300 on; at 400 steps one run ended at 80% (EMA), so the run has 500.
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from input_fixtures import write_image_folder

from configs import finetune, smoke
from efficientnet import weights
from efficientnet.weights import train_state
from training import config_resolve
from training.config_resolve import ConfigError, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = os.path.join(ROOT, 'configs', 'finetune.py')
NUM_CLASSES = 4
# 4 classes x 25 images: write_image_folder's colour ids make the blue channel 40 + 40 * class.
PER_CLASS = 25
TINY = [
    '--config.model.width=0.25',
    '--config.model.depth=0.25',
    '--config.model.compute_dtype=float32',
    '--config.model.depthwise_impl=xla',
    '--config.data.resolution=32',
    '--config.batch_size=16',
]
# 80 training images, 5 steps per epoch: 500 steps, one eval at the end. A larger learning rate
# than the config's 0.01 per 256: the features here are random, not pretrained.
SHORT = [
    '--config.num_epochs=100',
    '--config.eval_every_epochs=100',
    '--config.optim.base_learning_rate=0.4',
    '--config.log_every_steps=50',
]


def random_tiny_weights(path: str, num_classes: int = 10) -> dict:
    """A tiny B0's variables with He-normal kernels from numpy, saved as a weights file."""
    model = config_resolve.build_model(smoke.get_config(), num_classes)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    rng = np.random.default_rng(7)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        shape = leaf.shape
        if name.endswith("['kernel']"):
            return rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape).astype(np.float32)
        if name.endswith("['scale']") or name.endswith("['var']"):
            return np.ones(shape, np.float32)
        return np.zeros(shape, np.float32)

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    weights.save_variables(path, variables, 'efficientnet-b0')
    return variables


def train(env, *args, timeout=600):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, 'train.py'), f'--config={FINETUNE}', *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture(scope='module')
def env(tools_env):
    return tools_env


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('folder'))
    write_image_folder(root, num_classes=NUM_CLASSES, per_class=PER_CLASS)
    return root


@pytest.fixture(scope='module')
def finetuned(env, folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('finetune')
    pretrained_path = str(tmp / 'pretrained.msgpack')
    pretrained = random_tiny_weights(pretrained_path)
    workdir = str(tmp / 'run')
    p = train(
        env,
        f'--workdir={workdir}',
        f'--config.init_from={pretrained_path}',
        f'--config.data.folder={folder}',  # data.num_classes unset: the folder's count
        *TINY,
        *SHORT,
    )
    assert p.returncode == 0, f'train.py failed:\n{p.stdout}\n{p.stderr[-6000:]}'
    return workdir, pretrained_path, pretrained, p


def test_head_reinitialised_body_loaded(finetuned):
    workdir, pretrained_path, pretrained, p = finetuned
    line = re.search(r'initialised from (\S+); re-initialised: (.*)', p.stderr)
    assert line and line.group(1) == pretrained_path
    assert line.group(2) == """["['classifier']['bias']", "['classifier']['kernel']"]"""
    step = max(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')))
    state = train_state.read_state(os.path.join(workdir, 'checkpoints', str(step), 'state'))
    assert state['params']['classifier']['kernel'].shape == (320, NUM_CLASSES)
    # Fine-tuning moves the body a little: its kernels stay correlated with the ones it started
    # from (train.py's own initialisation would be uncorrelated with these numpy draws).
    pre = dict(jax.tree_util.tree_flatten_with_path(pretrained['params'])[0])
    correlations = [
        np.corrcoef(np.ravel(pre[path]), np.ravel(leaf))[0, 1]
        for path, leaf in jax.tree_util.tree_flatten_with_path(state['params'])[0]
        if jax.tree_util.keystr(path).endswith("['kernel']") and path[0].key != 'classifier'
    ]
    assert len(correlations) > 30 and np.median(correlations) > 0.5, correlations


def test_held_out_accuracy_beats_chance(finetuned):
    _, _, _, p = finetuned
    last = [line for line in p.stdout.splitlines() if line.strip()][-1]
    m = re.fullmatch(
        r'Final eval top-1: ([\d.]+)% \(EMA weights\), ([\d.]+)% \(raw weights\), '
        r'step 500',
        last,
    )
    assert m, last
    # 20 held-out images (holdout_fraction 0.2 of 25 per class); chance is 25%.
    assert 'on 20 examples' in p.stderr
    assert float(m.group(1)) >= 75.0 and float(m.group(2)) >= 75.0, last


def test_plot_of_the_finetuned_run(finetuned, env, tmp_path):
    workdir, _, _, _ = finetuned
    out = str(tmp_path / 'finetune.png')
    p = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, 'scripts', 'plot_metrics.py'),
            workdir,
            '--output',
            out,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert os.path.getsize(out) > 1000


def finetune_config(**data):
    """configs/finetune.py at the test's size, locked, with ``config.data`` overrides."""
    config = finetune.get_config()
    config.model.width = config.model.depth = 0.25
    config.data.resolution = 32
    config.batch_size = 16
    config.lock()
    for key, value in data.items():
        config.data[key] = value
    return config


def test_empty_folder_is_a_clear_error(tmp_path):
    """Resolution, which train.py runs before compiling, names the folder and what is wrong."""
    empty = str(tmp_path / 'empty')
    os.makedirs(empty)
    with pytest.raises(ConfigError, match=f"image folder '{empty}' has no class subfolders"):
        resolve(finetune_config(folder=empty, num_classes=3), device_count=1)
    os.makedirs(os.path.join(empty, 'cats'))
    os.makedirs(os.path.join(empty, 'dogs'))
    with pytest.raises(ConfigError, match='has 0 training examples, fewer than one batch of 16'):
        resolve(finetune_config(folder=empty, num_classes=2), device_count=1)
    with pytest.raises(ConfigError, match='config.data.folder must name a directory'):
        resolve(finetune_config(num_classes=2), device_count=1)


def test_class_count_comes_from_the_folder_or_must_match_it(folder):
    plan = resolve(finetune_config(folder=folder), device_count=1)
    assert plan.num_classes == NUM_CLASSES
    assert (plan.num_train, plan.num_eval) == (80, 20)  # holdout_fraction 0.2 of each class
    with pytest.raises(
        ConfigError, match=f"num_classes=3 but dataset 'folder' has {NUM_CLASSES} classes"
    ):
        resolve(finetune_config(folder=folder, num_classes=3), device_count=1)


def test_weights_of_another_model_are_refused(env, folder, tmp_path):
    """Weights whose body does not fit the configured model (here: width 0.25 weights, a width
    0.5 model) stop the run instead of silently training from scratch."""
    path = str(tmp_path / 'narrow.msgpack')
    random_tiny_weights(path)
    args = [a for a in TINY if not a.startswith('--config.model.width')]
    p = train(
        env,
        f'--workdir={tmp_path / "run"}',
        f'--config.init_from={path}',
        f'--config.data.folder={folder}',
        '--config.model.width=0.5',
        *args,
        *SHORT,
    )
    assert p.returncode != 0
    assert p.returncode == 2, p.stderr[-3000:]  # refused by validation, before anything runs
    assert 'does not fit config.model' in p.stderr, p.stderr[-3000:]
    assert 'only the classifier may differ' in p.stderr.lower(), p.stderr[-3000:]
