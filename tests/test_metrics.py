"""Masked eval sums and top-k on fixed logits."""

import jax.numpy as jnp
import numpy as np
import pytest

from training.metrics import EvalAccumulator, eval_sums, topk_correct


def test_topk_on_fixed_logits():
    logits = jnp.array(
        [
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # label 6: rank 0
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # label 2: rank 4 -> top-5, not top-1
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # label 1: rank 5 -> neither
            [9.0, 9.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # tie at the top, label 1 -> top-1 (ties count)
        ]
    )
    labels = jnp.array([6, 2, 1, 1])
    np.testing.assert_array_equal(topk_correct(logits, labels, 1), [1, 0, 0, 1])
    np.testing.assert_array_equal(topk_correct(logits, labels, 5), [1, 1, 0, 1])


def test_masked_sums_ignore_padding_and_accumulate_exactly():
    logits = jnp.eye(4) * 10.0
    labels = jnp.array([0, 1, 3, 3])  # third is wrong
    mask = jnp.array([True, True, True, False])
    s = eval_sums(logits, labels, mask)
    assert int(s['count']) == 3 and int(s['top1']) == 2 and int(s['top5']) == 3
    acc = EvalAccumulator()
    acc.add(s)
    acc.add(eval_sums(logits, labels, jnp.array([False] * 4)))
    r = acc.result()
    assert r['count'] == 3 and r['top1'] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match='no examples'):
        EvalAccumulator().result()
