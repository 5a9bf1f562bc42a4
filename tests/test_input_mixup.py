"""MixUp and CutMix: targets are convex mixes that match what happened to the pixels."""

import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import mixup

B, S, C = 6, 16, 4


def batch():
    """Example i is a flat image of value 40·i, label i % C."""
    images = np.broadcast_to((40 * np.arange(B, dtype=np.uint8))[:, None, None, None], (B, S, S, 3))
    return {'image': tf.constant(images), 'label': tf.constant(np.arange(B) % C, tf.int32)}


def test_beta_samples_have_the_right_mean_and_range():
    x = mixup.sample_beta([20000], tf.constant([1, 2]), 0.4).numpy()
    assert 0 <= x.min() and x.max() <= 1
    assert abs(x.mean() - 0.5) < 0.02 and abs(x.var() - 0.25 / 1.8) < 0.01  # α²/(4α²(2α+1))


def test_mixup_mixes_pixels_and_targets_alike():
    for s in range(4):
        out = mixup.mix_batch(batch(), tf.constant([s, 0]), C, mixup_alpha=0.4)
        images, targets = out['image'].numpy(), out['label'].numpy()
        assert images.dtype == np.uint8 and targets.shape == (B, C)
        np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
        for i in range(B):
            j = B - 1 - i
            a, b = 40.0 * i, 40.0 * j
            # recover λ from the pixels: value = λ·a + (1 − λ)·b
            lam = (images[i, 0, 0, 0] - b) / (a - b)
            assert lam >= 0.5 - 1 / 40
            want = np.zeros(C)
            want[i % C] += lam
            want[j % C] += 1 - lam
            np.testing.assert_allclose(targets[i], want, atol=0.5 / abs(a - b) + 1e-6)


def test_cutmix_box_area_matches_targets():
    for s in range(6):
        out = mixup.mix_batch(batch(), tf.constant([s, 1]), C, cutmix_alpha=1.0)
        images, targets = out['image'].numpy(), out['label'].numpy()
        np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
        for i in range(B):
            j = B - 1 - i
            pasted = (images[i, ..., 0] == 40 * j).mean()
            want = np.zeros(C)
            want[i % C] += 1 - pasted
            want[j % C] += pasted
            np.testing.assert_allclose(targets[i], want, atol=1e-6)


def test_both_on_picks_one_per_batch_and_is_deterministic():
    kinds = set()
    for s in range(10):
        out = mixup.mix_batch(batch(), tf.constant([s, 2]), C, mixup_alpha=0.4, cutmix_alpha=1.0)
        values = np.unique(out['image'].numpy()[0])
        kinds.add('cutmix' if set(values) <= {0, 200} else 'mixup')
        again = mixup.mix_batch(batch(), tf.constant([s, 2]), C, 0.4, 1.0)
        np.testing.assert_array_equal(out['image'], again['image'])
    assert kinds == {'cutmix', 'mixup'}


@pytest.mark.parametrize('alphas', [(0.2, 0.0), (0.0, 1.0)])
def test_mixing_runs_in_tf_data(alphas):
    ds = tf.data.Dataset.from_tensors(batch()).repeat(2).enumerate()
    ds = ds.map(lambda i, b: mixup.mix_batch(b, tf.stack([i, 0]), C, *alphas))
    for out in ds.as_numpy_iterator():
        assert out['label'].shape == (B, C) and out['image'].shape == (B, S, S, 3)
