"""Knowledge distillation: the loss is Hinton's formula (against Keras's losses), the step's
loss equals it with the teacher computed independently (load_model + TensorFlow resize), and
the teacher's variables come out of training bit-identical."""

import jax
import numpy as np
import pytest

import input_pipeline
from configs import smoke
from efficientnet import weights
from efficientnet.normalization import normalize_images
from inference.loading import load_model
from tests.inference_fixtures import random_variables
from training import config_resolve, sharding
from training import run as run_lib
from training.distill import distill_loss

INFO = lambda d: {'num_classes': 10, 'num_train': 64, 'num_eval': 40}  # noqa: E731


@pytest.mark.parametrize('temperature,alpha', [(1.0, 0.5), (2.5, 0.3), (4.0, 1.0)])
def test_loss_is_hinton_formula_against_keras(rng, temperature, alpha):
    import keras
    import tensorflow as tf

    s = rng.normal(size=(16, 10)).astype(np.float32) * 3
    t = rng.normal(size=(16, 10)).astype(np.float32) * 3
    labels = rng.integers(0, 10, 16)
    ours = distill_loss(s, t, labels, temperature=temperature, alpha=alpha, label_smoothing=0.1)
    kl = keras.losses.KLDivergence(reduction=None)(
        tf.nn.softmax(t / temperature), tf.nn.softmax(s / temperature)
    )
    ce = keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=0.1, reduction=None
    )(tf.one_hot(labels, 10), s)
    expected = (1 - alpha) * ce.numpy() + alpha * temperature**2 * kl.numpy()
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-6)


def _student_config(teacher_path, **distill):
    c = smoke.get_config()
    c.optim.warmup_epochs = 0.0
    c.model.dropout_rate = 0.0  # deterministic student logits, to recompute them here
    c.model.drop_path_rate = 0.0
    c.distill.teacher = teacher_path
    for k, v in distill.items():
        c.distill[k] = v
    return c


@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory):
    """A Lite-style teacher (relu6, no SE, (x - 127) / 128 input) of another variant than the
    student, as a msgpack weights file."""
    path = str(tmp_path_factory.mktemp('teacher') / 'teacher.msgpack')
    variables = random_variables('efficientnet-lite-tiny', 10, seed=3)
    weights.save_variables(path, variables, 'efficientnet-lite-tiny')
    return path, variables


@pytest.mark.slow
def test_step_loss_equals_formula_and_teacher_stays_bit_identical(teacher_file):
    import tensorflow as tf

    path, host_teacher = teacher_file
    T, alpha = 2.0, 0.7
    config = _student_config(path, temperature=T, alpha=alpha)
    config.data.teacher_resolution = 48  # the teacher sees the student's image at 48 px
    mesh = sharding.create_mesh(1, devices=jax.devices()[:2])
    run = run_lib.create_run(config, mesh=mesh)
    assert run.teacher.resolution == 48 and run.teacher.normalization == 'lite'
    it = input_pipeline.create_train_iterator(config.data, global_batch_size=16, seed=0)
    b0, b1 = next(it), next(it)
    state = run.init_state(0)
    params0 = jax.device_get(state.params)
    stats0 = jax.device_get(state.batch_stats)

    state, m = run.train_step(state, sharding.global_batch(b0, mesh))
    state, _ = run.train_step(state, sharding.global_batch(b1, mesh))

    # The student's logits of step 1, recomputed outside the step (no dropout: deterministic).
    x = normalize_images(b0['image'], run.plan.normalization)
    student, _ = run.model.apply(
        {'params': params0, 'batch_stats': stats0},
        x,
        train=True,
        rngs={'dropout': jax.random.key(0)},
        mutable=['batch_stats'],
    )
    # The teacher independently: the loader's own model and normalisation, TF's resize.
    teacher = load_model(path)
    resized = tf.image.resize(b0['image'].astype(np.float32), [48, 48], 'bilinear').numpy()
    t = teacher.logits(resized).astype(np.float64)
    s = np.asarray(student, np.float64)
    ls = config.label_smoothing
    onehot = np.eye(10)[b0['label']] * (1 - ls) + ls / 10
    log_softmax = lambda z: (
        z
        - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - z.max(-1, keepdims=True)
    )  # noqa: E501,E731
    ce = -(onehot * log_softmax(s)).sum(-1)
    p = np.exp(log_softmax(t / T))
    kl = (p * (log_softmax(t / T) - log_softmax(s / T))).sum(-1)
    expected = np.mean((1 - alpha) * ce + alpha * T**2 * kl)
    np.testing.assert_allclose(float(m['loss']), expected, rtol=2e-5)

    # Frozen: after two steps the teacher on the mesh is the file's, bit for bit.
    for a, b in zip(
        jax.tree.leaves(jax.device_get(run.teacher_variables)), jax.tree.leaves(host_teacher)
    ):
        np.testing.assert_array_equal(a, b)
    # ... and placed by the student's rules (replicated at this size) on the student's mesh.
    for leaf in jax.tree.leaves(run.teacher_variables):
        assert leaf.sharding.mesh == mesh


def test_clean_teacher_view_comes_from_the_pipeline():
    c = smoke.get_config()
    c.data.teacher_resolution = 40
    batch = next(input_pipeline.create_train_iterator(c.data, global_batch_size=8, seed=0))
    assert batch['teacher_image'].shape == (8, 40, 40, 3)
    assert batch['teacher_image'].dtype == np.uint8
    assert batch['image'].shape == (8, 32, 32, 3)


def test_distill_config_errors_are_one_line_before_compiling(teacher_file, tmp_path):
    c = _student_config(teacher_file[0], teacher_input='clean', alpha=1.5)
    with pytest.raises(config_resolve.ConfigError) as e:
        config_resolve.resolve(c, device_count=1, dataset_info_fn=INFO)
    assert 'config.distill.alpha' in str(e.value)
    assert 'needs config.data.teacher_resolution' in str(e.value)
    # A teacher of another class count stops the run before compiling.
    other = str(tmp_path / 'five.msgpack')
    weights.save_variables(
        other, random_variables('efficientnet-tiny', 5, seed=0), 'efficientnet-tiny'
    )
    with pytest.raises(config_resolve.ConfigError, match='has 5 classes but the student has 10'):
        run_lib.create_run(_student_config(other), mesh=sharding.create_mesh(1))


def test_missing_teacher_stops_train_py_before_anything_is_written(tools_env, tmp_path):
    import subprocess
    import sys

    from tests.test_train_loop import ROOT

    workdir = tmp_path / 'run'
    proc = subprocess.run(
        [
            sys.executable,
            'train.py',
            '--config=configs/smoke.py',
            f'--workdir={workdir}',
            f'--config.distill.teacher={tmp_path / "no_such_teacher"}',
        ],
        cwd=ROOT,
        env=tools_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]  # a user error (efficientnet/cli.py)
    last = proc.stderr.strip().splitlines()[-1]
    assert 'config.distill.teacher=' in last and 'not found' in last, last
    assert not workdir.exists() or not any(workdir.iterdir())
