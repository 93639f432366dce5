"""Memory attention in two parts merged by log-sum-exp: a fused causal kernel over the stream, and an
exact part over the few memory keys.

A fused kernel (cuDNN) given one dense mask over `[memory | stream]` keys runs far slower than in its
causal mode (~3.9x on an H200, benchmarks/RESULTS.md). Memory keys are few (Nm << T), so here they are
scored exactly in f32, the stream goes through the kernel's causal mode, and the two softmaxes merge
through their log-sum-exps. The kernel returns the stream's log-sum-exp but gives it no gradient
(`jax.nn.dot_product_attention(return_residual=True)` stops it); `stream_attention` adds it:
d lse_i/d q_i = scale * sum_j p_ij k_j (attention with the keys as values) and d lse_i/d k_j =
scale * p_ij q_i (that attention's value gradient), one more forward and backward of the kernel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.model.masks import AttentionMask


def _causal_with_lse(q, k, v, kv_lengths, impl: str):
    """(out (B, T, Hq, D), lse (B, T, Hq) f32) of causal attention over the first kv_lengths keys."""
    if impl == "cudnn":
        # jax.nn casts the log-sum-exp to the compute dtype (bf16: ~0.06 absolute at 10); the cuDNN
        # call under it returns it in f32, as (B, Hq, T).
        from jax._src.cudnn.fused_attention_stablehlo import MaskType
        from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

        b, t = q.shape[:2]
        out, lse = cudnn_attention(q, k, v, None, None, jnp.full((b,), t, jnp.int32), kv_lengths,
                                   scale=q.shape[-1] ** -0.5, mask_type=MaskType.PADDING_CAUSAL,
                                   return_residual=True)
        return out, jnp.transpose(lse, (0, 2, 1)).astype(jnp.float32)
    out, lse = jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=kv_lengths,
                                            implementation="xla", return_residual=True)
    return out, lse.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def stream_attention(q, k, v, kv_lengths, impl: str):
    """Causal attention over the stream and its log-sum-exp per query and head, both differentiable."""
    return _causal_with_lse(q, k, v, kv_lengths, impl)


def _stream_fwd(q, k, v, kv_lengths, impl):
    out, vjp_out = jax.vjp(lambda q, k, v: _causal_with_lse(q, k, v, kv_lengths, impl), q, k, v)
    return out, (vjp_out, q, k, kv_lengths)


def _stream_bwd(impl, res, cotangents):
    vjp_out, q, k, kv_lengths = res
    ct_out, ct_lse = cotangents
    dq, dk, dv = vjp_out((ct_out, jnp.zeros_like(ct_lse)))  # the kernel's own backward ignores ct_lse
    weight = ct_lse[..., None] * (q.shape[-1] ** -0.5)  # (B, T, Hq, 1) f32
    keys_as_values, vjp_values = jax.vjp(lambda values: _causal_with_lse(q, k, values, kv_lengths, impl)[0], k)
    dq = dq + (weight * keys_as_values.astype(jnp.float32)).astype(dq.dtype)
    (dk_lse,) = vjp_values((weight * q.astype(jnp.float32)).astype(q.dtype))
    return dq, dk + dk_lse.astype(dk.dtype), dv, None


stream_attention.defvjp(_stream_fwd, _stream_bwd)


def _windows(x, chunks: int, window: int, fill):
    """(B, C_m, S, ...) per-chunk slots -> (B, chunks, window * S, ...): chunk c's slots are those of
    chunks c-window+1 .. c (missing chunks filled with `fill`)."""
    c_m = x.shape[1]
    pad = [(0, 0)] * x.ndim
    pad[1] = (window - 1, max(chunks - c_m, 0))
    x = jnp.pad(x[:, :chunks], pad, constant_values=fill)
    return jnp.concatenate([x[:, j:j + chunks] for j in range(window)], axis=2)


def _memory_part(q, mem_k, mem_v, mem_valid, layout):
    """Exact f32 attention of the stream's queries (B, S+T, Hq, D) over the memory slots each reads (its
    chunk's window; the sink reads none): (out (B, S+T, Hq, D) f32, lse (B, S+T, Hq), -inf where a
    query reads no memory). Computed per chunk: a chunk's queries against its window's slots only."""
    b, stream, hq, d = q.shape
    hkv = mem_k.shape[2]
    sink, size, window = layout.sink_len, layout.chunk_len, layout.window
    slot_chunks = np.asarray(layout.slot_chunks)
    per_chunk = int(np.sum(slot_chunks == 0))
    c_m = len(slot_chunks) // max(per_chunk, 1)
    if per_chunk == 0 or not np.array_equal(slot_chunks, np.repeat(np.arange(c_m), per_chunk)):
        raise ValueError("split memory attention needs the same number of memory slots for every chunk, in order")
    chunks = -(-(stream - sink) // size)
    keys = _windows(mem_k.reshape(b, c_m, per_chunk, hkv, d), chunks, window, 0)
    values = _windows(mem_v.reshape(b, c_m, per_chunk, hkv, d), chunks, window, 0)
    valid = _windows(mem_valid.reshape(b, c_m, per_chunk), chunks, window, False)  # (B, C, W)
    queries = jnp.pad(q[:, sink:], [(0, 0), (0, chunks * size - (stream - sink)), (0, 0), (0, 0)])
    queries = queries.reshape(b, chunks, size, hkv, hq // hkv, d)
    scores = jnp.einsum("bclhgd,bcwhd->bchglw", queries, keys, preferred_element_type=jnp.float32) * (d ** -0.5)
    reads = valid[:, :, None, None, None, :]
    any_read = reads.any(axis=-1)
    scores = jnp.where(reads, scores, jnp.finfo(jnp.float32).min)
    top = jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True))
    e = jnp.where(reads, jnp.exp(scores - top), 0.0)
    z = jnp.where(any_read, e.sum(axis=-1), 1.0)
    lse = jnp.where(any_read, top[..., 0] + jnp.log(z), -jnp.inf)  # (B, C, Hkv, G, L)
    out = jnp.einsum("bchglw,bcwhd->bclhgd", e / z[..., None], values.astype(jnp.float32))
    out = out.reshape(b, chunks * size, hq, d)[:, :stream - sink]
    lse = jnp.transpose(lse, (0, 1, 4, 2, 3)).reshape(b, chunks * size, hq)[:, :stream - sink]
    out = jnp.concatenate([jnp.zeros((b, sink, hq, d), out.dtype), out], axis=1)
    lse = jnp.concatenate([jnp.full((b, sink, hq), -jnp.inf, lse.dtype), lse], axis=1)
    return out, lse


def split_memory_attention(q, k, v, mask: AttentionMask, impl: str):
    """q: (B, S+T, Hq, D) over the stream; k, v: (B, Nm + S+T, Hkv, D), memory keys first; mask with a
    static memory layout. Equals one softmax over the dense mask."""
    layout, stream = mask.layout, q.shape[1]
    nm = len(layout.slot_chunks)
    if k.shape[1] != nm + stream:
        raise ValueError(f"split memory attention needs {nm} memory keys then {stream} stream keys, "
                         f"got {k.shape[1]} keys")
    with jax.named_scope("stream_attention"):
        out_s, lse_s = stream_attention(q, k[:, nm:], v[:, nm:], mask.kv_lengths, impl)
    with jax.named_scope("memory_attention"):
        out_m, lse_m = _memory_part(q, k[:, :nm], v[:, :nm], mask.memory_valid, layout)
    lse = jnp.logaddexp(lse_s, lse_m)
    w_s, w_m = jnp.exp(lse_s - lse)[..., None], jnp.exp(lse_m - lse)[..., None]
    return (w_s * out_s.astype(jnp.float32) + w_m * out_m).astype(q.dtype)
