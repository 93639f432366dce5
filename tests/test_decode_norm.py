"""The residual add + RMSNorm kernel of decoding (Pallas, interpreted on the CPU) against NumPy."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3jax.model import decode_matmul as dm
from m3jax.model.decode_norm import add_and_norm
from m3jax.model.layers import RMSNorm


def naive(h, partials, weight, eps):
    """h + the summed product (rounded to h's dtype first, as adding a bf16 product does), then RMSNorm in float64."""
    product = np.asarray(np.asarray(partials, np.float64).sum(axis=0)[:h.shape[0]], np.float32)
    new_h = np.asarray(jnp.asarray(np.asarray(h, np.float32) + np.asarray(jnp.asarray(product).astype(h.dtype),
                                                                            np.float32)).astype(h.dtype))
    x = np.asarray(new_h, np.float64)
    normed = x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * np.asarray(weight, np.float64)
    return np.asarray(new_h, np.float32), normed


def norm_of(dim, dtype, seed):
    norm = RMSNorm(dim, eps=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    norm.weight[...] = jnp.asarray(np.random.default_rng(seed).uniform(0.5, 1.5, dim), jnp.float32)
    return norm


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows,padded,splits,dim", [
    (4, 16, 3, 80),  # two power-of-two parts (64 + 16), rows padded as the matmul kernel pads them
    (16, 16, 1, 128),  # one part, one split
    (2, 16, 5, 112),  # three parts (64 + 32 + 16)
])
def test_kernel_equals_the_sum_then_the_norm(dtype, rows, padded, splits, dim):
    rng = np.random.default_rng(rows * dim)
    h = jnp.asarray(rng.normal(size=(rows, 1, dim)), dtype)
    partials = rng.normal(size=(splits, padded, dim)).astype(np.float32)
    partials[:, rows:] = 0  # the matmul kernel's padding rows are zero
    norm = norm_of(dim, dtype, rows)
    new_h, x = add_and_norm(h, jnp.asarray(partials), norm, "pallas")
    want_h, want_x = naive(h[:, 0], partials, norm.weight[...], norm.eps)
    assert new_h.shape == x.shape == h.shape and new_h.dtype == h.dtype and x.dtype == dtype
    if dtype == jnp.float32:
        np.testing.assert_allclose(np.asarray(new_h[:, 0]), want_h, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(x[:, 0]), want_x, rtol=1e-5, atol=1e-5)
    else:  # the sum's order may move a bf16 rounding by one step, rarely
        assert np.mean(np.asarray(new_h[:, 0], np.float32) == want_h) > 0.99
        np.testing.assert_allclose(np.asarray(x[:, 0], np.float32), want_x, rtol=2e-2, atol=2e-2)
    xla_h, xla_x = add_and_norm(h, jnp.asarray(partials), norm, "xla")
    np.testing.assert_allclose(np.asarray(new_h, np.float32), np.asarray(xla_h, np.float32), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(xla_x, np.float32), rtol=2e-2, atol=2e-2)


def test_nothing_pending_is_the_norm_alone():
    h = jnp.asarray(np.random.default_rng(1).normal(size=(3, 1, 80)), jnp.float32)
    norm = norm_of(80, jnp.float32, 1)
    same, x = add_and_norm(h, None, norm, "pallas")
    assert same is h
    np.testing.assert_allclose(np.asarray(x), np.asarray(norm(h)), rtol=1e-6)


def test_partial_products_sum_to_the_product():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(5, 192)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(192, 256)), jnp.float32)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    for impl in ("pallas", "xla"):
        parts = dm.partial_products(x, w, impl)
        assert parts.ndim == 3 and parts.shape[1] >= 5 and parts.shape[2] == 256
        np.testing.assert_allclose(np.asarray(parts.sum(axis=0)[:5]), want, rtol=1e-4, atol=1e-3)
        np.testing.assert_array_equal(np.asarray(parts[:, 5:]), 0)  # padding rows
    assert dm.partial_products(x, w, "pallas").shape[0] > 1  # this shape is split over the reduction


def test_bad_input_is_named():
    norm = norm_of(80, jnp.float32, 0)
    with pytest.raises(ValueError, match="cannot be added to a residual stream"):
        add_and_norm(jnp.ones((4, 1, 80)), jnp.ones((2, 2, 80)), norm, "pallas")  # fewer rows than h
    with pytest.raises(ValueError, match="multiplies"):
        dm.partial_products(jnp.ones((4, 8)), jnp.ones((9, 4)), "xla")
    with pytest.raises(ValueError, match="unknown decode matmul"):
        dm.partial_products(jnp.ones((4, 8)), jnp.ones((8, 4)), "cublas")
