"""The split-K decode matmul (Pallas; its interpreter on the CPU) against float64 products, its tiling and
fallbacks, and generation through it against generation through XLA's dot."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3jax import config as config_lib
from m3jax.generate.generator import Generator
from m3jax.model import decode_matmul as dm
from m3jax.model.lm import Memory3


def _reference(x, w):
    return np.asarray(x, np.float64).reshape(-1, x.shape[-1]) @ np.asarray(w, np.float64).reshape(x.shape[-1], -1)


@pytest.mark.parametrize("m,k,n,tiling", [
    (32, 256, 384, dm.Tiling(128, 64, 4)),  # 4 partial sums over the reduction axis
    (5, 192, 64, dm.Tiling(64, 64, 1)),  # rows padded to 16, one block of columns, no split
    (17, 96, 96, dm.Tiling(32, 32, 3)),  # rows padded to 32
])
def test_kernel_equals_the_float64_product(m, k, n, tiling):
    x = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
    got = dm.pallas_matmul(x, w, tiling, interpret=True)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), _reference(x, w), rtol=1e-5, atol=1e-4)


def test_decode_matmul_keeps_leading_and_trailing_axes_and_the_output_dtype():
    x = jax.random.normal(jax.random.key(2), (4, 1, 128), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(3), (128, 3, 64), jnp.bfloat16)  # e.g. (dim, heads, head_dim)
    got = dm.decode_matmul(x, w, "pallas", out_dtype=jnp.float32)
    assert got.shape == (4, 1, 3, 64) and got.dtype == jnp.float32
    want = _reference(x.astype(jnp.float32), w.astype(jnp.float32)).reshape(4, 1, 3, 64)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-2, atol=2e-2)  # bf16 inputs, f32 accumulation
    xla = dm.decode_matmul(x, w, "xla", out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(xla), rtol=1e-3, atol=1e-3)


def test_tiling_covers_the_shape_and_fills_the_gpu():
    for m, k, n in [(32, 3200, 4480), (32, 3200, 3200), (32, 3200, 6400), (32, 3200, 60416), (8, 512, 1024)]:
        t = dm.pick_tiling(m, k, n, tuned=False)
        assert n % t.block_n == 0 and k % t.block_k == 0 and (k // t.block_k) % t.splits == 0
        steps = k // t.block_k
        fewer = [s for s in range(1, t.splits) if steps % s == 0]
        # the fewest splits that reach 100 blocks (or all of them when none does)
        assert (n // t.block_n) * t.splits >= 100 or t.splits == steps
        assert all((n // t.block_n) * s < 100 for s in fewer)


def test_tuned_tilings_cover_their_shape_and_only_it():
    for (rows, k, n), t in dm.TUNED.items():
        assert n % t.block_n == 0 and k % t.block_k == 0 and (k // t.block_k) % t.splits == 0
        assert dm.pick_tiling(rows, k, n) == t and dm.pick_tiling(rows - 1, k, n) == t  # same padded rows
        assert dm.pick_tiling(rows // 2, k, n) == dm.pick_tiling(rows // 2, k, n, tuned=False) != t


@pytest.mark.parametrize("shape", sorted(dm.TUNED))
def test_tuned_tilings_compute_their_product(shape):
    rows, k, n = shape  # on the GPU this runs the tuned warps and stages; the interpreter checks the blocks
    x = jax.random.normal(jax.random.key(4), (rows, k), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(5), (k, n), jnp.bfloat16)
    got = dm.pallas_matmul(x, w, dm.TUNED[shape], interpret=jax.default_backend() != "gpu", out_dtype=jnp.float32)
    want = _reference(x.astype(jnp.float32), w.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-3)  # f32 sums of exact bf16 products


@pytest.mark.parametrize("m,k,n", [(65, 256, 256), (8, 100, 256), (8, 256, 100)])
def test_shapes_the_kernel_does_not_fit_take_xlas_dot(m, k, n):
    assert dm.pick_tiling(m, k, n) is None
    x = jax.random.normal(jax.random.key(4), (m, k), jnp.float32)
    w = jax.random.normal(jax.random.key(5), (k, n), jnp.float32)
    np.testing.assert_allclose(np.asarray(dm.decode_matmul(x, w, "pallas")), _reference(x, w), rtol=1e-5, atol=1e-4)


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="cannot multiply"):
        dm.decode_matmul(jnp.ones((2, 8)), jnp.ones((9, 4)), "xla")
    with pytest.raises(ValueError, match="unknown decode matmul 'cublas'"):
        dm.resolve_impl("cublas")
    with pytest.raises(config_lib.ConfigError, match="model.decode_matmul"):
        config_lib.load("tiny", {"model.decode_matmul": "cublas"})


def test_auto_is_the_kernel_on_gpu_only():
    assert dm.resolve_impl("auto", "gpu") == "pallas"
    assert dm.resolve_impl("auto", "cpu") == "xla" and dm.resolve_impl("auto", "tpu") == "xla"
    assert dm.resolve_impl("xla", "gpu") == "xla"


def test_a_jax_without_the_triton_backend_gets_xla_or_a_named_error(monkeypatch):
    monkeypatch.setattr(dm, "triton_available", lambda: False)
    assert dm.resolve_impl("auto", "gpu") == "xla"
    with pytest.raises(ValueError, match="'pallas' needs Pallas' Triton backend"):
        dm.resolve_impl("pallas", "gpu")
    assert dm.resolve_impl("pallas", "cpu") == "pallas"  # the interpreter, as the CPU tests run it


def test_generation_through_the_kernel_equals_generation_through_xla():
    prompts = np.random.default_rng(0).integers(5, 200, (3, 20)).tolist()
    out = {}
    for impl in ("xla", "pallas"):
        cfg = config_lib.load("tiny", {"model.dtype": "float32", "model.decode_matmul": impl,
                                       "model.decode_attention": impl})
        out[impl] = Generator(Memory3(cfg, rngs=nnx.Rngs(0)), eos_id=-1).generate(prompts, 40, mode="none").tokens
    assert out["pallas"] == out["xla"]


def test_the_early_launch_signal_is_for_hopper_gpus_only(monkeypatch):
    """griddepcontrol is PTX of compute capability 9.0: an A100, the CPU, the interpreter and EARLY_LAUNCH = False
    trace the kernels without it."""
    assert not dm.early_launch(interpret=True)
    if jax.default_backend() != "gpu":
        assert not dm.early_launch()

    class Device:
        compute_capability = "9.0"
    monkeypatch.setattr(dm.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(dm.jax, "devices", lambda: [Device()])
    monkeypatch.setattr(dm, "triton_available", lambda: True)
    assert dm.early_launch() and not dm.early_launch(interpret=True)
    Device.compute_capability = "8.0"
    assert not dm.early_launch()
    Device.compute_capability = "9.0"
    monkeypatch.setattr(dm, "EARLY_LAUNCH", False)
    assert not dm.early_launch()
