"""SwiGLU's gate/up product with the SiLU product in the kernel (Pallas; its interpreter on the CPU)
against float64, the XLA path, and the shapes the kernel leaves to XLA."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.model import decode_swiglu as ds


def _reference(x, w, dtype):
    """float64 products rounded to dtype (what the model's product gives), then the SiLU product in float64."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    gate, up = (np.asarray(jnp.asarray(x64 @ w64[:, i], jnp.float32).astype(dtype), np.float64) for i in (0, 1))
    return gate / (1 + np.exp(-gate)) * up


@pytest.mark.parametrize("m,k,n,dtype,tiling", [
    (32, 256, 96, jnp.float32, ds.Tiling(32, 64)),  # 3 programs, 4 steps each
    (5, 128, 64, jnp.float32, ds.Tiling(64, 32)),  # rows padded to 16, one program
    (17, 192, 48, jnp.bfloat16, ds.Tiling(16, 64)),  # rows padded to 32; bf16
])
def test_kernel_equals_the_float64_silu_product(m, k, n, dtype, tiling):
    x = jax.random.normal(jax.random.key(0), (m, k), dtype)
    w = (jax.random.normal(jax.random.key(1), (k, 2, n), jnp.float32) * k ** -0.5).astype(dtype)
    got = ds.swiglu_gate(x, w, "pallas", tiling)
    assert got.shape == (m, n) and got.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), _reference(x, w, dtype), rtol=tol, atol=tol)
    xla = ds.swiglu_gate(x, w, "xla")
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(xla, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("m,k,n", [(65, 128, 64), (8, 100, 64), (8, 128, 40)])
def test_shapes_the_kernel_does_not_take_go_through_xla(m, k, n):
    assert ds.pick_tiling(m, k, n) is None
    x = jax.random.normal(jax.random.key(4), (m, k), jnp.float32)
    w = jax.random.normal(jax.random.key(5), (k, 2, n), jnp.float32) * k ** -0.5
    np.testing.assert_allclose(np.asarray(ds.swiglu_gate(x, w, "pallas")), _reference(x, w, jnp.float32),
                               rtol=1e-5, atol=1e-5)


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match=r"multiplies \(m, k\) by \(k, 2, n\)"):
        ds.swiglu_gate(jnp.ones((2, 8)), jnp.ones((8, 3, 4)), "xla")
    with pytest.raises(ValueError, match="unknown decode matmul 'cublas'"):
        ds.swiglu_gate(jnp.ones((2, 8)), jnp.ones((8, 2, 4)), "cublas")
