"""MixUp and CutMix on a host-local batch, within fixed groups of rows.

A batch is cut into groups of `group_size` consecutive rows; each example is partnered with
the example at the mirrored row of its group (the whole batch as one group: the reversed batch).
The random draws (MixUp or CutMix per group, MixUp's λ per example, CutMix's box per group) are
made for every group of the *global* batch from one seed, and a process takes its groups' rows:
a process's slice of a global batch is mixed exactly as the whole batch would be, whatever the
process count.

Labels become mixed one-hot float32 targets [B, num_classes] (no label smoothing here: the loss
applies it). Images stay uint8; MixUp's blend is rounded to the nearest integer, which moves a
pixel by at most 0.5/255 compared with mixing floats on the device. CutMix pixels are copied
exactly.
"""

from __future__ import annotations

import tensorflow as tf


def sample_beta(shape, seed, alpha: float) -> tf.Tensor:
    """Beta(α, α) as X / (X + Y) with X, Y ~ Gamma(α), stateless."""
    s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    x = tf.random.stateless_gamma(shape, s1, alpha)
    y = tf.random.stateless_gamma(shape, s2, alpha)
    return x / tf.maximum(x + y, 1e-12)


def _cutmix_boxes(num_groups, h, w, alpha: float, seed):
    """Per group: a box of area ≈ (1 − λ)·H·W, λ ~ Beta(α, α), centred uniformly and clipped to
    the image, as [y0, y1, x0, x1] int32 vectors."""
    s_lam, s_y, s_x = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    lam = sample_beta([num_groups], s_lam, alpha)
    ratio = tf.sqrt(1.0 - lam)
    cut_h = tf.cast(ratio * tf.cast(h, tf.float32), tf.int32)
    cut_w = tf.cast(ratio * tf.cast(w, tf.float32), tf.int32)
    cy = tf.random.stateless_uniform([num_groups], s_y, 0, h, tf.int32)
    cx = tf.random.stateless_uniform([num_groups], s_x, 0, w, tf.int32)
    y0, y1 = tf.clip_by_value(cy - cut_h // 2, 0, h), tf.clip_by_value(cy + cut_h // 2, 0, h)
    x0, x1 = tf.clip_by_value(cx - cut_w // 2, 0, w), tf.clip_by_value(cx + cut_w // 2, 0, w)
    return y0, y1, x0, x1


def mix_batch(
    batch: dict,
    seed,
    num_classes: int,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    *,
    group_size: int | None = None,
    num_groups: int | None = None,
    first_group: int = 0,
) -> dict:
    """{'image' uint8 [B, H, W, C], 'label' int [B]} → mixed {'image', 'label' float [B, K]}.

    MixUp: x = λ·x + (1 − λ)·partner, per-example λ ~ Beta(α, α) folded to λ ≥ 0.5. CutMix:
    the group's box is pasted from the partner and the target weight is the uncovered area.
    With both on, each group uses one of them with probability 1/2. `group_size` (None: B),
    `num_groups` (groups in the global batch; None: this batch's) and `first_group` (this
    batch's first group in the global batch) make the draws those of the global batch.
    """
    images = batch['image']
    targets = tf.one_hot(batch['label'], num_classes, dtype=tf.float32)
    shape = tf.shape(images)
    b, h, w = shape[0], shape[1], shape[2]
    g = b if group_size is None else group_size
    local_groups = b // g
    total = local_groups if num_groups is None else num_groups

    def pick(x):  # this batch's groups of draws made for the global batch
        return x if num_groups is None else x[first_group : first_group + local_groups]

    s_choice, s_mixup, s_cutmix = tf.unstack(tf.random.experimental.stateless_split(seed, 3))

    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_mixup = pick(tf.random.stateless_uniform([total], s_choice) < 0.5)
    else:
        use_mixup = tf.fill([local_groups], mixup_alpha > 0)
    # Rows as [B, H, W·C] (a per-row weight then broadcasts along rows, which TF does fast);
    # each row's partner is the mirrored row of its group.
    rows = tf.reshape(images, [b, h, -1])
    partners = tf.reshape(tf.reverse(tf.reshape(rows, [local_groups, g, h, -1]), [1]), [b, h, -1])
    row_mixup = tf.repeat(use_mixup, g)
    mix_rows = tf.cast(tf.where(row_mixup)[:, 0], tf.int32)
    cut_rows = tf.cast(tf.where(~row_mixup)[:, 0], tf.int32)
    # The weight of each row's own target: λ for MixUp rows, the uncovered area for CutMix rows.
    weight = tf.ones([b])
    parts, indices = [], []
    if mixup_alpha > 0:
        lam = pick(sample_beta([total, g], s_mixup, mixup_alpha))
        lam = tf.reshape(tf.maximum(lam, 1.0 - lam), [b])
        lam_m = tf.gather(lam, mix_rows)[:, None, None]
        a_m = tf.cast(tf.gather(rows, mix_rows), tf.float32)
        b_m = tf.cast(tf.gather(partners, mix_rows), tf.float32)
        # A convex mix needs no clipping; + 0.5 and the cast round it.
        parts.append(tf.cast(b_m + lam_m * (a_m - b_m) + 0.5, tf.uint8))
        indices.append(mix_rows)
        weight = tf.where(row_mixup, lam, weight)
    if cutmix_alpha > 0:
        y0, y1, x0, x1 = (
            tf.repeat(pick(v), g) for v in _cutmix_boxes(total, h, w, cutmix_alpha, s_cutmix)
        )
        area = tf.cast((y1 - y0) * (x1 - x0), tf.float32) / tf.cast(h * w, tf.float32)
        weight = tf.where(row_mixup, weight, 1.0 - area)
        channels = tf.shape(images)[3]
        box = [
            tf.gather(v, cut_rows)[:, None, None] for v in (y0, y1, x0 * channels, x1 * channels)
        ]
        ys, xs = tf.range(h)[None, :, None], tf.range(w * channels)[None, None, :]
        inside = (ys >= box[0]) & (ys < box[1]) & (xs >= box[2]) & (xs < box[3])
        parts.append(tf.where(inside, tf.gather(partners, cut_rows), tf.gather(rows, cut_rows)))
        indices.append(cut_rows)
    mixed = tf.dynamic_stitch(indices, parts) if len(parts) > 1 else parts[0]
    partner_targets = tf.reshape(
        tf.reverse(tf.reshape(targets, [local_groups, g, num_classes]), [1]), [b, num_classes]
    )
    mixed_targets = weight[:, None] * targets + (1.0 - weight[:, None]) * partner_targets
    return {**batch, 'image': tf.reshape(mixed, shape), 'label': mixed_targets}
