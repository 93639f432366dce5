"""Asking Hopper's L2 for a layer's KV cache before its decode attention kernel reads it.

The decode attention kernel (decode_attention.py) streams each sequence's cached keys and values in a
loop of dependent blocks; from a warm L2 it runs ~1.4 us a layer faster than from HBM (an H200,
benchmarks/RESULTS.md). The cache does not depend on the kernels before the attention, so one of them
(the add + norm before q/k/v, or the q/k/v product: `SITES`) issues `cp.async.bulk.prefetch.L2` for the
rows the attention will read: each sequence's stream so far (cache positions < write_at) and, at memory
layers, the memory slots at the cache's end. Sizes depend on write_at, so they are computed in the kernel
and passed to the instruction as registers. Fire and forget, like l2_prefetch.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from m3jax.model import decode_matmul as dm
from m3jax.model import l2_prefetch

SITES = ("norm",)  # kernels that ask: "norm" (the add + norm before q/k/v), "product" (q/k/v itself)
MAX_BYTES = 2 ** 31 - 1  # offsets travel as signed 32-bit registers


class Layout(NamedTuple):
    """Static shape of one layer's cache as the kernels see it: (B, seq_len, Hkv, D) row-major."""
    rows: int  # B
    seq_len: int  # positions per row, memory slots included
    position_bytes: int  # Hkv x D x itemsize: one position of one row
    memory_slots: int  # the last positions, read too (0: none)


def plan(cache_k, cache_v, write_at, memory_slots: int, programs: int, site: str, interpret: bool):
    """((k, v as 1-D arrays, write_at), Layout) for a kernel of `programs` programs at `site` to ask for, or
    (None, None): prefetch off or not on Hopper, a cache the instruction cannot address (positions not a
    multiple of 16 bytes, offsets past 32 bits), or fewer programs than sequences."""
    if site not in SITES or not dm.early_launch(interpret):  # Hopper only, as the early signal
        return None, None
    b, s = cache_k.shape[:2]
    position_bytes = cache_k.size // (b * s) * cache_k.dtype.itemsize
    if (position_bytes % l2_prefetch.ALIGN or cache_k.size * cache_k.dtype.itemsize > MAX_BYTES
            or programs < b or cache_v.shape != cache_k.shape or cache_v.dtype != cache_k.dtype):
        return None, None
    return (cache_k.reshape(-1), cache_v.reshape(-1), write_at.astype(jnp.int32)), Layout(b, s, position_bytes,
                                                                                           memory_slots)


def spans(write_at, program, programs: int, layout: Layout):
    """This program's (byte offset, bytes) pieces of the cache rows to ask for, as int32 scalars (bytes 0: none).
    Program p takes row p % B and the (p // B)-th of programs // B equal, 16-byte-aligned pieces of its stream
    so far (positions < write_at[row]) and of its memory slots. write_at: the row's write_at, a scalar."""
    b = layout.rows
    pieces = programs // b
    row, index = program % b, program // b
    active = program < pieces * b
    row_start = row * (layout.seq_len * layout.position_bytes)

    def piece_of(start, length):
        piece = (length + pieces * l2_prefetch.ALIGN - 1) // (pieces * l2_prefetch.ALIGN) * l2_prefetch.ALIGN
        first = index * piece
        size = jnp.clip(length - first, 0, piece)
        return row_start + start + first, jnp.where(active, size, 0)

    out = [piece_of(0, write_at * layout.position_bytes)]
    if layout.memory_slots:
        out.append(piece_of((layout.seq_len - layout.memory_slots) * layout.position_bytes,
                            jnp.int32(layout.memory_slots * layout.position_bytes)))
    return out


def prefetch_asm(num_spans: int) -> str:
    """PTX: thread 0 asks for `num_spans` pieces of both caches. Operands: $0 = 0 (result), $1 / $2 the k / v
    cache, then each piece's byte offset and size (skipped when 0), then a value to wait for."""
    lines = ["{", ".reg .pred pcp, pcq;", ".reg .u32 pct;", ".reg .s64 pco;", ".reg .u64 pca;",
             "mov.u32 pct, %tid.x;", "setp.eq.u32 pcp, pct, 0;"]
    for i in range(num_spans):
        off, size = f"${3 + 2 * i}", f"${4 + 2 * i}"
        lines += [f"setp.gt.and.s32 pcq, {size}, 0, pcp;", f"cvt.s64.s32 pco, {off};"]
        for cache in ("$1", "$2"):
            lines += [f"add.s64 pca, {cache}, pco;", f"@pcq cp.async.bulk.prefetch.L2.global [pca], {size};"]
    lines += ["mov.b32 $0, 0;", "}"]
    return "\n\t".join(lines)


def prefetch(k_ref, v_ref, write_at_ref, program, programs: int, layout: Layout, after=None):
    """Inside a kernel: ask for this program's pieces (`spans`) of the caches k_ref / v_ref point at ((16,)
    blocks at the start of their 1-D views). Returns 0.0: add it into a value the kernel uses. after: None,
    or a scalar the request waits for."""
    from jax.experimental.pallas import triton as plgpu

    write_at = write_at_ref[program % layout.rows]
    pieces = spans(write_at, program, programs, layout)
    ints = [jnp.full((l2_prefetch.ALIGN,), v, jnp.int32) for piece in pieces for v in piece]
    wait = jnp.zeros((l2_prefetch.ALIGN,), jnp.float32) + (0.0 if after is None else after)
    (zero,) = plgpu.elementwise_inline_asm(
        prefetch_asm(len(pieces)), args=[k_ref, v_ref, *ints, wait],
        constraints="=f,l,l," + "r," * len(ints) + "f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct((l2_prefetch.ALIGN,), jnp.float32)])
    return jnp.sum(zero)
