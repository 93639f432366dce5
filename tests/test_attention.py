"""Memory attention (masks + kernels) against the float64 loop reference of tests/naive.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import naive
from m3jax.model.attention import attend
from m3jax.model.masks import context_mask

SINK = 3


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def run_jax(impl, q, k, v, mem_k, mem_v, mem_valid, padding, chunk_len, window, d_out):
    b, c, m, hkv, d = mem_k.shape
    mem_chunk = np.repeat(np.arange(c), m)  # static: the split kernels need the layout
    mask = context_mask(jnp.asarray(padding), SINK, chunk_len,
                        (mem_chunk, jnp.asarray(mem_valid).reshape(b, c * m), window))

    def f(q, k, v, mem_k, mem_v):
        keys = jnp.concatenate([mem_k.reshape(b, c * m, hkv, d), k], axis=1)
        values = jnp.concatenate([mem_v.reshape(b, c * m, hkv, d), v], axis=1)
        return attend(q, keys, values, mask, impl)

    out, vjp = jax.vjp(f, *(jnp.asarray(x) for x in (q, k, v, mem_k, mem_v)))
    return out, dict(zip(("q", "k", "v", "mem_k", "mem_v"), vjp(jnp.asarray(d_out))))


CASES = [  # (query heads, kv heads, chunks, chunk_len, partial last chunk, memories per chunk, window, padding)
    (4, 4, 1, 8, 0, 5, 1, False),
    (4, 2, 2, 8, 0, 5, 1, True),
    (6, 2, 3, 4, 0, 3, 1, True),
    (8, 1, 3, 6, 2, 2, 1, False),  # last chunk has 4 of 6 tokens
    (4, 2, 4, 4, 0, 1, 3, True),  # stage-2 layout: one memory per chunk, chunk c reads c-2..c
]


@pytest.mark.parametrize("impl", ["exact", "xla", "xla_split"])
@pytest.mark.parametrize("case", CASES)
def test_memory_attention_matches_naive_float64(impl, case):
    hq, hkv, chunks, chunk_len, short, per_chunk, window, padded = case
    rng = np.random.default_rng(hash(case) % 2**32)
    b, d, slots = 2, 8, per_chunk * 2  # 2 tokens kept per memory
    t = chunks * chunk_len - short
    q = rng.normal(size=(b, SINK + t, hq, d)).astype(np.float32)
    k, v = (rng.normal(size=(b, SINK + t, hkv, d)).astype(np.float32) for _ in range(2))
    mem_k, mem_v = (rng.normal(size=(b, chunks, slots, hkv, d)).astype(np.float32) for _ in range(2))
    mem_valid = rng.random((b, chunks, slots)) < (0.7 if padded else 1.0)
    padding = np.ones((b, t), bool)
    if padded:
        padding[1, t - chunk_len // 2 - 1:] = False
    d_out = rng.normal(size=q.shape).astype(np.float32)

    out, grads = run_jax(impl, q, k, v, mem_k, mem_v, mem_valid, padding, chunk_len, window, d_out)
    key_valid = np.concatenate([np.ones((b, SINK), bool), padding], 1)
    ref, ref_grads = naive.attention(q, k, v, key_valid, SINK, chunk_len, mem_k, mem_v, mem_valid, window,
                                     d_out=d_out)
    assert rel(out, ref) < 1e-5
    for name in ("q", "k", "v", "mem_k", "mem_v"):
        assert rel(grads[name], ref_grads[name]) < 1e-5, name


def test_memory_changes_only_its_own_chunks():
    """Perturbing chunk 1's memories moves only chunk 1's queries (window 1); the sink never reads memory."""
    rng = np.random.default_rng(0)
    b, hq, hkv, d, chunk_len, chunks, slots = 1, 2, 1, 4, 4, 3, 2
    t = chunks * chunk_len
    q = rng.normal(size=(b, SINK + t, hq, d)).astype(np.float32)
    k, v = (rng.normal(size=(b, SINK + t, hkv, d)).astype(np.float32) for _ in range(2))
    mem_k, mem_v = (rng.normal(size=(b, chunks, slots, hkv, d)).astype(np.float32) for _ in range(2))
    valid, padding = np.ones((b, chunks, slots), bool), np.ones((b, t), bool)
    zeros = np.zeros_like(q)
    base, _ = run_jax("exact", q, k, v, mem_k, mem_v, valid, padding, chunk_len, 1, zeros)
    mem_v2 = mem_v.copy()
    mem_v2[:, 1] += 10.0
    moved, _ = run_jax("exact", q, k, v, mem_k, mem_v2, valid, padding, chunk_len, 1, zeros)
    changed = np.abs(np.asarray(moved - base)).max(axis=(0, 2, 3)) > 1e-6
    expected = np.zeros(SINK + t, bool)
    expected[SINK + chunk_len:SINK + 2 * chunk_len] = True
    np.testing.assert_array_equal(changed, expected)


@pytest.mark.parametrize("impl", ["exact", "xla", "xla_split"])
def test_causal_path_without_memory_matches_naive(impl):
    """No memory keys: kernels run their causal mode with key lengths (right padding), no dense mask."""
    rng = np.random.default_rng(11)
    b, t, hq, hkv, d = 3, 20, 4, 2, 8
    q = rng.normal(size=(b, SINK + t, hq, d)).astype(np.float32)
    k, v = (rng.normal(size=(b, SINK + t, hkv, d)).astype(np.float32) for _ in range(2))
    padding = np.arange(t)[None, :] < np.array([[20], [13], [1]])
    mask = context_mask(jnp.asarray(padding), SINK, 8)
    assert mask.dense is None
    d_out = rng.normal(size=q.shape).astype(np.float32)
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask, impl), *(jnp.asarray(x) for x in (q, k, v)))
    grads = vjp(jnp.asarray(d_out))
    key_valid = np.concatenate([np.ones((b, SINK), bool), padding], 1)
    ref, ref_grads = naive.attention(q, k, v, key_valid, SINK, 8, d_out=d_out)
    assert rel(out, ref) < 1e-5
    for name, g in zip("qkv", grads):
        assert rel(g, ref_grads[name]) < 1e-5, name
