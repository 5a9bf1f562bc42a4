"""scripts/eval.py and scripts/predict.py end to end, and the shipped ImageNet class names.

The oracle for evaluation is computed here from the image files with TensorFlow's decoders and
resize op and numpy (our own crop window and normalisation), not through the input pipeline;
prediction is checked with a classifier solved so that each test colour maps to a chosen
ImageNet class.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import efficientnet
from efficientnet import normalization
from efficientnet.classes import imagenet_class_names, imagenet_wnids
from efficientnet.weights import save_variables
from scripts import eval as eval_script
from scripts import predict as predict_script
from tests import input_fixtures as fx
from tests.inference_fixtures import (
    WORKDIR_CLASS_NAMES,
    random_variables,
    trained_workdir,
    training_log,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = 'efficientnet-tiny'
SIZE = 32  # efficientnet-tiny's resolution: crop 32 / (32 + 32) of the shorter side
XLA = ['--depthwise-impl', 'xla']


# --------------------------------------------------------------------------------- the oracle


def oracle_image(path: str, size: int = SIZE) -> np.ndarray:
    """Centre square of side int(S / (S + 32) * min(h, w)) at ((h - side + 1) // 2, ...),
    bicubic resize to S without antialiasing, rounded to uint8 (docs/reference.md §5). JPEGs are
    decoded inside the window (TF's decode_and_crop_jpeg, as the official code does), others
    with PIL."""
    with open(path, 'rb') as f:
        data = f.read()
    w, h = Image.open(path).size
    side = int(size / (size + 32) * min(h, w))
    oy, ox = (h - side + 1) // 2, (w - side + 1) // 2
    if data[:3] == b'\xff\xd8\xff':
        crop = tf.io.decode_and_crop_jpeg(data, [oy, ox, side, side], channels=3).numpy()
    else:
        crop = np.asarray(Image.open(path).convert('RGB'))[oy : oy + side, ox : ox + side]
    out = tf.image.resize(crop[None].astype(np.float32), [size, size], method='bicubic')
    return np.round(np.clip(out[0].numpy(), 0, 255)).astype(np.uint8)


def oracle_apply(name: str, variables: dict, images: np.ndarray) -> np.ndarray:
    num_classes = (
        variables['params']['classifier']['kernel'].shape[1]
        if ('classifier' in variables['params'])
        else 0
    )
    model = efficientnet.create_model(name, num_classes=num_classes, depthwise_impl='xla')
    mean, std = normalization.IMAGENET_MEAN, normalization.IMAGENET_STD
    x = (images.astype(np.float32) - np.float32(mean)) / np.float32(std)
    return np.asarray(jax.jit(model.apply)(variables, x), np.float64)


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope='module')
def labelled_folder(tmp_path_factory):
    """10 classes x 2 images: a landscape JPEG and a portrait PNG each, so the crop is taken
    along both axes and both decoders run. Returns (root, [(path, label)])."""
    root = tmp_path_factory.mktemp('labelled')
    files = []
    for c in range(10):
        os.makedirs(root / f'class_{c}')
        jpeg, png = root / f'class_{c}' / 'a.jpg', root / f'class_{c}' / 'b.png'
        jpeg.write_bytes(fx.encode(fx.color_image(2 * c, 40, 56, seed=1), quality=92))
        png.write_bytes(fx.encode(fx.color_image(2 * c + 1, 50, 36, seed=2), 'PNG'))
        files += [(str(jpeg), c), (str(png), c)]
    return str(root), files


@pytest.fixture(scope='module')
def tiny10(labelled_folder, tmp_path_factory):
    """A 10-class efficientnet-tiny with random weights whose classifier bias removes the part
    of the logits common to every test image, so that predictions differ between images."""
    _, files = labelled_folder
    variables = random_variables(TINY, 10, seed=21)
    backbone = {
        'params': {k: v for k, v in variables['params'].items() if k != 'classifier'},
        'batch_stats': variables['batch_stats'],
    }
    features = oracle_apply(TINY, backbone, np.stack([oracle_image(p) for p, _ in files]))
    kernel = variables['params']['classifier']['kernel']
    variables['params']['classifier']['bias'] = -(features.mean(0) @ kernel).astype(np.float32)
    path = str(tmp_path_factory.mktemp('weights') / 'tiny10.msgpack')
    save_variables(path, variables, TINY)
    return path, variables


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        XLA_FLAGS='--xla_force_host_platform_device_count=1',
        TF_CPP_MIN_LOG_LEVEL='3',
        JAX_PLATFORMS='cpu',
    )
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, 'scripts', script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---------------------------------------------------------------------------------- eval.py


def test_eval_reproduces_independent_top1_top5(labelled_folder, tiny10, tmp_path, capsys):
    root, files = labelled_folder
    path, variables = tiny10
    out = tmp_path / 'result.json'
    # 20 images in batches of 8 (split over the 8 test devices): the last batch is padded.
    rc = eval_script.main(
        [
            path,
            '--dataset',
            'folder',
            '--folder',
            root,
            '--split',
            'all',
            '--batch-size',
            '8',
            '--output',
            str(out),
            *XLA,
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())

    images = np.stack([oracle_image(p) for p, _ in files])
    labels = np.array([label for _, label in files])
    logits = oracle_apply(TINY, variables, images)
    ranked = np.argsort(-logits, axis=1)
    top1 = np.mean(ranked[:, 0] == labels)
    top5 = np.mean([label in r[:5] for label, r in zip(labels, ranked)])
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -np.mean(log_probs[np.arange(len(labels)), labels])

    assert report['count'] == len(files) == 20
    assert report['top1'] == pytest.approx(top1, abs=1e-9)
    assert report['top5'] == pytest.approx(top5, abs=1e-9)
    assert report['loss'] == pytest.approx(loss, rel=1e-4)
    assert 0 < top5 < 1 and len(set(ranked[:, 0])) > 2  # the comparison means something
    assert (report['model'], report['format'], report['dataset'], report['split']) == (
        TINY,
        'msgpack',
        'folder',
        'all',
    )
    assert (report['resolution'], report['crop_fraction'], report['interpolation']) == (
        32,
        0.5,
        'bicubic',
    )
    printed = capsys.readouterr().out
    assert f'top-1 {100 * top1:.2f}%' in printed and 'count 20' in printed


def test_eval_bad_data(tiny10, tmp_path, capsys):
    path, _ = tiny10
    rc = eval_script.main([path, '--dataset', 'imagenet2012', '--data-dir', str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith('error: tfds dataset imagenet2012 is not prepared')
    assert 'https://image-net.org' in err and 'tfds build imagenet2012' in err
    (tmp_path / 'no_images' / 'a').mkdir(parents=True)
    (tmp_path / 'no_images' / 'b').mkdir()
    rc = eval_script.main([path, '--dataset', 'folder', '--folder', str(tmp_path / 'no_images')])
    assert rc == 2 and 'has no examples in split' in capsys.readouterr().err
    rc = eval_script.main([path, '--dataset', 'folder'])
    assert rc == 2 and '--dataset folder needs --folder' in capsys.readouterr().err


def test_eval_command_line_errors(tiny10, tmp_path):
    path, _ = tiny10
    missing = run_script('eval.py', str(tmp_path / 'gone.msgpack'))
    assert missing.returncode == 2
    assert missing.stderr.strip().endswith(
        f'error: weights not found: {tmp_path}/gone.msgpack (no such file or directory)'
    )
    wrong = run_script('eval.py', path, '--model', 'b0')
    assert wrong.returncode == 2
    assert 'error: loading msgpack weights' in wrong.stderr
    assert "model='b0' but the file holds efficientnet-tiny" in wrong.stderr
    (tmp_path / 'empty').mkdir()
    empty = run_script('eval.py', path, '--dataset', 'folder', '--folder', str(tmp_path / 'empty'))
    assert empty.returncode == 2 and 'has no class subfolders' in empty.stderr
    for result in (missing, wrong, empty):
        assert 'Traceback' not in result.stderr


# ------------------------------------------------------------------------------- predict.py

TARGETS = {0: 0, 7: 1, 19: 500}  # colour id -> ImageNet label it is made to predict


@pytest.fixture(scope='module')
def colour_classifier(tmp_path_factory):
    """A 1000-class efficientnet-tiny whose classifier is solved (least squares on the pooled
    features of the test images) so that colour id k scores 10 for TARGETS[k] and 0 elsewhere.
    Returns (weights path, {image path: label})."""
    root = tmp_path_factory.mktemp('predict')
    paths = {}
    for ident, label in TARGETS.items():
        p = str(root / f'colour_{ident}.jpg')
        with open(p, 'wb') as f:
            f.write(fx.encode(fx.color_image(ident, 60, 44), quality=95))
        paths[p] = label
    variables = random_variables(TINY, 1000, seed=31)
    backbone = {
        'params': {k: v for k, v in variables['params'].items() if k != 'classifier'},
        'batch_stats': variables['batch_stats'],
    }
    features = oracle_apply(TINY, backbone, np.stack([oracle_image(p) for p in paths]))
    targets = np.zeros((len(paths), 1000))
    targets[np.arange(len(paths)), list(paths.values())] = 10.0
    variables['params']['classifier'] = {
        'kernel': (np.linalg.pinv(features) @ targets).astype(np.float32),
        'bias': np.zeros(1000, np.float32),
    }
    weights = str(root / 'colours.msgpack')
    save_variables(weights, variables, TINY)
    return weights, paths


def test_predict_names_the_class_and_skips_a_corrupt_file(colour_classifier, tmp_path, capsys):
    weights, paths = colour_classifier
    corrupt = tmp_path / 'corrupt.jpg'
    corrupt.write_bytes(b'\xff\xd8\xff\xe0 this is not really a jpeg')
    images = list(paths)
    rc = predict_script.main(
        [images[0], str(corrupt), *images[1:], '--weights', weights, '--json', '--top', '3', *XLA]
    )
    assert rc == 0
    captured = capsys.readouterr()
    results = [json.loads(line) for line in captured.out.splitlines()]
    assert [r['image'] for r in results] == images
    names = imagenet_class_names()
    for r in results:
        best = r['top'][0]
        assert best['label'] == paths[r['image']]
        assert best['name'] == names[paths[r['image']]]
        assert best['probability'] > 0.9  # e^10 / (e^10 + 999)
        assert len(r['top']) == 3
    assert results[0]['top'][0]['name'] == 'tench'
    assert f'error: {corrupt}: not a decodable image' in captured.err
    assert '3 of 4 images predicted, 1 failed' in captured.err


def test_predict_text_output_and_all_failing(colour_classifier, tmp_path, capsys):
    weights, paths = colour_classifier
    first = next(iter(paths))
    assert predict_script.main([first, '--weights', weights, *XLA]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == first and len(lines) == 6
    assert lines[1].split('%', 1)[1].strip() == 'tench'
    (tmp_path / 'empty.png').write_bytes(b'')
    rc = predict_script.main(
        [str(tmp_path / 'empty.png'), str(tmp_path / 'absent.jpg'), '--weights', weights, *XLA]
    )
    err = capsys.readouterr().err
    assert rc == 2  # no image predicted: bad input
    assert f'error: {tmp_path}/empty.png: empty file' in err
    assert f'error: {tmp_path}/absent.jpg: No such file or directory' in err


def test_predict_command_line_errors(tmp_path):
    missing = run_script(
        'predict.py', 'x.jpg', '--weights', str(tmp_path / 'none.pth'), '--model', 'b0'
    )
    assert missing.returncode == 2
    assert f'error: weights not found: {tmp_path}/none.pth' in missing.stderr
    assert 'Traceback' not in missing.stderr


# ------------------------------------------------------------------------------ class names


def test_imagenet_class_names_file():
    import tensorflow_datasets as tfds

    names, wnids = imagenet_class_names(), imagenet_wnids()
    assert len(names) == len(set(names)) == 1000
    assert names[0] == 'tench' and names[1] == 'goldfish' and names[999] == 'toilet tissue'
    tfds_wnids = (tfds.core.tfds_path('datasets/imagenet2012') / 'labels.txt').read_text().split()
    assert wnids == tfds_wnids == sorted(wnids)
    assert all(n and n == n.strip() and '\t' not in n for n in names)
    with open(os.path.join(ROOT, 'efficientnet', 'imagenet_classes.txt')) as f:
        assert f.readline().startswith('# ImageNet-1k')


# -------------------------------------------------------------- a workdir from train.py


def test_eval_of_a_workdir_uses_its_dataset(capsys):
    workdir, _ = trained_workdir()
    rc = eval_script.main([workdir, '--batch-size', '2', *XLA])
    assert rc == 0
    captured = capsys.readouterr()
    # The workdir's own eval split: round(0.1 * 6) = 1 held-out image per class.
    assert 'count 3' in captured.out
    assert 'on folder validation: 3 examples at 32px' in captured.err


_EVAL_LINE = re.compile(
    r'eval at step (\d+) epoch \S+ \| top1 (\S+) \(EMA (\S+)\) top5 (\S+) \(EMA (\S+)\) '
    r'loss (\S+) \(EMA (\S+)\) on (\d+) examples'
)


def logged_eval(log: str, step: int) -> dict[str, str]:
    """What train.py logged for its eval at ``step`` (``log``: its stderr): {'eval/...': value}."""
    found = [m for m in _EVAL_LINE.finditer(log) if int(m.group(1)) == step]
    assert found, f'no eval line for step {step} in the log'
    keys = ('raw_top1', 'ema_top1', 'raw_top5', 'ema_top5', 'raw_loss', 'ema_loss', 'count')
    return {f'eval/{k}': v for k, v in zip(keys, found[-1].groups()[1:])}


def assert_eval_agrees_with_training_log(workdir, step, log, tmp_path, batch_size):
    """scripts/eval.py on ``workdir``'s checkpoint ``step`` reports what train.py logged for its
    own eval of that step (``log``: train.py's stderr), for the EMA and the raw weights."""
    logged = logged_eval(log, step)
    for name, flags in (('ema', []), ('raw', ['--no-ema'])):
        out = tmp_path / f'{name}.json'
        step_dir = os.path.join(workdir, 'checkpoints', str(step))
        args = [step_dir, '--batch-size', str(batch_size), '--output', str(out), *flags, *XLA]
        assert eval_script.main(args) == 0
        report = json.loads(out.read_text())
        assert report['count'] == int(logged['eval/count'])
        for key in ('top1', 'top5', 'loss'):  # logged with 6 significant digits
            assert report[key] == pytest.approx(float(logged[f'eval/{name}_{key}']), rel=1e-5)


def test_eval_of_a_workdir_step_agrees_with_the_training_run(tmp_path):
    """train.py evaluated the final step with its own jitted eval step; the script, given that
    step's directory, must report the same for the EMA and the raw weights. (The smoke run on
    fake data gets the same check in test_train_loop.py.)"""
    workdir, _ = trained_workdir()
    with open(training_log()) as f:
        log = f.read()
    assert logged_eval(log, 2)['eval/count'] == '3'
    assert_eval_agrees_with_training_log(workdir, 2, log, tmp_path, batch_size=2)


def test_predict_uses_the_workdir_class_names(capsys):
    workdir, folder = trained_workdir()
    image = os.path.join(folder, WORKDIR_CLASS_NAMES[0], 'img_0.jpg')
    assert predict_script.main([image, '--weights', workdir, '--json', *XLA]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(t['name'] for t in result['top']) == list(WORKDIR_CLASS_NAMES)  # top-5 of 3
