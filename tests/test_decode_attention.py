"""The decode attention kernel (Pallas, interpreted on the CPU) against a float64 softmax written out."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.model import decode_attention as da
from m3jax.model import decode_matmul as dm


def naive(q, k_new, v_new, cache_k, cache_v, write_at, memory_valid):
    """Per sequence and query head: softmax over [stream keys < write_at | valid memories | own key]."""
    q, k_new, v_new, cache_k, cache_v = (np.asarray(x, np.float64) for x in (q, k_new, v_new, cache_k, cache_v))
    b, hq, d = q.shape
    s, hkv = cache_k.shape[1:3]
    nm = 0 if memory_valid is None else memory_valid.shape[1]
    out = np.zeros_like(q)
    for i in range(b):
        keys = list(range(int(write_at[i]))) + [s - nm + m for m in range(nm) if memory_valid[i, m]]
        for h in range(hq):
            kv = h // (hq // hkv)
            k = np.concatenate([cache_k[i, keys, kv], k_new[i, kv][None]])
            v = np.concatenate([cache_v[i, keys, kv], v_new[i, kv][None]])
            scores = k @ q[i, h] / np.sqrt(d)
            p = np.exp(scores - scores.max())
            out[i, h] = p @ v / p.sum()
    return out


def inputs(seed, b=3, s=150, hq=10, hkv=2, d=80, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (b, hq, d), dtype)
    k_new, v_new = (jax.random.normal(k, (b, hkv, d), dtype) for k in ks[1:3])
    cache_k, cache_v = (jax.random.normal(k, (b, s, hkv, d), dtype) for k in ks[3:5])
    return q, k_new, v_new, cache_k, cache_v


@pytest.mark.parametrize("d,hq,hkv,tiling", [(80, 10, 2, da.Tiling()), (64, 4, 4, da.Tiling(32, 3)),
                                            (48, 40, 2, da.Tiling(16, 2))])
def test_matches_naive_and_writes_the_token(d, hq, hkv, tiling):
    q, k_new, v_new, cache_k, cache_v = inputs(0, hq=hq, hkv=hkv, d=d)
    write_at = jnp.array([0, 70, 149])  # empty stream, a partial block, the last position
    out, new_k, new_v = da.decode_attention(q, k_new, v_new, cache_k, cache_v, write_at, tiling=tiling)
    want = naive(q, k_new, v_new, cache_k, cache_v, np.asarray(write_at), None)
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=2e-5)
    rows = jnp.arange(3)
    np.testing.assert_array_equal(new_k, cache_k.at[rows, write_at].set(k_new))
    np.testing.assert_array_equal(new_v, cache_v.at[rows, write_at].set(v_new))


@pytest.mark.parametrize("tiling", [da.Tiling(), da.Tiling(32, 4)])  # splits with no stream block: only memory
def test_memory_slots_in_the_tail(tiling):
    q, k_new, v_new, cache_k, cache_v = inputs(1, s=200)
    nm = 70  # more than one block of keys, not a multiple of it
    memory_valid = jax.random.bernoulli(jax.random.key(2), 0.6, (3, nm))
    write_at = jnp.array([5, 64, 129])
    out, new_k, _ = da.decode_attention(q, k_new, v_new, cache_k, cache_v, write_at, memory_valid, tiling)
    want = naive(q, k_new, v_new, cache_k, cache_v, np.asarray(write_at), np.asarray(memory_valid))
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(new_k[:, 130:], cache_k[:, 130:])  # memories untouched


def test_bfloat16_close_to_naive():
    q, k_new, v_new, cache_k, cache_v = inputs(3, dtype=jnp.bfloat16)
    write_at = jnp.array([10, 100, 140])
    out, _, _ = da.decode_attention(q, k_new, v_new, cache_k, cache_v, write_at)
    assert out.dtype == jnp.bfloat16
    want = naive(q, k_new, v_new, cache_k, cache_v, np.asarray(write_at), None)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2)


def test_power_of_two_parts_and_fits():
    assert dm.power_of_two_parts(80) == ((0, 64), (64, 16))
    assert dm.power_of_two_parts(128) == ((0, 128),)
    assert dm.power_of_two_parts(112) == ((0, 64), (64, 32), (96, 16))
    assert dm.power_of_two_parts(40) is None
    assert dm.power_of_two_parts(3200) == ((0, 2048), (2048, 1024), (3072, 128))  # m3_2p4b's hidden size
    assert da.fits(40, 8, 80) and not da.fits(40, 8, 40) and not da.fits(128, 1, 64)


def test_bad_input_is_named():
    q, k_new, v_new, cache_k, cache_v = inputs(0)
    with pytest.raises(ValueError, match="does not take"):
        da.decode_attention(q[..., :40], k_new[..., :40], v_new[..., :40], cache_k[..., :40], cache_v[..., :40],
                            jnp.zeros(3, int))
    with pytest.raises(ValueError, match="shapes disagree"):
        da.decode_attention(q, k_new, v_new, cache_k, cache_v[:, :10], jnp.zeros(3, int))
    with pytest.raises(ValueError, match="bad decode attention tiling"):
        da.decode_attention(q, k_new, v_new, cache_k, cache_v, jnp.zeros(3, int), tiling=da.Tiling(48))
    with pytest.raises(ValueError, match="unknown decode attention"):
        da.resolve_impl("flash")
    assert da.resolve_impl("auto", "gpu") == "pallas" and da.resolve_impl("auto", "cpu") == "xla"
