"""The decode attention kernel (Pallas, interpreted on the CPU) against a float64 softmax written out."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.model import decode_attention as da
from m3jax.model import decode_matmul as dm
from m3jax.model.layers import apply_rope, rope_angles


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


def rotated_in_numpy(x, cos, sin):
    """Rotate-half RoPE in float64: x (B, H, D), cos/sin (B, D)."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None] + rotated * sin[:, None]


@pytest.mark.parametrize("dtype,splits,memory", [(jnp.float32, 3, False), (jnp.float32, 1, True),
                                                 (jnp.bfloat16, 5, True)])
def test_rope_variant_sums_the_partials_and_rotates(dtype, splits, memory):
    """From the q/k/v product's partial sums (rows padded past B): the same attention as rotating the summed
    product first, and the cache gets the rotated key and the plain value."""
    b, s, hq, hkv, d, nm = 3, 120, 10, 2, 80, 24
    ks = jax.random.split(jax.random.key(7), 4)
    partials = jax.random.normal(ks[0], (splits, 16, hq + 2 * hkv, d), jnp.float32)
    partials = partials.at[:, b:].set(1e4)  # padding rows: never read
    cache_k, cache_v = (jax.random.normal(k, (b, s, hkv, d), dtype) for k in ks[1:3])
    memory_valid = jax.random.bernoulli(ks[3], 0.6, (b, nm)) if memory else None
    write_at = jnp.array([0, 41, s - nm - 1])
    cos, sin = rope_angles(write_at + 5, d, 10000.0)
    out, new_k, new_v = da.decode_attention_rope(partials, cos, sin, cache_k, cache_v, write_at, memory_valid,
                                                 dtype=dtype)
    assert out.dtype == dtype
    # reference: the product rounded to dtype, RoPE in float64, the attention in float64
    product = np.asarray(partials.sum(0)[:b].astype(dtype), np.float64)
    q = rotated_in_numpy(product[:, :hq], np.asarray(cos), np.asarray(sin))
    k_new = rotated_in_numpy(product[:, hq:hq + hkv], np.asarray(cos), np.asarray(sin))
    v_new = product[:, hq + hkv:]
    want = naive(q, k_new, v_new, cache_k, cache_v, np.asarray(write_at),
                 None if memory_valid is None else np.asarray(memory_valid))
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=tol, atol=tol)
    rows = jnp.arange(b)
    # the key the cache gets is what the model's own RoPE gives (same f32 rotation, same rounding)
    k_model = apply_rope(jnp.asarray(product[:, None, hq:hq + hkv], dtype), cos[:, None], sin[:, None])[:, 0]
    np.testing.assert_allclose(np.asarray(new_k[rows, write_at], np.float32), np.asarray(k_model, np.float32),
                               rtol=tol, atol=tol)
    np.testing.assert_array_equal(new_v[rows, write_at], jnp.asarray(v_new, dtype))
    keep = np.ones((b, s), bool)
    keep[np.arange(b), np.asarray(write_at)] = False
    np.testing.assert_array_equal(np.asarray(new_k, np.float32)[keep], np.asarray(cache_k, np.float32)[keep])


def test_bad_input_is_named():
    q, k_new, v_new, cache_k, cache_v = inputs(0)
    with pytest.raises(ValueError, match="does not take"):
        da.decode_attention(q[..., :40], k_new[..., :40], v_new[..., :40], cache_k[..., :40], cache_v[..., :40],
                            jnp.zeros(3, int))
    with pytest.raises(ValueError, match="shapes disagree"):
        da.decode_attention(q, k_new, v_new, cache_k, cache_v[:, :10], jnp.zeros(3, int))
    with pytest.raises(ValueError, match="bad decode attention tiling"):
        da.decode_attention(q, k_new, v_new, cache_k, cache_v, jnp.zeros(3, int), tiling=da.Tiling(48))
    partials = jnp.zeros((2, 3, 14, 80))
    with pytest.raises(ValueError, match=r"cos \(3, 40\) and sin \(3, 80\) must be \(3, 80\)"):
        da.decode_attention_rope(partials, jnp.zeros((3, 40)), jnp.zeros((3, 80)), cache_k, cache_v,
                                 jnp.zeros(3, int), dtype=jnp.float32)
    with pytest.raises(ValueError, match="shapes disagree"):
        da.decode_attention_rope(partials[:, :2], jnp.zeros((3, 80)), jnp.zeros((3, 80)), cache_k, cache_v,
                                 jnp.zeros(3, int), dtype=jnp.float32)
    with pytest.raises(ValueError, match="unknown decode attention"):
        da.resolve_impl("flash")
    assert da.resolve_impl("auto", "gpu") == "pallas" and da.resolve_impl("auto", "cpu") == "xla"
