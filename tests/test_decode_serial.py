"""Decoding's serial split-K products (Pallas, interpreted on the CPU) against float64 NumPy."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3jax.model import decode_matmul as dm
from m3jax.model import decode_serial as ds
from m3jax.model.layers import RMSNorm

K, N = 256, 512  # 64-row steps: 4 splits; 128 columns: 4 blocks (2 gate/up pairs)


def bf16(a):
    return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def normed(h, weight, eps=1e-5):
    h = np.asarray(h, np.float64)
    return h / np.sqrt((h * h).mean(axis=-1, keepdims=True) + eps) * np.asarray(weight, np.float64)


def case(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    norm = RMSNorm(k, eps=1e-5, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    norm.weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, k), jnp.float32)
    h = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), jnp.bfloat16)
    return h, w, norm


def test_the_shapes_tested_run_several_splits_and_blocks():
    tiling = dm.pick_tiling(5, K, N)
    assert tiling.splits > 1 and N // tiling.block_n == 4


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_norm_product_is_the_norm_then_the_product(impl):
    h, w, norm = case(5, K, N)
    partials = ds.norm_product(h, ds.sum_of_squares(h), norm, w, impl)
    got = np.asarray(partials, np.float64).sum(axis=0)[:5]
    want = bf16(normed(np.asarray(h, np.float32), norm.weight[...])) @ np.asarray(w, np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_residual_product_adds_into_h_and_leaves_the_sums_of_squares(impl):
    x, w, _ = case(5, K, N, seed=1)
    h = jnp.asarray(np.random.default_rng(2).normal(size=(5, N)), jnp.bfloat16)
    new_h, sumsq, counters = ds.residual_product(x, w, h, ds.new_counters(), impl)
    product = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    want = bf16(np.asarray(h, np.float64) + bf16(product))
    assert new_h.shape == h.shape and new_h.dtype == h.dtype
    assert np.mean(np.asarray(new_h, np.float64) == want) > 0.98  # a bf16 rounding may move by one step
    np.testing.assert_allclose(np.asarray(new_h, np.float64), want, rtol=2e-2, atol=2e-2)
    h64 = np.asarray(new_h, np.float64)
    np.testing.assert_allclose(np.asarray(sumsq, np.float64).sum(axis=0)[:5], (h64 * h64).sum(axis=1), rtol=1e-5)
    assert not np.asarray(counters).any(), "the counters must come back to zero"


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_silu_product_finishes_gate_and_up_blocks_together(impl):
    h, w, norm = case(3, K, N, seed=3)
    act, counters = ds.silu_product(h, ds.sum_of_squares(h), norm, w, ds.new_counters(), impl)
    gate_up = bf16(normed(np.asarray(h, np.float32), norm.weight[...])) @ np.asarray(w, np.float64)
    gate, up = bf16(gate_up[:, :N // 2]), bf16(gate_up[:, N // 2:])
    want = gate / (1 + np.exp(-gate)) * up
    assert act.shape == (3, N // 2) and act.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(act, np.float64), want, rtol=3e-2, atol=3e-2)
    assert not np.asarray(counters).any()


def test_a_chain_reads_the_sums_of_squares_a_residual_product_left():
    """residual -> norm -> silu -> residual, counters threaded through, as a decoder layer runs them."""
    x, w_o, norm = case(4, K, K, seed=4)
    h = jnp.asarray(np.random.default_rng(5).normal(size=(4, K)), jnp.bfloat16)
    _, w_gu, _ = case(4, K, N, seed=6)
    _, w_down, _ = case(4, N // 2, K, seed=7)
    outs = {}
    for impl in ("pallas", "xla"):
        counters = ds.new_counters()
        h1, sumsq, counters = ds.residual_product(x, w_o, h, counters, impl)
        act, counters = ds.silu_product(h1, sumsq, norm, w_gu, counters, impl)
        h2, sumsq, counters = ds.residual_product(act, w_down, h1, counters, impl)
        outs[impl] = (np.asarray(h2, np.float64), np.asarray(sumsq, np.float64).sum(axis=0)[:4])
        assert not np.asarray(counters).any()
    np.testing.assert_allclose(outs["pallas"][0], outs["xla"][0], rtol=3e-2, atol=3e-2)
    np.testing.assert_allclose(outs["pallas"][1], outs["xla"][1], rtol=2e-2)


def test_shapes_without_a_tiling_take_xla():
    h, w, norm = case(2, 40, 24)  # 40 rows of weights: no 32/64-row step divides them
    assert dm.pick_tiling(2, 40, 24) is None
    np.testing.assert_array_equal(np.asarray(ds.norm_product(h, ds.sum_of_squares(h), norm, w, "pallas")),
                                  np.asarray(ds.norm_product(h, ds.sum_of_squares(h), norm, w, "xla")))
