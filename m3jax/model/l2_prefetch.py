"""Asking Hopper's L2 for the first rows of the next weight product while a small kernel runs.

A decoding step's weight products each start by waiting out HBM's latency: their programs can only
issue loads once the kernel before them has finished (XLA's PDL wait sits at a Pallas kernel's entry).
The small kernel before a product (the residual add + norm) leaves HBM idle, so it issues
`cp.async.bulk.prefetch.L2` for the rows each of the product's split-K programs reads first: fire and
forget, one instruction per program and range, so the small kernel does not wait for the bytes. Where
the kernel before a product is XLA's (RoPE before the attention and o; the SiLU product before down),
the product before that kernel asks instead, as each of its programs finishes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from m3jax.model import decode_matmul as dm

ROWS = 128  # rows of each split-K part asked for (the first pipeline stages of the product); 0: off
ALIGN = 16  # bytes: the bulk prefetch's address and size are multiples of 16
# which kernels ask: the add + norm (for the product after it), products (q/k/v for o, gate/up for down)
SITES = ("norm", "product")
MAX_OFFSET = 2 ** 31 - 1  # offsets are PTX immediates ([reg + imm], a signed 32-bit int)


def enabled(interpret: bool = False, site: str = "norm") -> bool:
    """Whether the kernels of `site` (one of SITES) issue the prefetch: ROWS > 0, the site listed, and the same
    Hopper gate as `decode_matmul.early_launch`."""
    return ROWS > 0 and site in SITES and dm.early_launch(interpret)


def product_ranges(m: int, k: int, n: int, itemsize: int, rows: int | None = None) -> tuple[tuple[int, int], ...]:
    """(byte offset, bytes) of the rows that `decode_matmul`'s split-K programs read first in an (m, k) @ (k, n)
    product with row-major weights: the first `rows` rows of each of its split parts, all n columns. Empty when
    the product does not take the kernel (XLA's dot), rows is 0, or the weight is too large to address
    with immediate offsets."""
    rows = ROWS if rows is None else rows
    tiling = dm.pick_tiling(m, k, n)
    if tiling is None or rows <= 0 or k * n * itemsize > MAX_OFFSET:
        return ()
    part = k // tiling.splits
    return tuple((i * part * n * itemsize, min(rows, part) * n * itemsize) for i in range(tiling.splits))


def plan(next_weight, m: int, x_dtype, site: str, interpret: bool):
    """(the weight as a 1-D array, its ranges) for a kernel at `site` to ask for, or (None, ()): when the
    prefetch is off, or the weight is not one the (m, k) product reads as it is (its dtype must be x_dtype:
    a converted copy would be read instead), or `product_ranges` finds nothing to ask for."""
    if next_weight is None or next_weight.dtype != x_dtype or not enabled(interpret, site):
        return None, ()
    k = next_weight.shape[0]
    ranges = product_ranges(m, k, next_weight.size // k, next_weight.dtype.itemsize)
    return (next_weight.reshape(-1), ranges) if ranges else (None, ())


def operands(prefetch, ranges):
    """(ranges, extra args, their BlockSpecs) for a kernel wrapper, whatever its grid: the 1-D array as a (16,)
    block at its start when there is something to ask for; nothing (and no ranges) else."""
    from jax.experimental import pallas as pl

    if prefetch is None or not ranges:
        return (), [], []
    return ranges, [prefetch], [pl.BlockSpec((ALIGN,), lambda *program: (0,))]


def share(ranges, programs: int) -> int:
    """Bytes each of `programs` programs asks for in every range: an equal, 16-byte-aligned share (the
    ranges' tails past programs x share are left out). 0 when there is nothing to share."""
    if not ranges or programs < 1:
        return 0
    sizes = {size for _, size in ranges}
    if len(sizes) != 1:
        raise ValueError(f"prefetch ranges must have one size, got {sorted(sizes)}")
    return sizes.pop() // programs // ALIGN * ALIGN


def prefetch_asm(ranges, piece: int) -> str:
    """PTX: thread 0 of each program (its linear index over the grid) asks for `piece` bytes of every range at
    offset + index x piece from the array at $1 (once $2 is there); $0 = 0 (a zero that keeps the statement
    alive). The statement runs once per element a thread holds of the (16,) operands, so thread 0 may repeat
    its requests: harmless."""
    lines = ["{", ".reg .pred pfp;", ".reg .u32 pft, pfx, pfy, pfz, pfnx, pfny, pfi, pfs;", ".reg .u64 pfa;",
             "mov.u32 pft, %tid.x;", "setp.eq.u32 pfp, pft, 0;",
             "mov.u32 pfx, %ctaid.x;", "mov.u32 pfy, %ctaid.y;", "mov.u32 pfz, %ctaid.z;",
             "mov.u32 pfnx, %nctaid.x;", "mov.u32 pfny, %nctaid.y;",
             "mad.lo.u32 pfi, pfz, pfny, pfy;", "mad.lo.u32 pfi, pfi, pfnx, pfx;",
             f"mul.wide.u32 pfa, pfi, {piece};", "add.u64 pfa, pfa, $1;", f"mov.u32 pfs, {piece};"]
    for offset, _ in ranges:
        if offset % ALIGN or not 0 <= offset <= MAX_OFFSET:
            raise ValueError(f"prefetch offset {offset} is not a multiple of {ALIGN} bytes in [0, {MAX_OFFSET}]")
        lines.append(f"@pfp cp.async.bulk.prefetch.L2.global [pfa+{offset}], pfs;")
    lines += ["mov.b32 $0, 0;", "}"]  # not $2: that may be a NaN the caller waited for
    return "\n\t".join(lines)


def prefetch(flat_ref, ranges, programs: int, after=None):
    """Inside a kernel of `programs` programs: ask the L2 for `ranges` of the array flat_ref points at (flat_ref:
    a (16,) block at the start of a 1-D view of it). Returns 0.0: add it into a value the kernel uses. after:
    None, or a scalar the request waits for (it is an operand; the result stays 0.0 whatever its value)."""
    from jax.experimental.pallas import triton as plgpu

    piece = share(ranges, programs)
    if piece == 0:
        return 0.0
    (zero,) = plgpu.elementwise_inline_asm(
        prefetch_asm(ranges, piece), args=[flat_ref, jnp.zeros((ALIGN,), jnp.float32) + (0.0 if after is None else after)],
        constraints="=f,l,f", pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct((ALIGN,), jnp.float32)])
    return jnp.sum(zero)
