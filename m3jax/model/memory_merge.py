"""The memory part of split memory attention, and its merge with the stream part, as one Pallas kernel.

`split_attention` scores each chunk's queries exactly against the few memory keys its chunk reads and
merges that softmax with the fused stream kernel's through their log-sum-exps. In XLA that is a dozen
passes per memory layer (transposes into chunk order and back, the softmax's reductions, the merge):
~300 us per layer of a 32 x 128 prefill of `m3_2p4b` on an H200, three times the stream's cuDNN kernel
(benchmarks/RESULTS.md). Here one program per (sequence, chunk, kv head) loads the chunk's memory keys
once, scores its query heads' rows against them, and writes the merged output and log-sum-exp over the
stream part's, in place: rows outside every chunk (the sink) keep the stream's values. Memory's cost in
that prefill went from 6.0 to 1.8 ms. Training's step hardly moves: its backward, unchanged, dominates.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from m3jax import sharding
from m3jax.model import decode_matmul as dm
from m3jax.model.masks import MASKED_SCORE

MAX_SLOTS = 256  # memory keys a chunk may read for the kernel (one block of scores per query row)
# Triton's warps and pipeline stages per program, read at each call (benchmarks/memory_merge_gpu.py times
# others): 4 warps was the fastest of 1-8 on an H200; stages do not matter (no loop). RESULTS.md.
NUM_WARPS = 4
NUM_STAGES = 1


def fits(chunk_len: int, slots: int, head_dim: int) -> bool:
    """Whether the kernel takes this shape: chunks of a power-of-two length >= 16, at most MAX_SLOTS memory
    keys a chunk, a head dim in power-of-two parts (else XLA's path)."""
    return (chunk_len >= 16 and chunk_len & (chunk_len - 1) == 0 and 0 < slots <= MAX_SLOTS
            and dm.power_of_two_parts(head_dim) is not None)


def _kernel(q_ref, k_ref, v_ref, valid_ref, out_s_ref, lse_s_ref, out_ref, lse_ref, *, parts, group, chunk_len, sink,
            slots, scale):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    keys = dm.dot_rows(slots)  # Triton's blocks are powers of two (>= 16 for its dot); the tail is masked
    first = sink + pl.program_id(1) * chunk_len
    rows = pl.ds(first, chunk_len)
    row_ok = first + jnp.arange(chunk_len) < q_ref.shape[0]  # the last chunk may run past the stream
    present = jnp.arange(keys) < slots
    ok = present & (plgpu.load(valid_ref.at[pl.ds(0, keys)], mask=present, other=0) != 0)
    k = [plgpu.load(k_ref.at[pl.ds(0, keys), pl.ds(off, size)], mask=present[:, None], other=0) for off, size in parts]
    v = [plgpu.load(v_ref.at[pl.ds(0, keys), pl.ds(off, size)], mask=present[:, None], other=0) for off, size in parts]
    precision = dm.float32_precision(k_ref.dtype)
    for head in range(group):  # the query heads sharing this kv head: the memory keys are loaded once for all
        g = jnp.int32(head)  # an array index: plgpu.load takes no Python int among slices
        q = [plgpu.load(q_ref.at[rows, g, pl.ds(off, size)], mask=row_ok[:, None], other=0) for off, size in parts]
        scores = sum(jax.lax.dot_general(qp, kp, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                         precision=precision) for qp, kp in zip(q, k))
        scores = jnp.where(ok[None, :], scores * scale, MASKED_SCORE)
        top = scores.max(axis=1)
        e = jnp.where(ok[None, :], jnp.exp(scores - top[:, None]), 0.0)
        z = e.sum(axis=1)
        reads = z > 0  # a row whose chunk holds no valid memory reads only the stream
        z = jnp.where(reads, z, 1.0)
        probs = (e / z[:, None]).astype(v_ref.dtype)
        lse_m = jnp.where(reads, top + jnp.log(z), -jnp.inf)
        lse_s = plgpu.load(lse_s_ref.at[rows, g], mask=row_ok, other=0)
        high = jnp.maximum(lse_s, lse_m)
        high = jnp.where(high > MASKED_SCORE, high, 0.0)  # both -inf: weights 0 below, not NaN
        w_s, w_m = jnp.exp(lse_s - high), jnp.exp(lse_m - high)
        total = w_s + w_m
        merged = total > 0
        total = jnp.where(merged, total, 1.0)
        plgpu.store(lse_ref.at[rows, g], jnp.where(merged, high + jnp.log(total), -jnp.inf), mask=row_ok)
        w_s, w_m = (w_s / total)[:, None], (w_m / total)[:, None]
        for vp, (off, size) in zip(v, parts):
            out_m = jnp.dot(probs, vp, preferred_element_type=jnp.float32, precision=precision)
            cols = (rows, g, pl.ds(off, size))
            out_s = plgpu.load(out_s_ref.at[cols], mask=row_ok[:, None], other=0).astype(jnp.float32)
            plgpu.store(out_ref.at[cols], (w_s * out_s + w_m * out_m).astype(out_ref.dtype), mask=row_ok[:, None])


def merge_memory(q, out_s, lse_s, keys, values, valid, *, sink: int, chunk_len: int, interpret: bool | None = None):
    """The stream part's attention merged with each chunk's exact attention over its memory keys.

    q, out_s: (B, S+T, Hq, D), the queries and the stream part's output; lse_s: (B, S+T, Hq) f32, its
    log-sum-exp; keys, values: (B, C, W, Hkv, D) the memory keys each of the C chunks reads (rows
    sink + c * chunk_len ..., the last chunk possibly cut short by the end of the rows); valid: (B, C, W)
    which of them it reads.
    Returns (out (B, S+T, Hq, D) in out_s's dtype, lse (B, S+T, Hq) f32): one softmax over both parts;
    the sink's rows are the stream part's. Call `fits` first. Off GPU, Pallas' interpreter (tests).
    """
    b, n, hq, d = q.shape
    _, c, w, hkv, _ = keys.shape
    if out_s.shape != q.shape or lse_s.shape != (b, n, hq) or values.shape != keys.shape or valid.shape != (b, c, w):
        raise ValueError(f"memory merge shapes disagree: q {q.shape}, out_s {out_s.shape}, lse_s {lse_s.shape}, "
                         f"keys {keys.shape}, values {values.shape}, valid {valid.shape}")
    if hq % hkv or c != -(-(n - sink) // chunk_len) or not fits(chunk_len, w, d):
        raise ValueError(f"the memory merge kernel does not take {c} chunks of {chunk_len} after a sink of {sink} "
                         f"in {n} rows, {w} memory keys a chunk, {hq} / {hkv} heads of dim {d}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    group = hq // hkv
    args = (q.reshape(b, n, hkv, group, d), out_s.reshape(b, n, hkv, group, d),
            lse_s.astype(jnp.float32).reshape(b, n, hkv, group), keys, values, valid.astype(jnp.int32))
    merge = functools.partial(_pallas_merge, sink=sink, chunk_len=chunk_len, interpret=interpret,
                              num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    context = sharding.current()
    if context is not None:  # XLA cannot partition a Pallas call: each device merges its own rows and heads
        mesh, rules = context
        batch = sharding.mesh_axes(mesh, rules, "act_batch", b)
        heads = sharding.mesh_axes(mesh, rules, "act_kv_heads", hkv)
        rows, row_lse = P(batch, None, heads, None, None), P(batch, None, heads, None)  # (B, S+T, Hkv, G, ...)
        memory = P(batch, None, None, heads, None)  # (B, C, W, Hkv, D)
        merge = jax.shard_map(merge, mesh=mesh, out_specs=(rows, row_lse), check_vma=False,
                              in_specs=(rows, rows, row_lse, memory, memory, P(batch, None, None)))
    out, lse = merge(*args)
    return out.reshape(b, n, hq, d), lse.reshape(b, n, hq)


@functools.partial(jax.jit, static_argnames=("sink", "chunk_len", "interpret", "num_warps", "num_stages"))
def _pallas_merge(q, out_s, lse_s, keys, values, valid, *, sink, chunk_len, interpret, num_warps, num_stages):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    b, n, hkv, group, d = q.shape
    c, w = keys.shape[1:3]
    rows = pl.BlockSpec((None, n, None, group, d), lambda i, j, h: (i, 0, h, 0, 0))  # all rows of one kv head
    rows_lse = pl.BlockSpec((None, n, None, group), lambda i, j, h: (i, 0, h, 0))
    memory = pl.BlockSpec((None, None, w, None, d), lambda i, j, h: (i, j, 0, h, 0))
    kernel = functools.partial(_kernel, parts=dm.power_of_two_parts(d), group=group, chunk_len=chunk_len, sink=sink,
                               slots=w, scale=d ** -0.5)
    return pl.pallas_call(
        kernel,
        grid=(b, c, hkv),
        in_specs=[rows, memory, memory, pl.BlockSpec((None, None, w), lambda i, j, h: (i, j, 0)), rows, rows_lse],
        out_specs=[rows, rows_lse],
        out_shape=[jax.ShapeDtypeStruct(out_s.shape, out_s.dtype), jax.ShapeDtypeStruct(lse_s.shape, jnp.float32)],
        input_output_aliases={4: 0, 5: 1},  # the stream part's output, updated in place chunk by chunk
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="memory_merge",
    )(q, keys, values, valid, out_s, lse_s)
