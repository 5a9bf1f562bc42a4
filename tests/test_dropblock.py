"""DropBlock: the mask equals the official TensorFlow algorithm's (tensorflow/tpu ResNet) on the
same noise; the dropped fraction, the block contiguity, the per-channel masks and the
renormalisation; identity at evaluation; the linear keep-prob schedule; the model hook."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficientnet
from efficientnet import dropblock


def _tf_official_mask(noise: np.ndarray, keep_prob: float, block_size: int) -> np.ndarray:
    """tensorflow/tpu models/official/resnet/resnet_model.py ``dropblock`` (square maps), its
    TensorFlow ops on the given uniform noise instead of tf.random_uniform."""
    import tensorflow as tf

    width = noise.shape[1]
    block_size = min(block_size, width)
    seed_drop_rate = (1.0 - keep_prob) * width**2 / block_size**2 / (width - block_size + 1) ** 2
    w_i, h_i = tf.meshgrid(tf.range(width), tf.range(width))
    valid_block = tf.logical_and(
        tf.logical_and(w_i >= int(block_size // 2), w_i < width - (block_size - 1) // 2),
        tf.logical_and(h_i >= int(block_size // 2), h_i < width - (block_size - 1) // 2),
    )
    valid_block = tf.cast(tf.reshape(valid_block, [1, width, width, 1]), tf.float32)
    seed_keep_rate = tf.cast(1 - seed_drop_rate, dtype=tf.float32)
    block_pattern = tf.cast((1 - valid_block + seed_keep_rate + noise) >= 1, tf.float32)
    if block_size == width:
        block_pattern = tf.reduce_min(block_pattern, axis=[1, 2], keepdims=True)
        return np.broadcast_to(block_pattern.numpy(), noise.shape)
    block_pattern = -tf.nn.max_pool(
        -block_pattern, ksize=[1, block_size, block_size, 1], strides=[1, 1, 1, 1], padding='SAME'
    )
    return block_pattern.numpy()


@pytest.mark.parametrize(
    'width,block_size,keep_prob',
    [(14, 7, 0.9), (16, 4, 0.8), (7, 7, 0.9), (5, 7, 0.7), (9, 1, 0.9)],
)
def test_mask_equals_official_tensorflow_algorithm(width, block_size, keep_prob):
    noise = np.random.default_rng(width * block_size).uniform(size=(4, width, width, 6))
    noise = noise.astype(np.float32)
    ours = np.asarray(dropblock.keep_mask(jnp.asarray(noise), keep_prob, block_size))
    np.testing.assert_array_equal(ours, _tf_official_mask(noise, keep_prob, block_size))


def _drawn_mask(shape, keep_prob, block_size, seed=0):
    noise = jax.random.uniform(jax.random.key(seed), shape, jnp.float32)
    return np.asarray(dropblock.keep_mask(noise, keep_prob, block_size))


def test_dropped_fraction_is_about_one_minus_keep_prob():
    for keep_prob, b in [(0.9, 5), (0.8, 3), (0.95, 7)]:
        mask = _drawn_mask((16, 28, 28, 32), keep_prob, b)
        dropped = 1.0 - mask.mean()
        # gamma targets 1 - keep_prob; overlapping blocks drop a little less.
        assert 0.8 * (1 - keep_prob) < dropped <= 1.05 * (1 - keep_prob), (keep_prob, b, dropped)


def test_drops_are_whole_blocks_inside_the_map_and_differ_per_channel():
    b = 5
    mask = _drawn_mask((4, 20, 20, 8), 0.85, b, seed=1)
    dropped = mask == 0
    covered = np.zeros_like(dropped)
    for i in range(20 - b + 1):  # every fully dropped b x b window inside the map
        for j in range(20 - b + 1):
            win = dropped[:, i : i + b, j : j + b, :].all(axis=(1, 2))
            covered[:, i : i + b, j : j + b, :] |= win[:, None, None, :]
    assert dropped.any()
    np.testing.assert_array_equal(covered, dropped)  # no dropped pixel outside a whole block
    # Per-channel masks: the channels of one example are not all dropped alike.
    per_channel = dropped[0].reshape(-1, 8).T
    assert len({row.tobytes() for row in per_channel}) > 1


def test_renormalises_by_the_kept_fraction_and_is_identity_at_keep_one():
    x = jnp.ones((8, 12, 12, 16), jnp.float32)
    out = np.asarray(dropblock.dropblock(x, 0.8, 3, jax.random.key(2)))
    kept = out != 0
    assert 0 < kept.mean() < 1
    np.testing.assert_allclose(out[kept], 1.0 / kept.mean(), rtol=1e-6)
    np.testing.assert_allclose(out.mean(), 1.0, rtol=1e-5)
    x = jax.random.normal(jax.random.key(3), (2, 9, 9, 4))
    np.testing.assert_array_equal(np.asarray(dropblock.dropblock(x, 1.0, 3, jax.random.key(4))), x)


def test_keep_prob_schedule_is_linear_from_one():
    keep = np.asarray(dropblock.scheduled_keep_prob(np.array([0, 25, 50, 100, 150]), 100, 0.9))
    np.testing.assert_allclose(keep, [1.0, 0.975, 0.95, 0.9, 0.9], rtol=1e-6)


def test_model_applies_it_in_training_on_chosen_stages_only():
    model = efficientnet.create_model(
        'efficientnet-tiny', num_classes=10, dropblock_stages=(-2, -1), dropblock_size=3,
        dropout_rate=0.0, drop_path_rate=0.0,
    )  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (4, 64, 64, 3))
    variables = model.init(jax.random.key(1), x)
    rngs = {'dropout': jax.random.key(5)}

    def train(keep):
        out, _ = model.apply(
            variables, x, train=True, rngs=rngs, mutable=['batch_stats'], dropblock_keep_prob=keep
        )
        return np.asarray(out)

    no_db = np.asarray(model.apply(variables, x, train=True, rngs=rngs, mutable=['batch_stats'])[0])
    np.testing.assert_array_equal(train(1.0), no_db)  # keep 1: nothing dropped
    assert np.abs(train(0.5) - no_db).max() > 1e-3
    evaluated = np.asarray(model.apply(variables, x, dropblock_keep_prob=0.5))
    np.testing.assert_array_equal(evaluated, np.asarray(model.apply(variables, x)))
    with pytest.raises(ValueError, match='DropBlock stage 9 does not exist'):
        efficientnet.create_model('efficientnet-tiny', dropblock_stages=(9,)).apply(
            variables, x, train=True, rngs=rngs, mutable=['batch_stats'], dropblock_keep_prob=0.9
        )


def test_each_stage_gets_the_official_per_group_keep_prob(monkeypatch):
    """tensorflow/tpu resnet_model.py: group g of 4 keeps ``1 - (1 - keep) / 4 ** (4 - g)``, so
    the last group drops at the full rate and each one before it at a quarter of the next's.
    Here the stages play the groups: the keep probability each DropBlock call receives, for
    stages 4, 5 and 6 of 7 at keep 0.9."""
    official = {4: 1 - 0.1 / 16, 5: 1 - 0.1 / 4, 6: 0.9}
    model = efficientnet.create_model(
        'efficientnet-tiny', num_classes=10, dropblock_stages=(4, 5, 6), dropblock_size=3,
        dropout_rate=0.0, drop_path_rate=0.0,
    )  # fmt: skip
    x = jnp.zeros((2, 32, 32, 3))
    variables = model.init(jax.random.key(1), x)
    seen = []
    real = dropblock.dropblock
    monkeypatch.setattr(
        dropblock, 'dropblock', lambda x, keep, *a: seen.append(float(keep)) or real(x, keep, *a)
    )
    model.apply(
        variables, x, train=True, rngs={'dropout': jax.random.key(2)}, mutable=['batch_stats'],
        dropblock_keep_prob=0.9,
    )  # fmt: skip
    blocks = [b.stage for b in model.blocks if b.stage in official]
    assert seen == pytest.approx([official[s] for s in blocks], rel=1e-7)
    assert len(set(blocks)) == 3
    seen.clear()  # scale_by_stage False: the same keep probability everywhere
    model.clone(dropblock_scale_by_stage=False).apply(
        variables, x, train=True, rngs={'dropout': jax.random.key(2)}, mutable=['batch_stats'],
        dropblock_keep_prob=0.9,
    )  # fmt: skip
    assert seen == pytest.approx([0.9] * len(blocks), rel=1e-7)
