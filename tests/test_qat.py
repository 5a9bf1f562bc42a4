"""Quantisation-aware training (inference/export/quant.py, training/qat.py, scripts/qat.py)
against TensorFlow's own ops: the JAX fake-quant equals ``tf.quantization.fake_quant_*`` bit
for bit with TF's straight-through gradient, the TF FakeQuant graph of a tiny Lite and a tiny
B0-like network equals the JAX QAT forward, and the converted TFLite model is int8 throughout
and agrees with JAX within a few output steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf

import efficientnet
from inference import export as ex
from inference.export import quant, tf_graph
from inference.export.network import fold_network, network_from_dict, network_to_dict
from tests.test_export import random_variables, task_images
from training import qat as qat_lib

RES = 32
FAMILIES = ('efficientnet-lite-tiny', 'efficientnet-tiny')


def edge_inputs(rng, lo: float, hi: float, narrow: bool, n: int = 2000) -> np.ndarray:
    """Random values around [lo, hi] plus every grid point of the nudged range, the half-way
    points between them and their float neighbours, and the range ends and 0."""
    steps = 254 if narrow else 255
    scale = np.float32((hi - lo) / steps)
    grid = (np.float32(lo) + np.arange(-2, steps + 3, dtype=np.float32) * scale).astype(np.float32)
    half = (grid + scale / 2).astype(np.float32)
    span = max(hi - lo, 1e-3)
    parts = [
        rng.uniform(lo - span / 4, hi + span / 4, n),
        grid,
        half,
        np.nextafter(half, np.float32(np.inf)),
        np.nextafter(half, np.float32(-np.inf)),
        [lo, hi, 0.0, -0.0],
    ]
    return np.concatenate([np.asarray(p, np.float32) for p in parts]).astype(np.float32)


def random_ranges(rng, count: int):
    """Ranges containing 0, wholly positive, wholly negative, tiny and large."""
    out = []
    for i in range(count):
        mag = float(rng.choice([1e-3, 0.1, 1.0, 30.0, 500.0]))
        a, b = np.sort(rng.normal(0, mag, 2))
        if i % 3 == 0:
            a, b = -abs(a), abs(b)
        out.append((np.float32(a), np.float32(b + mag * 1e-2)))
    return out


@pytest.mark.parametrize('narrow', [False, True])
def test_fake_quant_matches_tf_bit_for_bit(narrow):
    rng = np.random.default_rng(0)
    fq = jax.jit(lambda x, a, b: quant.fake_quant(x, a, b, narrow))
    for lo, hi in [*random_ranges(rng, 40), (np.float32(0), np.float32(0))]:
        x = edge_inputs(rng, lo, hi, narrow)
        want = tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, narrow_range=narrow)
        got = np.asarray(fq(x, lo, hi))
        np.testing.assert_array_equal(got, want.numpy(), err_msg=f'range [{lo}, {hi}]')


@pytest.mark.parametrize('narrow', [False, True])
def test_fake_quant_per_channel_matches_tf_bit_for_bit(narrow):
    rng = np.random.default_rng(1)
    ranges = random_ranges(rng, 12) + [(np.float32(0), np.float32(0))]
    lo = np.array([r[0] for r in ranges], np.float32)
    hi = np.array([r[1] for r in ranges], np.float32)
    x = np.stack([edge_inputs(rng, a, b, narrow, 500)[:1000] for a, b in ranges], axis=-1)
    want = tf.quantization.fake_quant_with_min_max_vars_per_channel(x, lo, hi, narrow_range=narrow)
    got = jax.jit(lambda x, a, b: quant.fake_quant_per_channel(x, a, b, narrow))(x, lo, hi)
    np.testing.assert_array_equal(np.asarray(got), want.numpy())


def test_gradient_is_tfs_straight_through():
    rng = np.random.default_rng(2)
    lo, hi = np.float32(-0.7), np.float32(2.3)
    x = edge_inputs(rng, lo, hi, False)
    g = rng.normal(size=x.shape).astype(np.float32)
    got = jax.grad(lambda x: jnp.sum(quant.fake_quant(x, lo, hi) * g))(x)
    want = tf.quantization.fake_quant_with_min_max_vars_gradient(g, x, lo, hi)[0]
    np.testing.assert_array_equal(np.asarray(got), want.numpy())
    assert 0 < np.count_nonzero(got) < x.size  # both sides of the range are exercised

    los = np.array([-1.0, 0.5, -3.0], np.float32)
    his = np.array([1.0, 2.0, -0.5], np.float32)
    xc = rng.uniform(-4, 4, (300, 3)).astype(np.float32)
    gc = rng.normal(size=xc.shape).astype(np.float32)
    got = jax.grad(lambda x: jnp.sum(quant.fake_quant_per_channel(x, los, his) * gc))(xc)
    want = tf.quantization.fake_quant_with_min_max_vars_per_channel_gradient(gc, xc, los, his)[0]
    np.testing.assert_array_equal(np.asarray(got), want.numpy())


@pytest.fixture(scope='module', params=FAMILIES)
def tiny(request) -> dict:
    return tiny_network(request.param)


@pytest.fixture(scope='module')
def tiny_lite() -> dict:
    """The Lite one alone, for the tests of training (compiling the B0-like gradient costs a
    minute more and exercises nothing else)."""
    return tiny_network('efficientnet-lite-tiny')


@functools.cache
def tiny_network(name: str) -> dict:
    """A random-init tiny network folded, its ranges measured on task images, the JAX QAT
    logits, the TF FakeQuant graph's logits and the converted int8 TFLite model."""
    model = efficientnet.create_model(name, num_classes=10)
    variables = random_variables(model, RES, 0)
    norm = 'lite' if efficientnet.get_variant(name).is_lite else 'imagenet'
    net = fold_network(model, variables, resolution=RES, normalization=norm)
    images = task_images(64, seed=3)[0]
    ranges = jax.jit(lambda n, x: quant.qat_forward(n, None, x)[2])(net, images)
    ranges = {k: np.asarray(v) for k, v in ranges.items()}
    logits, probabilities, _ = jax.jit(quant.qat_forward)(net, ranges, images)
    out = tf_graph.serving_function(net, ranges)(tf.constant(images))
    return dict(
        name=name,
        net=net,
        ranges=ranges,
        images=images,
        jax=(np.asarray(logits), np.asarray(probabilities)),
        tf=(out['logits'].numpy(), out['probabilities'].numpy()),
        tflite=ex.convert_qat_tflite(net, ranges),
    )


@pytest.mark.slow
def test_tf_fake_quant_graph_equals_jax(tiny):
    step = quant.logits_step(tiny['ranges'])
    diff = np.max(np.abs(tiny['tf'][0] - tiny['jax'][0]))
    assert diff <= 1e-6 * step, f'{tiny["name"]}: TF graph vs JAX {diff} ({diff / step} LSB)'
    np.testing.assert_allclose(tiny['tf'][1], tiny['jax'][1], atol=1e-6)


@pytest.mark.slow
def test_tflite_is_int8_and_agrees_with_jax(tiny):
    assert ex.int8_problems(tiny['tflite']) == []
    interpreter = tf.lite.Interpreter(model_content=tiny['tflite'])
    ops = {op['op_name'] for op in interpreter._get_ops_details()}
    assert {'CONV_2D', 'DEPTHWISE_CONV_2D', 'FULLY_CONNECTED', 'QUANTIZE'} <= ops
    if 'lite' not in tiny['name']:
        assert {'LOGISTIC', 'MUL'} <= ops  # swish and squeeze-excite run in int8 too
    out = ex.run_tflite(tiny['tflite'], tiny['images'])
    jax_logits = tiny['jax'][0]
    lsb = np.max(np.abs(out['logits'] - jax_logits)) / quant.logits_step(tiny['ranges'])
    print(f'{tiny["name"]}: TFLite int8 vs JAX QAT max logit diff {lsb:.2f} LSB')
    assert lsb <= 2.5
    np.testing.assert_array_equal(out['logits'].argmax(-1), jax_logits.argmax(-1))


@pytest.mark.slow
def test_ranges_move_only_in_training(tiny_lite):
    tiny = tiny_lite
    net, ranges, images = tiny['net'], tiny['ranges'], tiny['images'][:16]

    @jax.jit
    def passes(ranges):
        kept = quant.qat_forward(net, ranges, images, train=False)[2]
        moved = quant.qat_forward(net, ranges, images, train=True, decay=0.9)[2]
        return kept, moved, quant.qat_forward(net, None, images)[2]

    kept, moved, batch = passes(ranges)
    assert kept.keys() == ranges.keys()
    for k in ranges:
        np.testing.assert_array_equal(kept[k], ranges[k])
    name = sorted(ranges)[0]  # the first (the input's) sees the same tensor in both passes
    np.testing.assert_allclose(moved[name], 0.9 * ranges[name] + 0.1 * batch[name], rtol=1e-6)
    assert any(not np.array_equal(moved[k], ranges[k]) for k in ranges)
    for r in moved.values():
        assert r[0] <= 0.0 <= r[1]


@pytest.mark.slow
def test_train_step_updates_weights_and_ranges(tiny_lite):
    tiny = tiny_lite
    net = jax.tree.map(jnp.asarray, tiny['net'])
    ranges = {k: jnp.asarray(v) for k, v in tiny['ranges'].items()}
    before_net = jax.tree.map(np.asarray, net)
    before_ranges = dict(tiny['ranges'])
    tx = optax.adam(1e-3)
    step = qat_lib.make_train_step(tx, decay=0.9, label_smoothing=0.1)
    images, labels = task_images(16, seed=5)
    net, new_ranges, _, metrics = step(net, ranges, tx.init(net), images, labels)
    assert np.isfinite(float(metrics['loss']))
    changed = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), b), net, before_net)
    assert all(jax.tree.leaves(changed))  # every kernel and bias got a gradient
    assert any(not np.array_equal(new_ranges[k], before_ranges[k]) for k in before_ranges)


@pytest.mark.slow
def test_qat_result_round_trips(tiny_lite, tmp_path):
    tiny = tiny_lite
    path = quant.save_qat(str(tmp_path / 'q.msgpack'), tiny['net'], tiny['ranges'], {'a': 1})
    net, ranges, info = quant.load_qat(path)
    assert info == {'a': 1} and ranges.keys() == tiny['ranges'].keys()
    assert jax.tree.structure(net) == jax.tree.structure(tiny['net'])
    for a, b in zip(jax.tree.leaves(net), jax.tree.leaves(tiny['net'])):
        np.testing.assert_array_equal(a, b)
    again = network_from_dict(network_to_dict(net))
    assert jax.tree.structure(again) == jax.tree.structure(net)


def test_bad_input_fails_in_one_line(tmp_path, capsys):
    from scripts import qat as script

    args = ['qat.py', '--config=configs/qat.py', f'--workdir={tmp_path / "out"}']
    missing = str(tmp_path / 'no_such_workdir')
    assert script.main([*args, f'--config.qat.init_from={missing}']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and missing in err and len(err.splitlines()) == 1, err
    assert script.main([*args, '--config.qat.steps=0', f'--config.qat.init_from={missing}']) == 2
    err = capsys.readouterr().err.strip()
    assert 'config.qat.steps must be a positive integer' in err, err
    assert script.main(args) == 2
    assert 'config.qat.init_from must name' in capsys.readouterr().err
