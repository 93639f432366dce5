"""The L2 prefetch of the next product's first rows: which bytes it asks for, and that it changes no result."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3jax.model import decode_matmul as dm
from m3jax.model import l2_prefetch
from m3jax.model.decode_norm import add_and_norm
from m3jax.model.layers import RMSNorm


def test_ranges_are_the_first_rows_of_each_split_part():
    # m3_2p4b's q/k/v at batch 32: TUNED tiling, 5 splits of 640 rows over 4480 bf16 columns
    assert dm.pick_tiling(32, 3200, 4480).splits == 5
    row = 4480 * 2
    assert l2_prefetch.product_ranges(32, 3200, 4480, 2, rows=128) == tuple((i * 640 * row, 128 * row)
                                                                            for i in range(5))
    # rows past a part are cut to the part; a product XLA runs (too many rows) has nothing to ask for
    tiling = dm.pick_tiling(8, 256, 512)
    part = 256 // tiling.splits
    assert l2_prefetch.product_ranges(8, 256, 512, 4, rows=10_000)[-1] == ((tiling.splits - 1) * part * 512 * 4,
                                                                            part * 512 * 4)
    assert l2_prefetch.product_ranges(1000, 3200, 4480, 2) == ()
    assert l2_prefetch.product_ranges(32, 3200, 4480, 2, rows=0) == ()
    assert l2_prefetch.product_ranges(32, 32768, 32768, 2) == ()  # 2 GiB: past the PTX immediate offsets


def test_each_program_asks_for_an_aligned_share_of_every_range():
    ranges = ((0, 1000), (4096, 1000))
    assert l2_prefetch.share(ranges, 4) == 240  # 1000 / 4 = 250, down to a multiple of 16
    assert l2_prefetch.share(ranges, 100) == 0 and l2_prefetch.share((), 4) == 0
    asm = l2_prefetch.prefetch_asm(ranges, 240)
    assert asm.count("cp.async.bulk.prefetch.L2.global") == 2 and "[pfa+4096]" in asm and "mul.wide.u32 pfa, pfi, 240" in asm
    with pytest.raises(ValueError, match="one size"):
        l2_prefetch.share(((0, 32), (64, 48)), 2)
    with pytest.raises(ValueError, match="multiple of 16"):
        l2_prefetch.prefetch_asm(((8, 32),), 16)
    with pytest.raises(ValueError, match="multiple of 16"):
        l2_prefetch.prefetch_asm(((2 ** 31, 32),), 16)


def test_off_the_gpu_no_kernel_prefetches(monkeypatch):
    assert not l2_prefetch.enabled(interpret=True) and not l2_prefetch.enabled(site="nowhere")
    monkeypatch.setattr(l2_prefetch, "ROWS", 0)
    assert not l2_prefetch.enabled()


def test_plan_takes_only_weights_read_as_they_are(monkeypatch):
    w = jnp.zeros((3200, 2, 3200), jnp.bfloat16)  # gate/up as fused: (dim, 2, mlp)
    assert l2_prefetch.plan(w, 32, jnp.bfloat16, "norm", interpret=True) == (None, ())  # off the GPU
    monkeypatch.setattr(l2_prefetch, "enabled", lambda interpret, site: site == "norm")
    flat, ranges = l2_prefetch.plan(w, 32, jnp.bfloat16, "norm", interpret=False)
    assert flat.shape == (3200 * 6400,) and ranges == l2_prefetch.product_ranges(32, 3200, 6400, 2)
    assert l2_prefetch.plan(w, 32, jnp.float32, "norm", False) == (None, ())  # the product would read a copy
    assert l2_prefetch.plan(w, 32, jnp.bfloat16, "product", False) == (None, ())  # that site is off
    assert l2_prefetch.plan(None, 32, jnp.bfloat16, "norm", False) == (None, ())
    assert l2_prefetch.plan(w, 1000, jnp.bfloat16, "norm", False) == (None, ())  # XLA's dot: nothing to ask for


@pytest.mark.skipif(not l2_prefetch.enabled(), reason="the prefetch is compiled for Hopper GPUs only")
def test_norm_with_the_prefetch_gives_the_same_bits():
    rng = np.random.default_rng(0)
    dim, n = 3200, 4480
    h = jnp.asarray(rng.normal(size=(32, 1, dim)), jnp.bfloat16)
    partials = jnp.asarray(rng.normal(size=(5, 32, dim)), jnp.float32)
    norm = RMSNorm(dim, eps=1e-5, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    weight = jnp.asarray(rng.normal(size=(dim, n)), jnp.bfloat16)
    plain = add_and_norm(h, partials, norm, "pallas")
    fetched = jax.jit(lambda h, p, w: add_and_norm(h, p, norm, "pallas", next_weight=w))(h, partials, weight)
    for a, b in zip(plain, fetched):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    x = fetched[1][:, 0]
    np.testing.assert_allclose(np.asarray(dm.decode_matmul(x, weight, "pallas"), np.float32),
                               np.asarray(jnp.dot(x, weight, preferred_element_type=jnp.float32)), rtol=2e-2, atol=2e-1)


def test_the_norm_kernel_with_the_prefetch_lowers_for_a_gpu():
    # no GPU here: lower the kernel for CUDA (Pallas -> Triton IR) without compiling it
    from m3jax.model.decode_norm import pallas_add_and_norm

    ranges = l2_prefetch.product_ranges(32, 256, 512, 2, rows=64)
    args = (jnp.zeros((2, 32, 256), jnp.float32), jnp.zeros((32, 256), jnp.bfloat16), jnp.ones((256,), jnp.float32),
            jnp.zeros((256 * 512,), jnp.bfloat16))
    run = lambda p, h, w, flat: pallas_add_and_norm(p, h, w, eps=1e-5, out_dtype=jnp.bfloat16, interpret=False,  # noqa: E731
                                                    prefetch=flat, ranges=ranges)
    text = jax.jit(run).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text



def test_the_product_kernel_with_the_prefetch_lowers_for_a_gpu():
    ranges = l2_prefetch.product_ranges(32, 256, 512, 2, rows=64)
    tiling = dm.pick_tiling(32, 256, 512)
    args = (jnp.zeros((32, 256), jnp.bfloat16), jnp.zeros((256, 512), jnp.bfloat16), jnp.zeros((256 * 512,), jnp.bfloat16))
    run = lambda x, w, flat: dm.pallas_partials(x, w, tiling, False, flat, ranges)  # noqa: E731
    assert "triton" in jax.jit(run).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.skipif(not l2_prefetch.enabled(site="product"), reason="the prefetch is compiled for Hopper GPUs only")
def test_products_with_the_prefetch_give_the_same_bits():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(32, 3200)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(3200, 4480)), jnp.bfloat16)
    later = jnp.asarray(rng.normal(size=(3200, 3200)), jnp.bfloat16)
    plain = dm.partial_products(x, w, "pallas")
    fetched = jax.jit(lambda x, w, v: dm.partial_products(x, w, "pallas", next_weight=v))(x, w, later)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(fetched))
