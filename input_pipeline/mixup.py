"""MixUp and CutMix on a host-local batch, partnering each example with the reversed batch.

Labels become mixed one-hot float32 targets [B, num_classes] (no label smoothing here: the loss
applies it). Images stay uint8; MixUp's blend is rounded to the nearest integer, which moves a
pixel by at most 0.5/255 compared with mixing floats on the device.
"""

from __future__ import annotations

import tensorflow as tf


def sample_beta(shape, seed, alpha: float) -> tf.Tensor:
    """Beta(α, α) as X / (X + Y) with X, Y ~ Gamma(α), stateless."""
    s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    x = tf.random.stateless_gamma(shape, s1, alpha)
    y = tf.random.stateless_gamma(shape, s2, alpha)
    return x / tf.maximum(x + y, 1e-12)


def mixup(images, targets, alpha: float, seed):
    """Per-example λ ~ Beta(α, α), folded to λ ≥ 0.5; x = λ·x + (1 − λ)·x[::-1]."""
    shape = tf.shape(images)
    lam = sample_beta(shape[:1], seed, alpha)
    lam = tf.maximum(lam, 1.0 - lam)
    # Flattened to [B, H·W·C] so the per-example weight broadcasts along rows (much faster on
    # CPU than a 4-D broadcast); a convex mix needs no clipping, + 0.5 and the cast round it.
    a = tf.cast(tf.reshape(images, [shape[0], -1]), tf.float32)
    b = tf.reverse(a, [0])
    mixed = tf.cast(b + lam[:, None] * (a - b) + 0.5, tf.uint8)
    targets = lam[:, None] * targets + (1.0 - lam[:, None]) * tf.reverse(targets, [0])
    return tf.reshape(mixed, shape), targets


def cutmix(images, targets, alpha: float, seed):
    """One box per batch of area ≈ (1 − λ)·H·W, λ ~ Beta(α, α), pasted from the reversed batch.

    The box is clipped to the image and λ is recomputed from the pasted area, so the targets
    match the pixels.
    """
    s_lam, s_y, s_x = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    h, w = tf.shape(images)[1], tf.shape(images)[2]
    lam = sample_beta([], s_lam, alpha)
    ratio = tf.sqrt(1.0 - lam)
    cut_h = tf.cast(ratio * tf.cast(h, tf.float32), tf.int32)
    cut_w = tf.cast(ratio * tf.cast(w, tf.float32), tf.int32)
    cy = tf.random.stateless_uniform([], s_y, 0, h, tf.int32)
    cx = tf.random.stateless_uniform([], s_x, 0, w, tf.int32)
    y0, y1 = tf.clip_by_value(cy - cut_h // 2, 0, h), tf.clip_by_value(cy + cut_h // 2, 0, h)
    x0, x1 = tf.clip_by_value(cx - cut_w // 2, 0, w), tf.clip_by_value(cx + cut_w // 2, 0, w)
    # Assembled from slices (copies), not a full-batch select.
    band = images[:, y0:y1]
    pasted = tf.reverse(band[:, :, x0:x1], [0])
    band = tf.concat([band[:, :, :x0], pasted, band[:, :, x1:]], axis=2)
    images = tf.ensure_shape(
        tf.concat([images[:, :y0], band, images[:, y1:]], axis=1), images.shape
    )
    lam = 1.0 - tf.cast((y1 - y0) * (x1 - x0), tf.float32) / tf.cast(h * w, tf.float32)
    targets = lam * targets + (1.0 - lam) * tf.reverse(targets, [0])
    return images, targets


def mix_batch(
    batch: dict, seed, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0
) -> dict:
    """{'image', 'label' int} → {'image', 'label' float [B, C]}; with both on, one per batch."""
    images, targets = batch['image'], tf.one_hot(batch['label'], num_classes, dtype=tf.float32)
    choose_seed, mix_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_mixup = tf.random.stateless_uniform([], choose_seed) < 0.5
        images, targets = tf.cond(
            use_mixup,
            lambda: mixup(images, targets, mixup_alpha, mix_seed),
            lambda: cutmix(images, targets, cutmix_alpha, mix_seed),
        )
    elif mixup_alpha > 0:
        images, targets = mixup(images, targets, mixup_alpha, mix_seed)
    elif cutmix_alpha > 0:
        images, targets = cutmix(images, targets, cutmix_alpha, mix_seed)
    return {**batch, 'image': images, 'label': targets}
