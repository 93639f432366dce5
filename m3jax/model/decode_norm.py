"""Decoding's residual add and RMSNorm as one kernel: h + (a product's split-K partial sums), then the norm.

Between two weight products of a decoding step XLA ran the residual add and the norm as two small
kernels of ~2 us each (87 adds and 88 norms per step of `m3_2p4b`, 0.34 ms of a 2.7 ms step); at batch
32 their time is latency, not bandwidth. Here one Pallas program per row sums the partials, adds them to
the residual stream and normalises the result, writing both: 2.64-2.66 ms per step instead of 2.71-2.73
on an H200 (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from m3jax.model import decode_matmul as dm
from m3jax.model import l2_prefetch


def add_and_norm(h, partials, norm, impl: str, next_weight=None):
    """(h + product, norm(h + product)), rounded as `h + product.astype(h.dtype)` then `norm(...)` round.

    h: (..., dim) the residual stream; partials: None (nothing to add), or the product to add as
    `decode_matmul.partial_products` gives it, (splits, rows >= h's rows, dim) f32; norm: the
    `layers.RMSNorm` to apply; impl: "pallas" (the kernel where dim splits into power-of-two parts,
    interpreted off GPU) or "xla"; next_weight: None, or the weight (dim, ...) of the product that reads the
    normed x next: on Hopper the kernel asks the L2 for its first rows (m3jax/model/l2_prefetch.py).
    """
    if partials is None:
        return h, norm(h)
    dim = h.shape[-1]
    h2 = h.reshape(-1, dim)
    if partials.ndim != 3 or partials.shape[2] != dim or partials.shape[1] < h2.shape[0]:
        raise ValueError(f"partials of shape {partials.shape} cannot be added to a residual stream of {h.shape}")
    if impl == "pallas" and dm.power_of_two_parts(dim) is not None:
        interpret = jax.default_backend() != "gpu"
        flat, ranges = l2_prefetch.plan(next_weight, h2.shape[0], jnp.dtype(norm.dtype), "norm", interpret)
        new_h, x = pallas_add_and_norm(partials, h2, norm.weight[...], eps=norm.eps, out_dtype=jnp.dtype(norm.dtype),
                                       interpret=interpret, prefetch=flat, ranges=ranges)
        return new_h.reshape(h.shape), x.reshape(h.shape)
    new_h = h + partials.sum(axis=0)[:h2.shape[0]].reshape(h.shape).astype(h.dtype)
    return new_h, norm(new_h)


def _kernel(p_ref, h_ref, w_ref, *refs, parts, splits: int, eps: float, dim: int, signal: bool, ranges, programs: int):
    next_ref, (h_out_ref, x_out_ref) = (refs[0], refs[1:]) if ranges else (None, refs)
    # Triton's vectors are powers of two (3200 = 2048 + 1024 + 128). Every load comes before any store:
    # a first version that stored each part before loading the next took 5.3 us a call on an H200.
    cols = [slice(offset, offset + size) for offset, size in parts]
    products = [[p_ref[s, c] for s in range(splits)] for c in cols]
    hs = [h_ref[c].astype(jnp.float32) for c in cols]
    ws = [w_ref[c].astype(jnp.float32) for c in cols]
    new_hs, sum_sq = [], dm.launch_dependents() if signal else 0.0
    if ranges:  # fire and forget, before this kernel's own loads are waited for
        sum_sq += l2_prefetch.prefetch(next_ref, ranges, programs)
    for product, h in zip(products, hs):
        total = product[0]
        for p in product[1:]:
            total += p
        new_h = (h + total.astype(h_ref.dtype).astype(jnp.float32)).astype(h_out_ref.dtype).astype(jnp.float32)
        new_hs.append(new_h)  # rounded to the stream's dtype, held in f32 for the norm
        sum_sq += jnp.sum(new_h * new_h)
    scale = jax.lax.rsqrt(sum_sq / dim + eps)
    for c, new_h, w in zip(cols, new_hs, ws):
        h_out_ref[c] = new_h.astype(h_out_ref.dtype)
        x_out_ref[c] = (new_h * scale * w).astype(x_out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "out_dtype", "interpret", "num_warps", "ranges"))
def pallas_add_and_norm(partials, h, weight, eps: float, out_dtype, interpret: bool, num_warps: int = 8,
                        prefetch=None, ranges=()):
    """The kernel alone: partials (splits, >= m, dim) f32, h (m, dim), weight (dim,) -> (h + sum of partials,
    its RMS norm in out_dtype). `add_and_norm` is the model's entry; this one is for benchmarks and tuning.
    prefetch, ranges: a 1-D array and (byte offset, bytes) ranges of it to ask the L2 for (Hopper only)."""
    # 8 warps: the fastest of 1-16 in benchmarks/decode_norm_gpu.py (an H200; 4 warps gained nothing in a step)
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    splits, _, dim = partials.shape
    m = h.shape[0]
    row = lambda i: (i, 0)  # noqa: E731
    ranges, extra, extra_specs = l2_prefetch.operands(prefetch, ranges)
    return pl.pallas_call(
        functools.partial(_kernel, parts=dm.power_of_two_parts(dim), splits=splits, eps=eps, dim=dim,
                          signal=dm.early_launch(interpret), ranges=ranges, programs=m),
        grid=(m,),
        in_specs=[pl.BlockSpec((splits, None, dim), lambda i: (0, i, 0)),
                  pl.BlockSpec((None, dim), row),
                  pl.BlockSpec((dim,), lambda i: (0,))] + extra_specs,
        out_specs=[pl.BlockSpec((None, dim), row), pl.BlockSpec((None, dim), row)],
        out_shape=[jax.ShapeDtypeStruct((m, dim), h.dtype), jax.ShapeDtypeStruct((m, dim), out_dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="decode_add_norm",
    )(partials, h, weight, *extra)
