"""Decoding's attention over the KV cache as one Pallas Triton kernel per layer (GPU).

XLA runs a decode step's cache attention as several kernels per layer (two batched einsums, the
softmax, two scatters writing the new key and value), reads the whole preallocated cache whatever the
sequence's length, and reaches a fraction of HBM bandwidth (benchmarks/RESULTS.md). This kernel, one
program per (sequence, kv head), reads only the keys written so far plus the memory slots, scores the
new token's own key apart, runs an online softmax over blocks of keys, and writes the new key and value
into the cache in place (the cache is aliased to its output).

Head dims that are not a power of two (Memory3's 80) are split into power-of-two parts (64 + 16), since
Triton's tensor-core dot needs power-of-two shapes of at least 16.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from m3jax.model import decode_matmul as dm
from m3jax.model.masks import MASKED_SCORE

IMPLS = dm.IMPLS
MAX_GROUP = 64  # query heads per kv head the kernel takes (rows of its dot)


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """`auto`: the Pallas kernel on GPU, XLA elsewhere."""
    return dm.resolve_impl(impl, platform, what="decode attention")


def fits(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel takes this attention shape (else XLA's path)."""
    return dm.power_of_two_parts(head_dim) is not None and num_heads // num_kv_heads <= MAX_GROUP


class Tiling(NamedTuple):
    """Defaults: the fastest of 36 tilings in benchmarks/decode_attention_gpu.py on an H200 (RESULTS.md)."""
    block_keys: int = 64  # keys per loop step
    splits: int = 1  # programs per (sequence, kv head), each over every splits-th block of keys, merged after
    num_warps: int = 2
    num_stages: int = 3


def _kernel(write_at_ref, qkv_ref, k_ref, v_ref, *refs, parts, group, kv_heads, tiling, scale, memory_slots,
            signal):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    valid_ref, refs = (refs[0], refs[1:]) if memory_slots else (None, refs)
    block, splits = tiling.block_keys, tiling.splits
    rows = dm.dot_rows(group)
    write_at = write_at_ref[pl.program_id(0)]
    split = pl.program_id(2) if splits > 1 else 0
    row_ok = jnp.arange(rows) < group
    head = pl.program_id(1)
    q_rows, k_row = pl.ds(head * group, rows), kv_heads * group + head  # this kv head's rows of qkv
    q = [plgpu.load(qkv_ref.at[q_rows, pl.ds(off, size)], mask=row_ok[:, None], other=0) for off, size in parts]
    k_new = [qkv_ref[k_row, pl.ds(off, size)] for off, size in parts]
    v_new = [qkv_ref[k_row + kv_heads, pl.ds(off, size)] for off, size in parts]
    # the new token's own key starts the first split's softmax (the others start empty)
    own = sum((qp.astype(jnp.float32) * kp.astype(jnp.float32)[None, :]).sum(axis=1) for qp, kp in zip(q, k_new))
    first = split == 0
    ones = jnp.ones((rows,), jnp.float32)
    top, total = own * scale + (dm.launch_dependents() if signal else 0.0), ones
    acc = [jnp.broadcast_to(vp.astype(jnp.float32)[None, :], (rows, size)) for vp, (_, size) in zip(v_new, parts)]
    if splits > 1:
        top = jnp.where(first, top, jnp.full_like(top, MASKED_SCORE))
        total = jnp.where(first, total, 0 * ones)
        acc = [jnp.where(first, a, 0 * a) for a in acc]

    precision = dm.float32_precision(k_ref.dtype)

    def step(keys, ok, carry):  # keys: the block's cache rows (a slice, or a vector of row indices)
        top, total, acc = carry

        def load(ref, off, size):
            if isinstance(keys, pl.Slice):
                return plgpu.load(ref.at[keys, pl.ds(off, size)], mask=ok[:, None], other=0)
            return plgpu.load(ref.at[keys[:, None], off + jnp.arange(size)[None, :]], mask=ok[:, None], other=0)
        scores = sum(jax.lax.dot_general(qp, load(k_ref, off, size),
                                         (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                         precision=precision)
                     for qp, (off, size) in zip(q, parts))
        scores = jnp.where(ok[None, :], scores * scale, MASKED_SCORE)
        new_top = jnp.maximum(top, scores.max(axis=1))
        weights = jnp.where(ok[None, :], jnp.exp(scores - new_top[:, None]), 0.0)
        decay = jnp.exp(top - new_top)
        total = total * decay + weights.sum(axis=1)
        weights = weights.astype(v_ref.dtype)
        acc = [a * decay[:, None] + jnp.dot(weights, load(v_ref, off, size), preferred_element_type=jnp.float32,
                           precision=precision)
               for a, (off, size) in zip(acc, parts)]
        return new_top, total, acc

    def blocks_of_this_split(n):  # blocks split, split + splits, ... below n
        return pl.cdiv(jnp.maximum(n - split, 0), splits)

    # One pass over the keys this token reads: the stream so far (cache rows < write_at), then the
    # memory slots (the cache's tail), as one sequence of blocks: the stream's last block is topped up
    # with memories rather than followed by a block of its own.
    memory_start = k_ref.shape[0] - memory_slots

    def key_block(t, carry):
        start = (split + t * splits) * block
        at = start + jnp.arange(block)
        in_stream = at < write_at
        if not memory_slots:
            return step(pl.ds(start, block), in_stream, carry)
        slot = at - write_at
        in_memory = (slot >= 0) & (slot < memory_slots)
        valid = plgpu.load(valid_ref.at[jnp.clip(slot, 0, memory_slots - 1)], mask=in_memory, other=0)
        return step(jnp.where(in_stream, at, memory_start + slot), in_stream | (in_memory & (valid != 0)), carry)

    carry = jax.lax.fori_loop(0, blocks_of_this_split(pl.cdiv(write_at + memory_slots, block)), key_block,
                              (top, total, acc))
    top, total, acc = carry
    if splits == 1:
        o_ref, k_out_ref, v_out_ref = refs
        for a, (off, size) in zip(acc, parts):
            plgpu.store(o_ref.at[pl.ds(0, rows), pl.ds(off, size)], (a / total[:, None]).astype(o_ref.dtype),
                        mask=row_ok[:, None])
    else:  # partial softmax of this split: its maximum, its sum of weights, its weighted values
        top_ref, total_ref, acc_ref, k_out_ref, v_out_ref = refs
        plgpu.store(top_ref.at[pl.ds(0, rows)], top, mask=row_ok)
        plgpu.store(total_ref.at[pl.ds(0, rows)], total, mask=row_ok)
        for a, (off, size) in zip(acc, parts):
            plgpu.store(acc_ref.at[pl.ds(0, rows), pl.ds(off, size)], a, mask=row_ok[:, None])

    def write_token():  # this token into the cache (the loops above read only keys < write_at)
        for kp, vp, (off, size) in zip(k_new, v_new, parts):
            k_out_ref[write_at, pl.ds(off, size)] = kp.astype(k_out_ref.dtype)
            v_out_ref[write_at, pl.ds(off, size)] = vp.astype(v_out_ref.dtype)

    if splits == 1:
        write_token()
    else:
        pl.when(first)(write_token)


def decode_attention(q, k_new, v_new, cache_k, cache_v, write_at, memory_valid=None, tiling: Tiling | None = None):
    """One new token per sequence against its KV cache, and the cache with the token written.

    q: (B, Hq, D) after RoPE; k_new, v_new: (B, Hkv, D), this token's key (after RoPE) and value;
    cache_k, cache_v: (B, S, Hkv, D), keys at stream indices < write_at are the stream so far;
    write_at: (B,) this token's stream index (< S - Nm); memory_valid: None, or (B, Nm) bool when the
    cache's last Nm positions hold memories, which of them this token reads.
    Returns (out (B, Hq, D) in q's dtype, cache_k, cache_v with this token at write_at). Off GPU the
    kernel runs in Pallas' interpreter (tests). Call `fits` first: other shapes are rejected.
    """
    if k_new.shape != v_new.shape or q.shape[::2] != k_new.shape[::2]:
        raise ValueError(f"decode attention shapes disagree: q {q.shape}, k_new {k_new.shape}, v_new {v_new.shape}")
    qkv = jnp.concatenate([q, k_new.astype(q.dtype), v_new.astype(q.dtype)], axis=1)
    return decode_attention_packed(qkv, cache_k, cache_v, write_at, memory_valid, tiling)


def decode_attention_packed(qkv, cache_k, cache_v, write_at, memory_valid=None, tiling: Tiling | None = None):
    """`decode_attention` with q, k_new and v_new as one array qkv (B, Hq + 2 Hkv, D), in that order (what
    the fused q/k/v projection gives: one element-wise pass applies RoPE to all of it, not three)."""
    b, rows, d = qkv.shape
    s, hkv = cache_k.shape[1:3]
    hq = rows - 2 * hkv
    if hq < 1 or not fits(hq, hkv, d) or hq % hkv:
        raise ValueError(f"the decode attention kernel does not take {hq} query heads over {hkv} kv heads of dim {d}")
    if cache_v.shape != cache_k.shape or cache_k.shape != (b, s, hkv, d) or write_at.shape != (b,):
        raise ValueError(f"decode attention shapes disagree: qkv {qkv.shape}, cache {cache_k.shape} / "
                         f"{cache_v.shape}, write_at {write_at.shape}")
    if memory_valid is not None and (memory_valid.ndim != 2 or memory_valid.shape[0] != b
                                     or memory_valid.shape[1] >= s):
        raise ValueError(f"memory_valid has shape {memory_valid.shape}; expected ({b}, Nm) with Nm < {s}")
    tiling = tiling or Tiling()
    if tiling.block_keys < 16 or tiling.block_keys & (tiling.block_keys - 1) or tiling.splits < 1:
        raise ValueError(f"bad decode attention tiling {tiling}: block_keys a power of two >= 16, splits >= 1")
    return _pallas_decode_attention(qkv, cache_k, cache_v, write_at, memory_valid, tiling,
                                    interpret=jax.default_backend() != "gpu")


@functools.partial(jax.jit, static_argnames=("tiling", "interpret"))
def _pallas_decode_attention(qkv, cache_k, cache_v, write_at, memory_valid, tiling, interpret):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    b, rows, d = qkv.shape
    s, hkv = cache_k.shape[1:3]
    hq = rows - 2 * hkv
    group, splits = hq // hkv, tiling.splits
    memory_slots = 0 if memory_valid is None else memory_valid.shape[1]

    def spec(*block):  # (sequence, kv head, *block)
        return pl.BlockSpec((None, None, *block), lambda i, h, j: (i, h) + (0,) * len(block))

    def split_spec(*block):  # (sequence, kv head, split, *block)
        return pl.BlockSpec((None, None, None, *block), lambda i, h, j: (i, h, j) + (0,) * len(block))

    cache_spec = pl.BlockSpec((None, s, None, d), lambda i, h, j: (i, 0, h, 0))
    in_specs = [pl.BlockSpec((b,), lambda i, h, j: (0,)), pl.BlockSpec((None, rows, d), lambda i, h, j: (i, 0, 0)),
                cache_spec, cache_spec]
    args = [write_at.astype(jnp.int32), qkv, cache_k, cache_v]
    if memory_slots:
        in_specs.append(pl.BlockSpec((None, memory_slots), lambda i, h, j: (i, 0)))
        args.append(memory_valid.astype(jnp.int32))
    if splits == 1:
        out_specs = [spec(group, d)]
        out_shape = [jax.ShapeDtypeStruct((b, hkv, group, d), qkv.dtype)]
    else:
        out_specs = [split_spec(group), split_spec(group), split_spec(group, d)]
        out_shape = [jax.ShapeDtypeStruct((b, hkv, splits, group), jnp.float32)] * 2 + \
            [jax.ShapeDtypeStruct((b, hkv, splits, group, d), jnp.float32)]
    kernel = functools.partial(_kernel, parts=dm.power_of_two_parts(d), group=group, kv_heads=hkv, tiling=tiling,
                               scale=d ** -0.5, memory_slots=memory_slots, signal=dm.early_launch(interpret))
    *outs, cache_k, cache_v = pl.pallas_call(
        kernel,
        grid=(b, hkv, splits),
        in_specs=in_specs,
        out_specs=out_specs + [cache_spec, cache_spec],
        out_shape=out_shape + [jax.ShapeDtypeStruct(cache_k.shape, cache_k.dtype),
                               jax.ShapeDtypeStruct(cache_v.shape, cache_v.dtype)],
        input_output_aliases={2: len(out_shape), 3: len(out_shape) + 1},
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name="decode_attention",
    )(*args)
    if splits == 1:
        out = outs[0]
    else:  # one softmax from the splits' partial ones
        top, total, acc = outs
        weight = jnp.exp(top - top.max(axis=2, keepdims=True))
        out = ((acc * weight[..., None]).sum(axis=2) / (total * weight).sum(axis=2)[..., None]).astype(qkv.dtype)
    return out.reshape(b, hq, d), cache_k, cache_v
