"""Memory attention in two parts merged by log-sum-exp: a fused causal kernel over the stream, and an
exact part over the few memory keys.

A fused kernel (cuDNN) given one dense mask over `[memory | stream]` keys runs far slower than in its
causal mode (~3.9x on an H200, benchmarks/RESULTS.md). Memory keys are few (Nm << T), so here they are
scored exactly per chunk, the stream goes through the kernel's causal mode, and the two softmaxes merge
through their log-sum-exps. With cuDNN (GPU), the memory part and the merge are one Pallas kernel
(memory_merge.py); elsewhere they are the einsums below.

The backward is that of the one merged softmax (as ring attention does it): with the merged output O
and log-sum-exp L, every key j gets dS_ij = P_ij (dO_i . v_j - D_i), P_ij = exp(s_ij - L_i),
D_i = dO_i . O_i, whichever part j is in. The fused kernel's own backward computes exactly this for the
stream when handed O and L in place of its own (cuDNN's backward takes them as inputs), so no
gradient of the stream's log-sum-exp is needed; the memory part's is a few small einsums.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.model import decode_matmul as dm, memory_merge
from m3jax.model.masks import MASKED_SCORE, AttentionMask


def _cudnn():
    # The one private JAX module used here: jax.nn returns the log-sum-exp in the compute dtype (bf16:
    # ~0.06 absolute at 10) and offers no backward from a given output and log-sum-exp.
    from jax._src.cudnn import fused_attention_stablehlo as cudnn
    return cudnn


def _cudnn_lengths_scale_mask(q, kv_lengths):
    """What the cuDNN forward and its backward rule are both given: query and key lengths, scale, mask type."""
    b, t = q.shape[:2]
    return (jnp.full((b,), t, jnp.int32), kv_lengths.astype(jnp.int32), q.shape[-1] ** -0.5,
            _cudnn().MaskType.PADDING_CAUSAL)


def _causal_with_lse(q, k, v, kv_lengths, impl: str):
    """(out (B, T, Hq, D), lse (B, T, Hq) f32) of causal attention over the first kv_lengths keys."""
    if impl == "cudnn":
        q_len, kv_len, scale, mask_type = _cudnn_lengths_scale_mask(q, kv_lengths)
        out, lse = _cudnn().dot_product_attention(q, k, v, None, None, q_len, kv_len, scale=scale,
                                                  mask_type=mask_type, return_residual=True)
        return out, jnp.transpose(lse, (0, 2, 1)).astype(jnp.float32)  # cuDNN's is (B, Hq, T) f32
    out, lse = jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=kv_lengths,
                                            implementation="xla", return_residual=True)
    return out, lse.astype(jnp.float32)


def _stream_grads(q, k, v, kv_lengths, out, lse, d_out, impl: str):
    """(dq, dk, dv) of the stream's keys within the merged softmax (out, lse: the merged results)."""
    if impl == "cudnn":
        cudnn = _cudnn()
        q_len, kv_len, scale, mask_type = _cudnn_lengths_scale_mask(q, kv_lengths)
        none = jnp.zeros(0, q.dtype)
        # residuals: q, k, v, bias, lengths, q/kv offsets, paged K/V tables, log-sum-exp (B, Hq, T), output
        res = (q, k, v, none, q_len, kv_len, none, none, none, none, jnp.transpose(lse, (0, 2, 1)), out)
        grads = cudnn._dot_product_attention_bwd_rule(  # positional, in the rule's order (jax 0.10-0.11):
            scale, 42, 0.0, (False, False),  # scale, seed, dropout_rate, variadic_args (no bias, no mask)
            mask_type, cudnn._normalize_layout("BTNH").value, None,  # mask_type, layout, sliding_window_length
            True, False, res, d_out)  # is_training, return_residual
        return grads[:3]
    t = q.shape[1]
    pos = jnp.arange(t)
    allowed = (pos[None, :] <= pos[:, None])[None] & (pos[None, None, :] < kv_lengths[:, None, None])
    return jax.grad(_merged_objective, argnums=(0, 1, 2))(
        q, k, v, allowed[:, None, None], lse, d_out, _row_dot(d_out, out))


def _row_dot(d_out, out):
    """D_i = dO_i . O_i per query and head: (B, T, Hq) f32."""
    return jnp.einsum("bthd,bthd->bth", d_out.astype(jnp.float32), out.astype(jnp.float32))


def _merged_objective(q, k, v, allowed, lse, d_out, row_dot):
    """sum_ij P_ij (dO_i . v_j - D_i) over allowed (B, Hkv, G, Tq, Tk) pairs with L fixed: its gradient is
    the merged softmax's for these keys. The stream reference (dense); the kernel computes it fused."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    probs = _fixed_softmax(scores, allowed, _heads(lse, hkv)[..., None])
    pv = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v.astype(jnp.float32)).reshape(b, t, hq, d)
    return jnp.sum(d_out.astype(jnp.float32) * pv) - jnp.sum(_heads(row_dot, hkv) * probs.sum(-1))


def _heads(x, hkv):
    """(B, T, Hq) -> (B, Hkv, G, T)."""
    b, t, hq = x.shape
    return jnp.transpose(x.reshape(b, t, hkv, hq // hkv), (0, 2, 3, 1))


def _fixed_softmax(scores, allowed, lse):
    """exp(s - L) where allowed, else 0; safe where L = -inf (a query that reads nothing here)."""
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    scores = jnp.where(allowed, scores, MASKED_SCORE)
    return jnp.where(allowed, jnp.exp(scores - lse), 0.0)


def _windows(x, chunks: int, window: int, fill):
    """(B, C_m, S, ...) per-chunk slots -> (B, chunks, window * S, ...): chunk c's slots are those of
    chunks c-window+1 .. c (missing chunks filled with `fill`)."""
    c_m = x.shape[1]
    pad = [(0, 0)] * x.ndim
    pad[1] = (window - 1, max(chunks - c_m, 0))
    x = jnp.pad(x[:, :chunks], pad, constant_values=fill)
    return jnp.concatenate([x[:, j:j + chunks] for j in range(window)], axis=2)


class _Chunked:
    """The memory part's per-chunk view: the stream's queries (B, S+T, ...) as (B, C, L, ...) chunks of
    L = chunk_len (sink dropped, last chunk padded), and each chunk's window of memory slots."""

    def __init__(self, layout, stream: int, mem_k, mem_v, mem_valid):
        self.sink, self.size, self.stream = layout.sink_len, layout.chunk_len, stream
        slot_chunks = np.asarray(layout.slot_chunks)
        per_chunk = int(np.sum(slot_chunks == 0))
        c_m = len(slot_chunks) // max(per_chunk, 1)
        if per_chunk == 0 or not np.array_equal(slot_chunks, np.repeat(np.arange(c_m), per_chunk)):
            raise ValueError("split memory attention needs the same number of memory slots for every chunk, in order")
        self.chunks = -(-(stream - self.sink) // self.size)
        b, _, hkv, d = mem_k.shape
        self.keys = _windows(mem_k.reshape(b, c_m, per_chunk, hkv, d), self.chunks, layout.window, 0)
        self.values = _windows(mem_v.reshape(b, c_m, per_chunk, hkv, d), self.chunks, layout.window, 0)
        self.valid = _windows(mem_valid.reshape(b, c_m, per_chunk), self.chunks, layout.window, False)  # (B, C, W)
        self.reads = self.valid[:, :, None, None, None, :]  # against scores (B, C, Hkv, G, L, W)

    def split(self, x, fill=0):
        """(B, S+T, Hq, ...) -> (B, C, L, Hq, ...)."""
        pad = [(0, 0)] * x.ndim
        pad[1] = (0, self.chunks * self.size - (self.stream - self.sink))
        x = jnp.pad(x[:, self.sink:], pad, constant_values=fill)
        return x.reshape(x.shape[0], self.chunks, self.size, *x.shape[2:])

    def join(self, x, fill):
        """(B, C, L, Hq, ...) -> (B, S+T, Hq, ...), the sink's rows `fill`."""
        x = x.reshape(x.shape[0], self.chunks * self.size, *x.shape[3:])[:, :self.stream - self.sink]
        return jnp.concatenate([jnp.full((x.shape[0], self.sink, *x.shape[2:]), fill, x.dtype), x], axis=1)

    def scores(self, q):
        """(B, C, Hkv, G, L, W) f32 scores of each chunk's queries against its window's slots."""
        b, _, hq, d = q.shape
        hkv = self.keys.shape[-2]
        queries = self.split(q).reshape(b, self.chunks, self.size, hkv, hq // hkv, d)
        return jnp.einsum("bclhgd,bcwhd->bchglw", queries, self.keys, preferred_element_type=jnp.float32) * (d ** -0.5)

    def weighted_values(self, probs):
        """(B, C, Hkv, G, L, W) probabilities -> (B, S+T, Hq, D) f32, their values' sums."""
        out = jnp.einsum("bchglw,bcwhd->bclhgd", probs.astype(self.values.dtype), self.values,
                         preferred_element_type=jnp.float32)
        return self.join(out.reshape(*out.shape[:3], -1, out.shape[-1]), 0.0)

    def per_query(self, x):
        """(B, C, Hkv, G, L) -> (B, S+T, Hq), the sink's rows -inf."""
        x = jnp.transpose(x, (0, 1, 4, 2, 3))
        return self.join(x.reshape(*x.shape[:3], -1), -jnp.inf)

    def per_chunk(self, x):
        """(B, S+T, Hq) -> (B, C, Hkv, G, L)."""
        hkv = self.keys.shape[-2]
        x = self.split(x)
        x = x.reshape(*x.shape[:3], hkv, x.shape[-1] // hkv)
        return jnp.transpose(x, (0, 1, 3, 4, 2))


def _memory_part(q, view: _Chunked):
    """Exact attention of the stream's queries over the memory slots each reads (its chunk's window; the
    sink reads none): (out (B, S+T, Hq, D) f32, lse (B, S+T, Hq), -inf where a query reads no memory)."""
    scores = view.scores(q)
    any_read = view.reads.any(axis=-1)
    scores = jnp.where(view.reads, scores, MASKED_SCORE)
    top = jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True))
    e = jnp.where(view.reads, jnp.exp(scores - top), 0.0)
    z = jnp.where(any_read, e.sum(axis=-1), 1.0)
    lse = jnp.where(any_read, top[..., 0] + jnp.log(z), -jnp.inf)  # (B, C, Hkv, G, L)
    return view.weighted_values(e / z[..., None]), view.per_query(lse)


def _memory_objective(q, mem_k, mem_v, mem_valid, layout, lse, d_out, row_dot):
    """`_merged_objective` over the memory slots, per chunk."""
    view = _Chunked(layout, q.shape[1], mem_k, mem_v, mem_valid)
    probs = _fixed_softmax(view.scores(q), view.reads, view.per_chunk(lse)[..., None])
    return (jnp.sum(d_out.astype(jnp.float32) * view.weighted_values(probs))
            - jnp.sum(view.per_chunk(row_dot) * probs.sum(-1)))


def merge_parts(out_s, lse_s, out_m, lse_m, dtype):
    """One softmax's (output in dtype, log-sum-exp) from two parts' over disjoint keys."""
    lse = jnp.logaddexp(lse_s, lse_m)
    w_s, w_m = jnp.exp(lse_s - lse)[..., None], jnp.exp(lse_m - lse)[..., None]
    return (w_s * out_s.astype(jnp.float32) + w_m * out_m).astype(dtype), lse


def _sink_part(q, sink_k, sink_v):
    """Exact attention of every query over the S sink keys: (out (B, T, Hq, D) f32, lse (B, T, Hq)).
    sink_k, sink_v: (S, Hkv, D), the same for every row (the sink is a constant)."""
    b, t, hq, d = q.shape
    s, hkv, _ = sink_k.shape
    qg = q.reshape(b, t, hkv, hq // hkv, d).astype(jnp.float32)
    k, v = sink_k.astype(jnp.float32)[:, :, None], sink_v.astype(jnp.float32)[:, :, None]  # (S, Hkv, 1, D)
    # A handful of keys, unrolled: products and sums that XLA fuses into passes over q and the output (an
    # einsum would be a batched dot over kv heads, with q transposed for it)
    scores = jnp.stack([jnp.sum(qg * k[j], axis=-1) for j in range(s)], axis=-1) * (d ** -0.5)
    lse = jax.nn.logsumexp(scores, axis=-1)
    probs = jnp.exp(scores - lse[..., None])
    out = sum(probs[..., j, None] * v[j] for j in range(s))
    return out.reshape(b, t, hq, d), lse.reshape(b, t, hq)


def attention_after_sink(q, k, v, mask: AttentionMask, sink_k, sink_v, impl: str):
    """Prompt attention with the sink's keys apart (inference: no gradient): q (B, T, Hq, D) of the tokens
    after the sink; k, v (B, [Nm +] T, Hkv, D), with a memory layer's memory keys first (as
    `split_memory_attention` takes them, under a mask whose static layout has no sink); every query also
    sees the S sink keys (S, Hkv, D), the same for every row, in one softmax. Returns (B, T, Hq, D).

    Why: the fused kernel works in tiles of 128 positions; a 128-token prompt behind a 4-token sink is a
    136-position stream (padded to a multiple of 8) and costs what 256 do (benchmarks/RESULTS.md), so the
    sink is merged by log-sum-exp instead (and the layers' products skip its rows).
    impl: `xla` or `cudnn` (the causal kernel over the prompt, then the sink and memory parts: on cuDNN's
    path one memory merge kernel call, `merge_sink_by_kernel`; in XLA as the split attention does it),
    or `splash` (TPU: one kernel over `[memory | prompt]` with its log-sum-exp; its 128-position blocks
    make the same case)."""
    t = q.shape[1]
    nm = 0 if mask.memory_valid is None else len(mask.layout.slot_chunks)
    if (nm and mask.layout.sink_len != 0) or k.shape[1] != nm + t:
        raise ValueError(f"attention after the sink needs a layout without sink and {nm} memory keys then {t} "
                         f"stream keys, got {k.shape[1]} keys")
    if impl == "splash":
        from m3jax.model.splash import splash_attention  # imports Pallas TPU: only when chosen
        return merge_parts(*splash_attention(q, k, v, mask, with_lse=True), *_sink_part(q, sink_k, sink_v),
                           q.dtype)[0]
    out_c, lse_c = _causal_with_lse(q, k[:, nm:], v[:, nm:], mask.kv_lengths, impl)
    if _merges_by_kernel(impl):
        merged = merge_sink_by_kernel(q, out_c, lse_c, sink_k, sink_v, k[:, :nm], v[:, :nm], mask)
        if merged is not None:
            return merged
    sink = _sink_part(q, sink_k, sink_v)
    if not nm:
        return merge_parts(out_c, lse_c, *sink, q.dtype)[0]
    out_s, lse_s = merge_parts(out_c, lse_c, *sink, jnp.float32)
    return _with_memory(q, out_s, lse_s, k[:, :nm], v[:, :nm], mask.memory_valid, mask.layout, impl)[0]


SINK_CHUNK = 64  # rows a kernel program merges the sink into, at a layer without memory
# On cuDNN's path, merge the sink (and memory) into the causal part by the memory merge kernel, in one
# pass, rather than by XLA's passes (benchmarks/prefill_attention_gpu.py times both)
SINK_MERGE_BY_KERNEL = True


def _kernel_path(impl: str) -> bool:
    """Whether merges after the causal part may be the Pallas kernel: on cuDNN's path, with Pallas' Triton."""
    return impl == "cudnn" and dm.triton_available()


def _merges_by_kernel(impl: str) -> bool:
    return SINK_MERGE_BY_KERNEL and _kernel_path(impl)


def merge_sink_by_kernel(q, out_c, lse_c, sink_k, sink_v, mem_k, mem_v, mask: AttentionMask,
                         interpret: bool | None = None):
    """The sink's keys, and a memory layer's memory keys, merged into the causal part's (out_c, lse_c) by
    one memory merge kernel call, every chunk reading `[sink | its memory keys]`: one pass over the rows,
    where the sink part and its merge in XLA took several (benchmarks/RESULTS.md). None where the
    kernel does not take the shape (the caller then merges in XLA)."""
    b, t, _, d = q.shape
    s, hkv, _ = sink_k.shape
    if mask.memory_valid is None:
        chunk_len = SINK_CHUNK
        chunks, mem_keys, mem_values, mem_valid = -(-t // chunk_len), [], [], []
    else:
        view = _Chunked(mask.layout, t, mem_k, mem_v, mask.memory_valid)
        chunk_len, chunks = mask.layout.chunk_len, view.chunks
        mem_keys, mem_values, mem_valid = [view.keys.astype(q.dtype)], [view.values.astype(q.dtype)], [view.valid]
    slots = s + sum(x.shape[2] for x in mem_keys)
    if not memory_merge.fits(chunk_len, slots, d):
        return None

    def every_chunk(x):  # (S, Hkv, D) -> (B, C, S, Hkv, D): the sink is the same for every row and chunk
        return jnp.broadcast_to(x.astype(q.dtype), (b, chunks, s, hkv, d))

    keys = jnp.concatenate([every_chunk(sink_k), *mem_keys], axis=2)
    values = jnp.concatenate([every_chunk(sink_v), *mem_values], axis=2)
    valid = jnp.concatenate([jnp.ones((b, chunks, s), bool), *mem_valid], axis=2)
    with jax.named_scope("sink_and_memory_merge"):
        return memory_merge.merge_memory(q, out_c.astype(q.dtype), lse_c, keys, values, valid, sink=0,
                                         chunk_len=chunk_len, interpret=interpret)[0]


def _with_memory(q, out_s, lse_s, mem_k, mem_v, mem_valid, layout, impl: str):
    """The stream part's (out, lse) merged with the memory part: the Pallas kernel on cuDNN's path."""
    with jax.named_scope("memory_attention"):
        view = _Chunked(layout, q.shape[1], mem_k, mem_v, mem_valid)
        if _kernel_path(impl) and memory_merge.fits(layout.chunk_len, view.keys.shape[2], q.shape[-1]):
            return memory_merge.merge_memory(q, out_s.astype(q.dtype), lse_s, view.keys, view.values, view.valid,
                                             sink=layout.sink_len, chunk_len=layout.chunk_len)
        return merge_parts(out_s, lse_s, *_memory_part(q, view), q.dtype)


def _split_attention(layout, impl: str):
    @jax.custom_vjp
    def attention(q, k, v, mem_k, mem_v, kv_lengths, mem_valid):
        return forward(q, k, v, mem_k, mem_v, kv_lengths, mem_valid)[0]

    def forward(q, k, v, mem_k, mem_v, kv_lengths, mem_valid):
        with jax.named_scope("stream_attention"):
            out_s, lse_s = _causal_with_lse(q, k, v, kv_lengths, impl)
        out, lse = _with_memory(q, out_s, lse_s, mem_k, mem_v, mem_valid, layout, impl)
        return out, (q, k, v, mem_k, mem_v, kv_lengths, mem_valid, out, lse)

    def backward(res, d_out):
        q, k, v, mem_k, mem_v, kv_lengths, mem_valid, out, lse = res
        with jax.named_scope("stream_attention"):
            dq, dk, dv = _stream_grads(q, k, v, kv_lengths, out, lse, d_out, impl)
        with jax.named_scope("memory_attention"):
            objective = functools.partial(_memory_objective, mem_valid=mem_valid, layout=layout, lse=lse,
                                          d_out=d_out, row_dot=_row_dot(d_out, out))
            dq_m, d_mem_k, d_mem_v = jax.grad(objective, argnums=(0, 1, 2))(q, mem_k, mem_v)
        dq = (dq.astype(jnp.float32) + dq_m.astype(jnp.float32)).astype(q.dtype)
        return dq, dk, dv, d_mem_k, d_mem_v, None, None

    attention.defvjp(forward, backward)
    return attention


def split_memory_attention(q, k, v, mask: AttentionMask, impl: str):
    """q: (B, S+T, Hq, D) over the stream; k, v: (B, Nm + S+T, Hkv, D), memory keys first; mask with a
    static memory layout. Equals one softmax over the dense mask."""
    layout, stream = mask.layout, q.shape[1]
    nm = len(layout.slot_chunks)
    if k.shape[1] != nm + stream:
        raise ValueError(f"split memory attention needs {nm} memory keys then {stream} stream keys, "
                         f"got {k.shape[1]} keys")
    return _split_attention(layout, impl)(q, k[:, nm:], v[:, nm:], k[:, :nm], v[:, :nm],
                                          mask.kv_lengths, mask.memory_valid)
