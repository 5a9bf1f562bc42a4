"""One global order across real processes: P = 1, 2 and 4 processes joined through
jax.distributed on 127.0.0.1, each building its pipeline from the process index and count jax
reports, produce bit-identical global batches on JPEG data (tfds's imagenet2012 prepared as
array_record) with RandAugment, MixUp and CutMix on, also when the 4 processes start at a later
step (a resume on another process count)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import input_fixtures as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH, STEPS = 8, 3  # 24 examples: two epochs of 12


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _global_batches(tmp_path, data, num_processes, start_step, steps):
    """Runs `num_processes` real processes; returns their local batches joined row-wise."""
    port = _free_port()
    procs, outs = [], []
    for i in range(num_processes):
        out = tmp_path / f'p{num_processes}_{i}.npz'
        args = dict(
            coordinator=f'127.0.0.1:{port}', num_processes=num_processes, process_id=i,
            data=data, global_batch_size=GLOBAL_BATCH, seed=17, start_step=start_step,
            steps=steps, out=str(out),
        )  # fmt: skip
        env = dict(
            os.environ, INPUT_TEST_ARGS=json.dumps(args), JAX_PLATFORMS='cpu', XLA_FLAGS='',
            PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2',
        )  # fmt: skip
        code = 'from tests import input_fixtures as fx; fx.distributed_batches_main()'
        procs.append(
            subprocess.Popen(
                [sys.executable, '-c', code],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
        )
        outs.append(out)
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    parts = [np.load(o) for o in outs]
    assert [int(x['process_index']) for x in parts] == list(range(num_processes))
    assert {int(x['process_count']) for x in parts} == {num_processes}
    return {k: np.concatenate([x[k] for x in parts], axis=1) for k in ('image', 'label')}


@pytest.mark.slow
def test_one_two_and_four_processes_give_bit_identical_global_batches(tmp_path):
    data_dir, manual_dir, _ = fx.prepared_imagenet()
    data = dict(
        data_dir=data_dir, manual_dir=manual_dir, resolution=32, augment='randaugment',
        mixup_alpha=0.4, cutmix_alpha=1.0, mix_group_size=2,
    )  # fmt: skip
    one = _global_batches(tmp_path, data, 1, 0, STEPS)
    assert one['image'].shape == (STEPS, GLOBAL_BATCH, 32, 32, 3)
    assert one['label'].shape == (STEPS, GLOBAL_BATCH, 1000)
    two = _global_batches(tmp_path, data, 2, 0, STEPS)
    four = _global_batches(tmp_path, data, 4, 1, STEPS - 1)  # resumed at step 1
    for key in ('image', 'label'):
        np.testing.assert_array_equal(two[key], one[key])
        np.testing.assert_array_equal(four[key], one[key][1:])
    # The augmentation really ran: mixed targets, and pixels far from the flat fixture colours.
    assert (one['label'].max(-1) < 1).any()
    assert one['image'].min() < 20 and one['image'].max() > 200
