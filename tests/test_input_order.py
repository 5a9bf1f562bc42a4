"""The global order (input_pipeline/order.py): every epoch a permutation of all N examples,
epochs and seeds unrelated, process slices that assemble the global batch for any process count,
any position computed directly; and MixUp/CutMix of a process's slice equal to the global
batch's."""

import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import mixup, order


def indices(positions, seed, n):
    return order.example_indices(tf.constant(positions, tf.int64), seed, n).numpy()


@pytest.mark.parametrize('n', [1, 2, 7, 1000, 1281167])
def test_every_epoch_visits_every_example_exactly_once(n):
    epochs = 3 if n < 10**6 else 1
    seen = indices(np.arange(epochs * n), seed=11, n=n).reshape(epochs, n)
    for epoch in seen:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n))


def test_consecutive_epochs_and_two_seeds_give_unrelated_orders():
    n = 10000
    e0, e1 = indices(np.arange(2 * n), seed=3, n=n).reshape(2, n)
    other = indices(np.arange(n), seed=4, n=n)
    for a, b in [(e0, e1), (e0, other)]:
        assert (a == b).mean() < 0.01  # a random pair of permutations shares ~1/n slots
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.05
    # Not seed + epoch: seed 3's second epoch is not seed 4's first (grain's MapDataset.shuffle
    # trap), nor any shift of it.
    assert not np.array_equal(e1, other)


def test_the_order_is_stateless_and_any_position_costs_the_same():
    n = 1281167
    far = 10**12 + np.arange(8)  # ~780k epochs in: computed directly, no skipping
    np.testing.assert_array_equal(indices(far, 5, n), indices(far, 5, n))
    assert ((0 <= indices(far, 5, n)) & (indices(far, 5, n) < n)).all()
    whole = indices(np.arange(64), 5, n)
    np.testing.assert_array_equal(indices(np.arange(20, 40), 5, n), whole[20:40])


@pytest.mark.parametrize('step', [0, 1, 7, 312, 10**6])
def test_process_slices_assemble_the_global_batch_for_any_process_count(step):
    batch = 64
    want = order.local_positions(step, batch, 0, 1).numpy()
    np.testing.assert_array_equal(want, step * batch + np.arange(batch))
    for count in (2, 4, 8):
        parts = [order.local_positions(step, batch, p, count).numpy() for p in range(count)]
        np.testing.assert_array_equal(np.concatenate(parts), want)


def test_local_batch_must_divide():
    assert order.local_batch_size(12, 4) == 3
    with pytest.raises(ValueError, match='positive multiple of the process count 5'):
        order.local_batch_size(12, 5)


def test_keys_are_hashes_of_the_seed():
    assert order.mix64(1, 2) != order.mix64(2, 1) != order.mix64(1, 3)
    assert 0 <= order.mix64(2**70, -1) < 2**63
    assert int(order.example_key(0)) != int(order.mix_key(0))


@pytest.mark.parametrize('alphas', [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixing_a_slice_equals_mixing_the_global_batch(alphas):
    """Process p's rows of a global batch, mixed with the global draws, equal rows of the
    global batch mixed whole: pairing and draws do not depend on the process count."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 16).astype(np.int32)
    seed = tf.constant([9, 4], tf.int64)
    kw = dict(group_size=2, num_groups=8)
    whole = mixup.mix_batch(
        {'image': images, 'label': labels}, seed, 10, *alphas, **kw, first_group=0
    )
    for count in (2, 4):
        rows = 16 // count
        for p in range(count):
            rows_p = slice(p * rows, (p + 1) * rows)
            part = mixup.mix_batch(
                {'image': images[rows_p], 'label': labels[rows_p]},
                seed, 10, *alphas, **kw, first_group=p * rows // 2,
            )  # fmt: skip
            for key in ('image', 'label'):
                np.testing.assert_array_equal(part[key], whole[key][rows_p])
    # Each row is mixed with its group partner only.
    target = whole['label'].numpy()
    for i in range(16):
        assert set(np.nonzero(target[i])[0]) <= {labels[i], labels[i ^ 1]}
