"""efficientnet.weights.train_state: finding a step directory of train.py's checkpoint layout
and reading its variables from a real orbax save (train.py's own saves are read in
test_loading.py, test_finetune.py and test_train_loop.py)."""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from efficientnet.weights import train_state


def make_dirs(root, *paths) -> None:
    for p in paths:
        os.makedirs(os.path.join(root, p))


def test_find_step_dir_best_then_latest_and_only_finished_steps(tmp_path):
    root = str(tmp_path)
    # checkpoints/5 has no state yet (an unfinished save): never picked.
    make_dirs(root, 'checkpoints/1/state', 'checkpoints/3/state', 'checkpoints/5', 'best/2/state')
    assert train_state.find_step_dir(root) == os.path.join(root, 'best', '2')
    assert train_state.find_step_dir(root, (train_state.LATEST_DIR, '')) == os.path.join(
        root, 'checkpoints', '3'
    )
    # '' is the path itself: a workdir's checkpoints/ directory names its newest step.
    latest = os.path.join(root, 'checkpoints')
    assert train_state.find_step_dir(latest, ('',)) == os.path.join(latest, '3')
    step1 = os.path.join(root, 'checkpoints', '1')
    assert train_state.find_step_dir(step1) == step1
    assert train_state.is_step_dir(step1) and not train_state.is_step_dir(latest)
    assert train_state.workdir_of(step1) == root
    assert train_state.find_step_dir(os.path.join(root, 'nothing')) is None


def test_read_variables_takes_the_ema_copies(tmp_path):
    state = {
        'step': np.int32(7),
        'params': {'dense': {'kernel': np.ones((2, 3), np.float32)}},
        'batch_stats': {'bn': {'mean': np.zeros(3, np.float32)}},
        'ema_params': {'dense': {'kernel': np.full((2, 3), 2.0, np.float32)}},
        'ema_batch_stats': {'bn': {'mean': np.full(3, 0.5, np.float32)}},
    }
    step_dir = tmp_path / 'checkpoints' / '7'
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(str(step_dir / train_state.STATE_ITEM), state)
    for use_ema, prefix in ((True, 'ema_'), (False, '')):
        got = train_state.read_variables(str(step_dir), use_ema=use_ema)
        want = {'params': state[prefix + 'params'], 'batch_stats': state[prefix + 'batch_stats']}
        assert jax.tree.structure(got) == jax.tree.structure(want)
        assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(got))
        jax.tree.map(np.testing.assert_array_equal, got, want)
