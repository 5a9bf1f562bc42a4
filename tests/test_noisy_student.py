"""Noisy Student: the official filter, the pseudo-labeled train stream, the loss, and the driver
end to end with a kill -9 in the middle of the student's training (scripts/noisy_student.py).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import pseudo_labels
from input_pipeline.pipeline import build_train_dataset
from training import noisy_student
from training.losses import cross_entropy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, 'configs', 'smoke.py')


# ----------------------------------------------------------------------------- the filter


def _select(classes, confidence, **kw):
    kw.setdefault('num_classes', int(max(classes)) + 1)
    return noisy_student.select(np.asarray(classes), np.asarray(confidence, np.float64), **kw)


def test_threshold_is_the_highest_grid_value_that_keeps_enough_images():
    # Class 0 has 3 images at >= 0.85 and 2 at >= 0.86: with 3 per class the threshold is 0.85
    # and those 3 are kept once each.
    conf = [0.95, 0.9, 0.85, 0.5, 0.2]
    kept, stats = _select([0] * 5, conf, min_threshold=0.3, images_per_class=3)
    assert sorted(kept.tolist()) == [0, 1, 2]
    assert stats['0'] == {'predicted': 5, 'threshold': 0.85, 'above_threshold': 3, 'selected': 3}
    # Not below min_threshold: asking for 5 stops at 0.3, where 4 images remain; each is kept
    # 5 / 4 = 1.25 times: once, or twice with probability 1/4.
    kept, stats = _select([0] * 5, conf, min_threshold=0.3, images_per_class=5)
    assert stats['0']['threshold'] == 0.3 and stats['0']['above_threshold'] == 4
    counts = np.bincount(kept, minlength=5)
    assert counts[4] == 0 and set(counts[:4].tolist()) <= {1, 2}


def test_duplicates_small_classes_and_down_samples_large_ones():
    rng = np.random.default_rng(0)
    # Class 0: 3 images for 7 per class: 7/3 = 2.33 copies each (2, or 3 with p = 1/3).
    # Class 1: 2,000 images all at 0.99 for 200 per class: each kept with p = 0.1, no copies.
    classes = np.array([0] * 3 + [1] * 2000)
    conf = np.concatenate([[0.8, 0.7, 0.6], np.full(2000, 0.99)])
    totals = []
    for seed in range(200):
        kept, stats = _select(classes, conf, min_threshold=0.3, images_per_class=7, seed=seed)
        c0 = np.bincount(kept[kept < 3], minlength=3)
        assert set(c0.tolist()) <= {2, 3}
        totals.append(c0.sum())
    assert abs(np.mean(totals) - 7.0) < 0.15  # E = 3 x 7/3
    kept, stats = _select(classes, conf, min_threshold=0.3, images_per_class=200, seed=1)
    big = kept[kept >= 3]
    assert stats['1']['threshold'] == 0.99
    assert len(np.unique(big)) == len(big)  # no duplicates when down-sampling
    assert 150 <= len(big) <= 250  # Binomial(2000, 0.1): mean 200, sd 13.4
    del rng


def test_without_balancing_every_confident_image_is_kept_once():
    kept, stats = _select([0, 0, 1, 1, 1], [0.31, 0.29, 0.9, 0.3, 0.1], min_threshold=0.3,
                          images_per_class=0)  # fmt: skip
    assert kept.tolist() == [0, 2, 3]
    assert stats['1']['threshold'] == 0.3


# ----------------------------------------------------------------------------- the stream


def _fake_config(tmp_path, probs_or_classes='probs', ratio=3):
    n_unlabeled = 48
    rng = np.random.default_rng(1)
    index = rng.integers(0, n_unlabeled, 30)  # with repeats, as balancing makes
    path = str(tmp_path / 'selection.npz')
    if probs_or_classes == 'probs':
        probs = rng.dirichlet(np.ones(10), 30).astype(np.float32)
        pseudo_labels.write(path, index, probs=probs)
    else:
        pseudo_labels.write(path, index, classes=rng.integers(0, 10, 30))
    pseudo_labels.read.cache_clear()
    config = {
        'name': 'fake',
        'num_classes': 10,
        'resolution': 16,
        'fake_num_train': 64,
        'fake_num_eval': 8,
        'train_split': 'train[:25%]',
        'random_crop': False,
        'random_flip': False,
        'crop_fraction': 1.0,
        'interpolation': 'bilinear',
        'pseudo_labels': path,
        'unlabeled_split': 'train[25%:]',
        'unlabeled_ratio': ratio,
    }
    return config, path


def _batches(config, batch, start, count, **layout):
    ds = build_train_dataset(config, global_batch_size=batch, seed=3, start_step=start, **layout)
    return list(ds.take(count).as_numpy_iterator())


def test_batches_put_labeled_rows_then_pseudo_labeled_rows(tmp_path):
    config, path = _fake_config(tmp_path)
    got = _batches(config, 16, 0, 3)
    plain = {**config, 'pseudo_labels': None}
    labeled = _batches(plain, 4, 0, 3)
    selection = pseudo_labels.read(path)
    from input_pipeline import sources

    images = {  # every unlabeled image, by its position in the unlabeled split
        i: im for i, im in enumerate(_eval_images({**plain, 'eval_split': 'train[25%:]'}, sources))
    }
    for b, lab in zip(got, labeled):
        assert b['image'].shape == (16, 16, 16, 3) and b['label'].shape == (16, 10)
        np.testing.assert_array_equal(b['smooth'], [1.0] * 4 + [0.0] * 12)
        # The labeled rows are the plain stream's batch of 4, labels one-hot.
        np.testing.assert_array_equal(b['image'][:4], lab['image'])
        np.testing.assert_array_equal(b['label'][:4], np.eye(10)[lab['label']])
        # Each pseudo-labeled row is some row of the file: its image and its probabilities.
        for image, target in zip(b['image'][4:], b['label'][4:]):
            rows = np.flatnonzero(np.all(np.isclose(selection['probs'], target), axis=1))
            assert len(rows) >= 1
            np.testing.assert_array_equal(image, images[int(selection['index'][rows[0]])])


def _eval_images(config, sources):
    from input_pipeline.pipeline import build_eval_dataset

    ds = build_eval_dataset(config, global_batch_size=8)
    out = []
    for batch in ds.as_numpy_iterator():
        out += list(batch['image'][batch['mask']])
    return out


def test_stream_resumes_at_any_step_and_splits_over_processes(tmp_path):
    config, _ = _fake_config(tmp_path, 'classes', ratio=1)
    whole = _batches(config, 8, 0, 6)
    np.testing.assert_array_equal(whole[0]['smooth'], [1.0] * 4 + [1.0] * 4)  # hard: smoothed
    resumed = _batches(config, 8, 4, 2)
    for a, b in zip(whole[4:], resumed):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # Two processes: each holds its half of the labeled rows, then its half of the others.
    parts = [_batches(config, 8, 0, 2, process_index=p, process_count=2) for p in (0, 1)]
    for step in range(2):
        lab = np.concatenate([parts[p][step]['image'][:2] for p in (0, 1)])
        unl = np.concatenate([parts[p][step]['image'][2:] for p in (0, 1)])
        np.testing.assert_array_equal(lab, whole[step]['image'][:4])
        np.testing.assert_array_equal(unl, whole[step]['image'][4:])


def test_bad_batch_split_is_one_line():
    with pytest.raises(ValueError, match='multiple of 1 \\+ data.unlabeled_ratio = 4'):
        pseudo_labels.batch_split(10, 3)


# ----------------------------------------------------------------------------- the loss


def test_loss_is_the_official_labeled_plus_ratio_times_unlabeled():
    """main.py of google-research/noisystudent: CE with label smoothing on the labeled batch,
    the teacher's soft targets unsmoothed on the unlabeled batch, lab + ratio x unl; here as
    the mean over the concatenated batch with per-row smoothing, times 1 + ratio."""
    rng = np.random.default_rng(0)
    r, n_lab, eps = 3, 4, 0.1
    logits = rng.normal(size=(n_lab * (1 + r), 10)).astype(np.float32)
    labels = rng.integers(0, 10, n_lab)
    teacher = rng.dirichlet(np.ones(10), n_lab * r).astype(np.float32)
    targets = np.concatenate([np.eye(10)[labels], teacher]).astype(np.float32)
    smooth = np.array([1.0] * n_lab + [0.0] * (n_lab * r), np.float32)
    ours = (1 + r) * np.mean(cross_entropy(logits, targets, eps * smooth[:, None]))
    lab = tf.keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=eps)(
        np.eye(10)[labels], logits[:n_lab]
    )
    unl = tf.keras.losses.CategoricalCrossentropy(from_logits=True)(teacher, logits[n_lab:])
    np.testing.assert_allclose(ours, float(lab) + r * float(unl), rtol=1e-5)


# ----------------------------------------------------------------------------- the driver

DRIVER_ARGS = [
    f'--config={SMOKE}',
    '--config.noisy_student.iterations=1',
    '--config.noisy_student.labeled_split=train[:25%]',
    '--config.noisy_student.unlabeled_split=train[25%:]',
    '--config.noisy_student.min_threshold=0.0',
    '--config.noisy_student.images_per_class=10',
    '--config.noisy_student.predict_batch_size=16',
    '--config.noisy_student.noise=model.dropout_rate=0.3 data.augment=randaugment',
    '--config.checkpoint.every_steps=2',
]


def _driver(env, workdir, *extra, wait=True):
    cmd = [sys.executable, os.path.join(ROOT, 'scripts', 'noisy_student.py'), *DRIVER_ARGS,
           f'--workdir={workdir}', *extra]  # fmt: skip
    if not wait:
        return subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_driver_survives_kill_9_in_the_student_and_finishes(tools_env, tmp_path):
    workdir = str(tmp_path / 'ns')
    student_ckpts = os.path.join(workdir, 'iter1', 'student', 'checkpoints')
    p = _driver(tools_env, workdir, wait=False)
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if os.path.isdir(student_ckpts) and any(
            os.path.exists(os.path.join(student_ckpts, d, 'commit_success.txt'))
            or d.isdigit() for d in os.listdir(student_ckpts)
        ):  # fmt: skip
            break
        time.sleep(0.5)
    assert p.poll() is None, f'the driver ended before the student saved:\n{p.stdout.read()}'
    time.sleep(1.0)
    os.killpg(p.pid, signal.SIGKILL)  # the driver and its train.py child
    p.wait()
    teacher_done = os.path.join(workdir, 'teacher', 'noisy_student_done.json')
    selection = os.path.join(workdir, 'iter1', 'pseudo_labels.npz')
    before = {f: os.stat(f).st_mtime_ns for f in (teacher_done, selection)}
    assert not os.path.exists(os.path.join(workdir, 'iter1', 'student', 'noisy_student_done.json'))

    q = _driver(tools_env, workdir)
    assert q.returncode == 0, q.stdout + q.stderr[-3000:]
    assert '[0] ' in q.stdout and 'finished before' in q.stdout  # the teacher is not retrained
    assert 'predicted' not in q.stdout and 'selected' not in q.stdout
    assert {f: os.stat(f).st_mtime_ns for f in before} == before
    log = open(os.path.join(workdir, 'iter1', 'student', 'train.log')).read()
    assert 'Resum' in log or 'resum' in log, log[-2000:]
    summary = json.load(open(os.path.join(workdir, 'noisy_student.json')))
    assert [m['model'] for m in summary['models']] == ['teacher', 'student 1']
    assert all(0.0 <= m['ema_top1'] <= 1.0 for m in summary['models'])
    # What the student trained on: the predictions of every unlabeled image, the selection
    # the official rule makes from them, and the student's noise.
    pred = pseudo_labels.read_npz(os.path.join(workdir, 'iter1', 'predictions',
                                               'shard-00000-of-00001.npz'))  # fmt: skip
    assert len(pred['index']) == 48
    np.testing.assert_allclose(pred['probs'].sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(pred['classes'], pred['probs'].argmax(1))
    kept, _ = noisy_student.select(pred['classes'], pred['confidence'], num_classes=10,
                                   min_threshold=0.0, images_per_class=10, seed=1)  # fmt: skip
    sel = pseudo_labels.read(selection)
    np.testing.assert_array_equal(sel['index'], pred['index'][kept])
    # Sharded over two processes, the predictions are the same rows, split in order.
    from inference.loading import load_model

    teacher = load_model(os.path.join(workdir, 'teacher'))
    data = _unlabeled_eval_config(workdir, teacher)
    halves = [
        noisy_student.predict_shard(
            teacher, data, temperature=1.0, batch_size=8, process_index=i, process_count=2
        )
        for i in (0, 1)
    ]
    for key in ('index', 'classes'):
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), pred[key])
    np.testing.assert_allclose(
        np.concatenate([h['probs'] for h in halves]), pred['probs'], rtol=1e-5, atol=1e-6
    )
    config = json.load(open(os.path.join(workdir, 'iter1', 'student', 'config.json')))['config']
    assert config['model']['dropout_rate'] == 0.3 and config['data']['augment'] == 'randaugment'
    assert config['data']['pseudo_labels'] == selection


def _unlabeled_eval_config(workdir, teacher):
    from configs.base import get_data_config

    data = get_data_config()
    saved = json.load(open(os.path.join(workdir, 'teacher', 'config.json')))['config']['data']
    for key, value in saved.items():
        data[key] = value
    data.eval_split = 'train[25%:]'
    data.resolution, data.crop_fraction = teacher.resolution, teacher.crop_fraction
    data.interpolation = teacher.interpolation
    return data


def test_smaller_student_is_refused_before_anything_runs(tools_env, tmp_path):
    p = _driver(
        tools_env, str(tmp_path / 'ns'), '--config.noisy_student.students=("model.width=0.2",)'
    )
    assert p.returncode == 2
    assert 'smaller than its teacher' in p.stderr
    assert not os.path.exists(tmp_path / 'ns' / 'teacher')
