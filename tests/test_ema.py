"""EMA warmup and coverage."""

import jax.numpy as jnp
import numpy as np
import pytest

from training.ema import ema_decay, update_ema


def test_ema_warmup_values():
    # min(0.9999, (1 + t) / (10 + t)), t = updates done including the current one.
    assert float(ema_decay(0, 0.9999)) == pytest.approx(0.1)
    assert float(ema_decay(1, 0.9999)) == pytest.approx(2 / 11)
    assert float(ema_decay(90, 0.9999)) == pytest.approx(91 / 100)
    assert float(ema_decay(10**6, 0.9999)) == pytest.approx(0.9999)
    assert float(ema_decay(8, 0.5)) == pytest.approx(0.5)  # the cap


def test_update_ema_applies_to_every_leaf():
    ema = {'params': {'w': jnp.zeros(2)}, 'batch_stats': {'mean': jnp.ones(2)}}
    new = {'params': {'w': jnp.ones(2)}, 'batch_stats': {'mean': jnp.zeros(2)}}
    out = update_ema(ema, new, 1, 0.9999)
    d = 2 / 11
    np.testing.assert_allclose(out['params']['w'], 1 - d, rtol=1e-6)
    np.testing.assert_allclose(out['batch_stats']['mean'], d, rtol=1e-6)
