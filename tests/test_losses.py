"""Label smoothing and the float32 loss."""

import jax
import jax.numpy as jnp
import numpy as np

from training.losses import cross_entropy, smooth_targets


def test_label_smoothing_targets_match_the_official_formula():
    t = np.asarray(smooth_targets(jnp.array([2, 0]), 1000, 0.1))
    assert t.shape == (2, 1000)
    np.testing.assert_allclose(t[0, 2], 0.9 + 0.1 / 1000, rtol=1e-7)
    np.testing.assert_allclose(t[0, 0], 0.1 / 1000, rtol=1e-7)
    np.testing.assert_allclose(t.sum(axis=1), 1.0, rtol=1e-6)
    # Soft (MixUp) targets are smoothed the same way.
    soft = jnp.array([[0.25, 0.75, 0.0, 0.0]])
    np.testing.assert_allclose(smooth_targets(soft, 4, 0.2), [[0.25, 0.65, 0.05, 0.05]], rtol=1e-6)


def test_cross_entropy_value_against_direct_formula(rng):
    logits = rng.normal(size=(3, 5)).astype(np.float32)
    labels = np.array([0, 4, 2])
    got = np.asarray(cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 0.1))
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    target = np.full((3, 5), 0.1 / 5)
    target[np.arange(3), labels] += 0.9
    np.testing.assert_allclose(got, -(target * logp).sum(1), rtol=1e-5)
    # Integer labels and the equivalent one-hot targets give the same loss.
    onehot = jax.nn.one_hot(labels, 5)
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), onehot, 0.1), got, rtol=1e-6)


def test_loss_is_float32_for_bfloat16_logits():
    logits = jnp.array([[30.0, -2.0, 0.5]], jnp.bfloat16)
    loss = cross_entropy(logits, jnp.array([1]), 0.1)
    assert loss.dtype == jnp.float32
    assert np.isfinite(np.asarray(loss)).all()
