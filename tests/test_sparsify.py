"""The token-selection rule of memory writing against the float64 loop reference."""
import jax.numpy as jnp
import numpy as np
import pytest

import naive
from m3jax.model.sparsify import Selection, kernel_token_scores, select_tokens, slot_valid, token_scores


def inputs(seed, n=3, t=12, hq=4, hkv=2, d=8, start=2):
    rng = np.random.default_rng(seed)
    q, k_pre, k_rot, v = (rng.normal(size=(n, t, h, d)).astype(np.float32) for h in (hq, hkv, hkv, hkv))
    lengths = rng.integers(3, t - start + 1, n)
    valid = np.zeros((n, t), bool)
    for i, length in enumerate(lengths):
        valid[i, start:start + length] = True  # start tokens and right padding excluded
    return q, k_pre, k_rot, v, valid


def selection(valid, top_k, combine, kernel):
    """Selection over `valid`, scored in XLA (kernel None) or through the fused-attention path."""
    start = int(np.argmax(valid[0]))
    return Selection(jnp.asarray(valid), top_k, combine, start, jnp.asarray(valid.sum(-1)), kernel)


@pytest.mark.parametrize("kernel", [None, "xla"])
@pytest.mark.parametrize("combine", ["sum", "max"])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (6, 1)])
def test_scores_and_selection_match_naive(combine, heads, kernel):
    q, k_pre, k_rot, v, valid = inputs(sum(heads) + len(combine), hq=heads[0], hkv=heads[1])
    if kernel is None:
        got = np.asarray(token_scores(jnp.asarray(q), jnp.asarray(k_pre), jnp.asarray(valid), combine))
    else:  # the values' gradient of attention over [start, start + length), one per valid query
        start, lengths = int(np.argmax(valid[0])), jnp.asarray(valid.sum(-1))
        got = np.asarray(kernel_token_scores(jnp.asarray(q), jnp.asarray(k_pre), start, lengths, combine, kernel))
    ref = naive.token_scores(q, k_pre, valid, combine)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(got), finite)
    np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-5)

    top_k = 3
    keys, values = select_tokens(*(jnp.asarray(x) for x in (q, k_pre, k_rot, v)),
                                 selection(valid, top_k, combine, kernel))
    idx = naive.top_tokens(ref, top_k)  # (N, Hkv, k)
    for n in range(q.shape[0]):
        for g in range(k_pre.shape[2]):
            np.testing.assert_array_equal(np.asarray(keys)[n, g], k_rot[n, idx[n, g], g])
            np.testing.assert_array_equal(np.asarray(values)[n, g], v[n, idx[n, g], g])


def test_scores_are_attention_received():
    """Each valid query spreads one unit of attention per head: scores of a group sum to heads x queries."""
    q, k_pre, _, _, valid = inputs(7, hq=6, hkv=2)
    scores = np.asarray(token_scores(jnp.asarray(q), jnp.asarray(k_pre), jnp.asarray(valid)))
    totals = np.where(np.isfinite(scores), scores, 0).sum(-1)
    np.testing.assert_allclose(totals, np.broadcast_to(3 * valid.sum(-1)[:, None], totals.shape), rtol=1e-5)


def test_short_reference_marks_padding_slots():
    valid = np.zeros((2, 10), bool)
    valid[0, 2:4] = True  # 2 real tokens
    valid[1, 2:10] = True  # 8 real tokens
    np.testing.assert_array_equal(np.asarray(slot_valid(jnp.asarray(valid), 4)),
                                  [[True, True, False, False], [True, True, True, True]])
