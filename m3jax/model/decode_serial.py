"""Decoding's weight products that finish their own outputs (serial split-K), so no small kernel sits between them.

The split-K product of `decode_matmul` leaves f32 partial sums that a small kernel adds up afterwards: per
decoder layer two residual add + RMSNorm kernels and a SiLU product, ~8 us of a ~58 us layer at batch 32
on an H200, nearly all of it launch and ramp-up (benchmarks/RESULTS.md). Here every program writes its
partial sum and counts itself in on its column block (an atomic counter); the last of a block's programs
to arrive sums the block's partials in split order (results do not depend on arrival order) and finishes
the block:
- `residual_product`: h + the product (rounded to h's dtype first, as `decode_norm` does), and each row's
  sum of squares over the block: what the next RMSNorm needs;
- `silu_product`: silu(gate) * up, a gate block and its up block counted together.
`norm_product` normalises its input as it loads it (a prologue), from those per-block sums of squares.

Counters are an int32 buffer threaded through the calls (aliased in and out); each call leaves them at
zero. Off GPU the kernels run in Pallas' interpreter (tests); without a tiling for a shape, XLA computes the
same outputs (`xla_*` below, also the tests' reference for the kernel's rounding).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from m3jax.model import decode_matmul as dm

COUNTERS = 256  # one per column block of a product; m3_2p4b's widest finished product has 25


def new_counters():
    return jnp.zeros((COUNTERS,), jnp.int32)


def sum_of_squares(h):
    """(1, rows) f32 per-row sums of squares of h (m, dim), in the layout the products leave them (parts, rows)."""
    h32 = h.astype(jnp.float32)
    return jnp.sum(h32 * h32, axis=-1)[None]


# ---- XLA: the same outputs, for shapes without a tiling and as the tests' reference ----------------------
def xla_norm(h, sumsq, weight, eps, dtype):
    """RMSNorm of h (m, dim) from its rows' sums of squares in parts (P, >= m), rounded to dtype."""
    scale = jax.lax.rsqrt(sumsq.sum(axis=0)[:h.shape[0], None] / h.shape[-1] + eps)
    return (h.astype(jnp.float32) * scale * weight.astype(jnp.float32)).astype(dtype)


def xla_residual(h, product):
    """h + product (f32, rounded to h's dtype first) and the result's (1, m) sums of squares."""
    new_h = (h.astype(jnp.float32) + product.astype(h.dtype).astype(jnp.float32)).astype(h.dtype)
    return new_h, sum_of_squares(new_h)


def xla_silu(gate_up, dtype):
    """silu(gate) * up of an f32 (m, 2 * hidden) product, [gate | up], each rounded to dtype first."""
    gate, up = jnp.split(gate_up.astype(dtype).astype(jnp.float32), 2, axis=-1)
    return (gate * jax.nn.sigmoid(gate) * up).astype(dtype)


def _dot(x, w):
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32, precision=dm.float32_precision(x.dtype))


# ---- the kernel --------------------------------------------------------------------------------------
def _kernel(*refs, block_k, steps, block_n, splits, finish, norm, eps, dim, interpret):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    refs = list(refs)
    x_ref, w_ref = refs.pop(0), refs.pop(0)
    if norm:
        sumsq_ref, norm_w_ref = refs.pop(0), refs.pop(0)
    h_ref = refs.pop(0) if finish == "residual" else None
    if finish is not None:
        refs.pop(0)  # the counters' input, aliased to their output (the last ref)
    partials_ref, out_refs, counters_ref = refs[0], refs[1:-1], refs[-1]
    j, i = pl.program_id(0), pl.program_id(1)
    precision = dm.float32_precision(w_ref.dtype)

    if norm:  # this row's RMS from the previous product's per-block sums of squares
        total = sumsq_ref[0, :]
        for p in range(1, sumsq_ref.shape[0]):
            total += sumsq_ref[p, :]
        scale = jax.lax.rsqrt(total / dim + eps)[:, None]

    def body(t, acc):
        ks = pl.ds(t * block_k, block_k)
        x = x_ref[:, ks]
        if norm:
            x = x.astype(jnp.float32) * scale * norm_w_ref[ks].astype(jnp.float32)[None, :]
        x = x.astype(w_ref.dtype)  # the compute dtype
        return acc + jnp.dot(x, w_ref[ks, :], preferred_element_type=jnp.float32, precision=precision)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((x_ref.shape[0], block_n), jnp.float32))
    partials_ref[i, :, pl.ds(j * block_n, block_n)] = acc
    if finish is None:
        return

    groups = partials_ref.shape[2] // block_n // (2 if finish == "silu" else 1)
    block = j % groups if finish == "silu" else j
    arrivals = splits * (2 if finish == "silu" else 1)
    if not interpret:
        plgpu.debug_barrier()  # every thread's partial stored before the release below
    arrived = plgpu.atomic_add(counters_ref, block, jnp.int32(1))  # acquire-release, GPU scope

    def summed(col):  # in split order; volatile loads skip L1 (not coherent) and read what other programs stored
        cols = pl.ds(col, block_n)
        parts = [plgpu.load(partials_ref.at[jnp.int32(s), :, cols], volatile=True)
                 for s in range(splits)]
        for p in parts[1:]:
            parts[0] += p
        return parts[0]

    @pl.when(arrived == arrivals - 1)
    def _():
        cols = pl.ds(block * block_n, block_n)
        if finish == "residual":
            h_out_ref, sumsq_out_ref = out_refs
            h = h_ref[:, cols]
            new_h = (h.astype(jnp.float32) + summed(block * block_n).astype(h.dtype).astype(jnp.float32))
            new_h = new_h.astype(h.dtype)
            h_out_ref[:, cols] = new_h
            h32 = new_h.astype(jnp.float32)
            sumsq_out_ref[block, :] = jnp.sum(h32 * h32, axis=1)
        else:
            (act_ref,) = out_refs
            dtype = act_ref.dtype
            gate = summed(block * block_n).astype(dtype).astype(jnp.float32)
            up = summed(groups * block_n + block * block_n).astype(dtype).astype(jnp.float32)
            act_ref[:, cols] = (gate / (1.0 + jnp.exp(-gate)) * up).astype(dtype)
        plgpu.atomic_add(counters_ref, block, jnp.int32(-arrivals))  # back to zero for the next call


@functools.partial(jax.jit, static_argnames=("tiling", "finish", "eps", "dtype", "interpret"))
def _serial(x, w, counters, sumsq, norm_w, h, *, tiling, finish, eps, dtype, interpret):
    """The kernel: x (m, k) @ w (k, n) in `dtype` (x normalised first when sumsq is given), `finish`ed."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    m, k = x.shape
    n = w.shape[1]
    rows = dm.dot_rows(m)
    pad = lambda a: a if a is None or a.shape[0] == rows else jnp.pad(a, ((0, rows - m), (0, 0)))  # noqa: E731
    x, h = pad(x), pad(h)
    bn, bk, s = tiling.block_n, tiling.block_k, tiling.splits
    part = k // s
    full = lambda a: pl.BlockSpec(a.shape, lambda j, i: (0,) * a.ndim)  # noqa: E731
    args = [x, w.astype(dtype)]
    in_specs = [pl.BlockSpec((rows, part), lambda j, i: (0, i)), pl.BlockSpec((part, bn), lambda j, i: (i, j))]
    if sumsq is not None:
        sumsq = jnp.pad(sumsq, ((0, 0), (0, rows - sumsq.shape[1]))) if sumsq.shape[1] < rows else sumsq[:, :rows]
        args += [sumsq, norm_w]
        in_specs += [full(sumsq), pl.BlockSpec((part,), lambda j, i: (i,))]
    if finish == "residual":
        args.append(h)
        in_specs.append(full(h))
    if finish is not None:
        args.append(counters)
        in_specs.append(full(counters))
    outs = [jax.ShapeDtypeStruct((s, rows, n), jnp.float32)]
    if finish == "residual":
        outs += [jax.ShapeDtypeStruct((rows, n), h.dtype), jax.ShapeDtypeStruct((n // bn, rows), jnp.float32)]
    elif finish == "silu":
        outs.append(jax.ShapeDtypeStruct((rows, n // 2), dtype))
    if finish is not None:
        outs.append(jax.ShapeDtypeStruct(counters.shape, counters.dtype))
    results = pl.pallas_call(
        functools.partial(_kernel, block_k=bk, steps=part // bk, block_n=bn, splits=s, finish=finish,
                          norm=sumsq is not None, eps=eps, dim=k, interpret=interpret),
        grid=(n // bn, s),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec(o.shape, lambda j, i, nd=len(o.shape): (0,) * nd) for o in outs],
        out_shape=outs,
        input_output_aliases={len(args) - 1: len(outs) - 1} if finish is not None else {},
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name=f"decode_serial_{finish or 'norm'}",
    )(*args)
    return results


def _tiling(x, w, impl, finish):
    """The kernel's tiling for this product, or None (XLA then): a tiling, and column blocks that fit the counters
    (and, for silu, that split evenly into gate and up)."""
    if impl == "xla":
        return None
    tiling = dm.pick_tiling(x.shape[0], x.shape[1], w.shape[1])
    if tiling is None:
        return None
    blocks = w.shape[1] // tiling.block_n
    if blocks > COUNTERS or (finish == "silu" and (w.shape[1] // 2) % tiling.block_n):
        return None
    return tiling


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def norm_product(h, sumsq, norm, w, impl: str):
    """RMSNorm(h) @ w as f32 partial sums (splits, rows >= m, n), like `decode_matmul.partial_products`.

    h: (m, dim) the residual stream; sumsq: (P, >= m) its rows' sums of squares in parts (`sum_of_squares`,
    or a `residual_product`'s); norm: the `layers.RMSNorm`; impl: "pallas" or "serial" (the kernel,
    interpreted off GPU) or "xla"."""
    dtype = jnp.dtype(norm.dtype)
    tiling = _tiling(h, w, impl, None)
    if tiling is None:
        return _dot(xla_norm(h, sumsq, norm.weight[...], norm.eps, dtype), w)[None]
    (partials,) = _serial(h, w, None, sumsq, norm.weight[...], None, tiling=tiling, finish=None, eps=norm.eps,
                          dtype=dtype, interpret=_interpret())
    return partials


def residual_product(x, w, h, counters, impl: str):
    """(h + x @ w, its rows' sums of squares (P, rows >= m), counters). x: (m, k); h: (m, n)."""
    tiling = _tiling(x, w, impl, "residual")
    if tiling is None:
        return (*xla_residual(h, _dot(x, w)), counters)
    _, new_h, sumsq, counters = _serial(x, w, counters, None, None, h, tiling=tiling, finish="residual", eps=0.0,
                                        dtype=x.dtype, interpret=_interpret())
    return new_h[:h.shape[0]], sumsq, counters


def silu_product(h, sumsq, norm, w, counters, impl: str):
    """(silu(gate) * up, counters) for the normalised h (m, dim) @ w (dim, 2 * hidden), [gate | up] columns:
    (m, hidden) in norm's dtype."""
    dtype = jnp.dtype(norm.dtype)
    tiling = _tiling(h, w, impl, "silu")
    if tiling is None:
        return xla_silu(_dot(xla_norm(h, sumsq, norm.weight[...], norm.eps, dtype), w), dtype), counters
    _, act, counters = _serial(h, w, counters, sumsq, norm.weight[...], None, tiling=tiling, finish="silu",
                               eps=norm.eps, dtype=dtype, interpret=_interpret())
    return act[:h.shape[0]], counters
