"""Progressive learning in the training loop (training/progressive.py, train.py): where each
stage starts in steps, the stage's batches, one compilation per stage, and resumes inside a
stage (after a real SIGKILL, and from a checkpoint in the middle of the last stage) that end
bit-identical to the uninterrupted run.

The stage values themselves (official code and paper) are checked in tests/test_v2_configs.py.
"""

import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

import input_pipeline
from tests.test_configs import DEVICE_COUNT, dataset_info, load
from tests.test_train_loop import ROOT, _assert_same_state, _cmd, _train
from training import progressive
from training.config_resolve import ConfigError, resolve

# The smoke config (8 steps, 4 per epoch) in two stages: steps 0-4 at int(24 + 8 / 2) = 28 px,
# RandAugment 2, no MixUp, dropout 0.1; steps 4-8 at 32 px (the eval size), RandAugment 6,
# MixUp 0.2, dropout 0.3. A checkpoint every 2 steps, all kept.
PROGRESSIVE = (
    '--config.progressive.stages=2',
    '--config.progressive.min_resolution=24',
    '--config.data.augment=randaugment',
    '--config.progressive.min_randaugment_magnitude=2',
    '--config.progressive.max_randaugment_magnitude=6',
    '--config.progressive.max_mixup_alpha=0.2',
    '--config.progressive.min_dropout=0.1',
    '--config.progressive.max_dropout=0.3',
    '--config.checkpoint.every_steps=2',
    '--config.checkpoint.keep=10',
)


def _plan(config):
    return resolve(config, device_count=DEVICE_COUNT, dataset_info_fn=dataset_info)


def test_official_v2_stages_start_at_the_official_epochs_in_steps():
    """V2-S on ImageNet at batch 4096: 312 steps per epoch, stages at epochs 0, 87, 175 and
    262 of 350 (google/automl main_tf2.py), so at steps 0, 27144, 54600 and 81744 of 109200."""
    config = load('v2_s.py')
    stages = progressive.plan_stages(config, _plan(config))
    assert [(s.start, s.end) for s in stages] == [
        (0, 27144),
        (27144, 54600),
        (54600, 81744),
        (81744, 109200),
    ]
    assert [s.stage.resolution for s in stages] == [171, 214, 257, 300]
    assert progressive.stage_at(stages, 27143).stage.index == 0
    assert progressive.stage_at(stages, 27144).stage.index == 1
    assert progressive.stage_at(stages, 109200).stage.index == 3
    # Gradient accumulation: the same updates, twice the train-step calls.
    config = load('v2_s.py', '--config.optim.grad_accum_steps=2')
    assert progressive.plan_stages(config, _plan(config))[1].start == 2 * 27144
    assert progressive.plan_stages(load('b0.py'), _plan(load('b0.py'))) is None
    # One stage: the whole run at the final train size and strengths (evaluated at 384 px).
    config = load('v2_s.py', '--config.progressive.stages=1')
    (only,) = progressive.plan_stages(config, _plan(config))
    assert (only.start, only.end, only.stage.resolution) == (0, 109200, 300)
    assert only.stage.randaugment_magnitude == 10


def test_a_fractional_number_of_epochs_splits_exactly_and_empty_stages_are_refused():
    config = load('smoke.py', *PROGRESSIVE, '--config.num_epochs=1.5')  # 6 steps
    assert [(s.start, s.end) for s in progressive.plan_stages(config, _plan(config))] == [
        (0, 3),
        (3, 6),
    ]
    config = load(
        'smoke.py',
        '--config.progressive.stages=4',
        '--config.progressive.min_resolution=24',
        '--config.num_epochs=0.5',
    )
    with pytest.raises(ConfigError) as e:
        _plan(config)
    assert (
        'config.progressive.stages=4: stage 1 (epochs 0-0.125) gets no training step at 4 '
        'steps per epoch; train for more epochs or use fewer stages'
    ) in str(e.value)


def test_mixup_group_size_is_checked_when_only_a_later_stage_mixes():
    config = load(
        'smoke.py',
        '--config.progressive.stages=2',
        '--config.progressive.min_resolution=24',
        '--config.progressive.max_mixup_alpha=0.2',
        '--config.data.mix_group_size=3',
    )
    with pytest.raises(ConfigError, match='mix_group_size=3 does not divide'):
        _plan(config)


def test_a_stage_iterator_restarted_at_a_step_yields_that_stages_batches():
    """The iterator of stage 1 restarted with stage 2's data at step 4 gives the batches that a
    fresh stage-2 iterator built at step 4 gives: 32 px, mixed labels. Stage 1's are 28 px with
    integer labels."""
    config = load('smoke.py', *PROGRESSIVE)
    first, second = (s.stage for s in progressive.plan_stages(config, _plan(config)))
    one, two = (progressive.data_overrides(s) for s in (first, second))
    assert (two['resolution'], two['randaugment_magnitude'], two['mixup_alpha']) == (32, 6, 0.2)
    kwargs = dict(global_batch_size=16, seed=config.seed)
    iterator = input_pipeline.create_train_iterator(
        config.data, start_step=2, overrides=one, **kwargs
    )
    batch = next(iterator)
    assert batch['image'].shape == (16, 28, 28, 3) and batch['label'].shape == (16,)
    iterator.restart(4, two)
    fresh = input_pipeline.create_train_iterator(config.data, start_step=4, overrides=two, **kwargs)
    for _ in range(2):
        a, b = next(iterator), next(fresh)
        assert a['image'].shape == (16, 32, 32, 3) and a['label'].shape == (16, 10)
        np.testing.assert_array_equal(a['image'], b['image'])
        np.testing.assert_array_equal(a['label'], b['label'])
    assert iterator.step == 6


def _run(env, workdir):
    """The progressive smoke run in ``workdir``, logging every compilation."""
    return _train({**env, 'JAX_LOG_COMPILES': '1'}, workdir, *PROGRESSIVE)


def _compiled_image_shapes(stderr: str, program: str) -> list[str]:
    """The image-batch shapes (uint8 [B, S, S, 3]) of each compilation of ``program``, from jax's
    compile log (JAX_LOG_COMPILES)."""
    lines = [line for line in stderr.splitlines() if f'Compiling jit({program})' in line]
    return [m for line in lines for m in re.findall(r'uint8\[\d+,\d+,\d+,3\]', line)]


@pytest.fixture(scope='module')
def reference(train_env, tmp_path_factory):
    """The progressive smoke run in one go: (workdir, process)."""
    workdir = str(tmp_path_factory.mktemp('progressive'))
    return workdir, _run(train_env, workdir)


def test_each_stage_trains_at_its_size_compiles_once_and_evaluates_at_the_eval_size(reference):
    _, p = reference
    assert _compiled_image_shapes(p.stderr, 'train_step') == [
        'uint8[16,28,28,3]',
        'uint8[16,32,32,3]',
    ]
    assert set(_compiled_image_shapes(p.stderr, 'eval_step')) == {'uint8[16,32,32,3]'}
    assert (
        'progressive learning: stage 1/2, steps 0-4 (epochs 0-1): 28 px, randaugment 2, '
        'mixup 0, cutmix 0, dropout 0.1'
    ) in p.stderr
    assert (
        'progressive learning: stage 2/2, steps 4-8 (epochs 1-2): 32 px, randaugment 6, '
        'mixup 0.2, cutmix 0, dropout 0.3'
    ) in p.stderr
    assert p.stdout.strip().splitlines()[-1].startswith('Final eval top-1: ')
    # Saving (4 steps, 8 devices) compiles the checksum program once and no per-array slice
    # programs of orbax's replica-parallel writes (training/checkpoint.py).
    compiled = re.findall(r'Compiling jit\((\w+)\)', p.stderr)
    assert compiled.count('digests') == 1 and 'slice' not in compiled, sorted(set(compiled))


def test_killed_in_the_first_stage_resumes_into_the_second_bit_identical(
    train_env, reference, tmp_path
):
    """SIGKILL once the step-2 checkpoint is committed (stage 1; the stage-2 compilation is
    still ahead, so the kill lands before the end), then the same command: it resumes at 28 px,
    switches to 32 px at step 4 and ends with the uninterrupted run's state."""
    workdir = str(tmp_path / 'run')
    ckpts = os.path.join(workdir, 'checkpoints')
    p = subprocess.Popen(
        _cmd(workdir, *PROGRESSIVE),
        env=train_env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 420
        while p.poll() is None and time.monotonic() < deadline:
            if os.path.isdir(os.path.join(ckpts, '2')):
                p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL
    done = max(int(n) for n in os.listdir(ckpts) if n.isdigit())
    assert done < 4, f'the kill landed in stage 2 (step {done}), not in stage 1'
    second = _run(train_env, workdir)
    assert f'resumed from step {done}' in second.stderr
    assert 'progressive learning: stage 1/2, steps 0-4' in second.stderr
    assert 'progressive learning: stage 2/2, steps 4-8' in second.stderr
    _assert_same_state(workdir, reference[0], 8)


def test_resumed_in_the_middle_of_the_last_stage_continues_it_bit_identical(
    train_env, reference, tmp_path
):
    """The uninterrupted run's workdir as a kill right after step 6 leaves it (steps 2, 4 and 6
    committed): the rerun continues stage 2 at its size and strength and ends identical."""
    workdir = str(tmp_path / 'run')
    shutil.copytree(reference[0], workdir, ignore=shutil.ignore_patterns('8', 'best'))
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4', '6']
    second = _run(train_env, workdir)
    assert 'resumed from step 6' in second.stderr
    assert 'progressive learning: stage 1/2' not in second.stderr
    assert 'progressive learning: stage 2/2, steps 4-8' in second.stderr
    assert _compiled_image_shapes(second.stderr, 'train_step') == ['uint8[16,32,32,3]']
    _assert_same_state(workdir, reference[0], 8)
