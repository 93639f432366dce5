"""Token-weighted next-token cross entropy against a NumPy float64 loop."""
import jax.numpy as jnp
import numpy as np

from m3jax.train.loss import lm_loss


def test_lm_loss_matches_loops():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 11)) * 3
    tokens = rng.integers(0, 11, (2, 6))
    mask = np.ones((2, 6), bool)
    mask[1, 4:] = False
    total, count = lm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens), jnp.asarray(mask))
    want, n = 0.0, 0
    for b in range(2):
        for t in range(5):
            if mask[b, t + 1]:
                row = logits[b, t]
                want += np.log(np.exp(row - row.max()).sum()) + row.max() - row[tokens[b, t + 1]]
                n += 1
    assert int(count) == n == 8
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
