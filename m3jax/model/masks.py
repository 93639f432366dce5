"""Attention masks of Memory3 (SPEC 4).

The token stream of one sequence is `[sink | context]`: the sink is `<s>Reference:` followed by the
plain `<s>`, the context is cut into chunks of `chunk_len` tokens. Keys are `[memory | stream]`.

- stream keys: causal (key index <= query index) and not padding; the sink comes first, so every
  query sees it at every layer;
- memory keys (memory layers only): a context query of chunk c sees memory slot m when the slot is
  valid and its source chunk s satisfies 0 <= c - s < window. At inference every chunk reads its own
  retrieved references (window 1); in stage-2 training each chunk retrieves one reference and reads
  those of chunks c-4..c (window 5). Sink queries see no memory, so the sink stays a constant.
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# The score a masked key gets before a softmax: finite, so that a row with every key masked gives
# exp(score - max) = 1 rather than the NaN of inf - inf (each softmax zeroes such rows by its own mask).
MASKED_SCORE = float(jnp.finfo(jnp.float32).min)

@dataclasses.dataclass(frozen=True)
class MemoryLayout:
    """The static structure of the memory part of a mask, for block-sparse kernels (splash): a query at
    stream index i >= sink_len is in chunk (i - sink_len) // chunk_len and reads memory slot m when
    0 <= chunk - slot_chunks[m] < window; sink queries read none."""
    sink_len: int
    chunk_len: int
    slot_chunks: tuple
    window: int


@flax.struct.dataclass
class AttentionMask:
    """What a layer's attention may see.

    kv_lengths: (B,) the first kv_lengths[b] stream keys are real (right padding), causal over the stream;
    dense: None, or the full (B, 1, Tq, Tk) boolean mask, needed once memory keys are present. Without it,
    fused kernels run their causal mode (cuDNN: about 3x faster than with a dense mask, on an H200).
    memory_valid, layout: with memory keys, the per-row slot validity (B, Nm) and the static structure,
    so kernels with static masks (splash) need not read `dense`; layout is None when the structure
    is not static (per-row token groups).
    """
    kv_lengths: jax.Array
    dense: jax.Array | None = None
    memory_valid: jax.Array | None = None
    layout: MemoryLayout | None = flax.struct.field(pytree_node=False, default=None)

    def to_dense(self, tq: int, tk: int):
        if self.dense is not None:
            return self.dense
        index = jnp.arange(tk)
        return stream_mask(jnp.arange(tq), index, index[None, :] < self.kv_lengths[:, None])


def query_chunks(stream_index, sink_len: int, chunk_len: int):
    """Chunk id of each stream position; -1 for sink positions (they read no memory)."""
    rel = stream_index - sink_len
    return jnp.where(rel >= 0, rel // chunk_len, -1)


def stream_mask(q_index, k_index, key_valid):
    """(B, 1, Tq, Tk) bool: causal over stream indices, padding keys removed.

    q_index: (Tq,) stream index of each query; k_index: (Tk,) of each key; key_valid: (B, Tk).
    """
    causal = k_index[None, :] <= q_index[:, None]
    return causal[None, None] & key_valid[:, None, None, :]


def memory_mask(q_chunk, mem_chunk, mem_valid, window: int):
    """(B, 1, Tq, Nm) bool: which memory slots each query reads.

    q_chunk: (Tq,) or (B, Tq) chunk (memory group) of each query (-1: none); mem_chunk: (Nm,) source
    chunk of each slot; mem_valid: (B, Nm).
    """
    q_chunk = jnp.atleast_2d(q_chunk)  # (1 or B, Tq)
    lag = q_chunk[:, :, None] - mem_chunk[None, None, :]
    reads = (q_chunk[:, :, None] >= 0) & (lag >= 0) & (lag < window)
    return reads[:, None] & mem_valid[:, None, None, :]


def context_mask(padding_mask, sink_len: int, chunk_len: int, memory=None) -> AttentionMask:
    """The mask of a `[sink | context]` stream; with memory its dense part is (B, 1, S+T, Nm+S+T).

    padding_mask: (B, T) bool, right padding; memory: None or (mem_chunk (Nm,), mem_valid (B, Nm), window
    [, token_group (B, T): the memory group each context token reads, instead of its chunk]).
    Memory keys come first among the keys.
    """
    b, t = padding_mask.shape
    lengths = sink_len + padding_mask.astype(jnp.int32).sum(axis=1)
    if memory is None:
        return AttentionMask(lengths)
    index = jnp.arange(sink_len + t)
    key_valid = jnp.concatenate([jnp.ones((b, sink_len), bool), padding_mask.astype(bool)], axis=1)
    mem_chunk, mem_valid, window, *group = memory
    q_chunk = query_chunks(index, sink_len, chunk_len)
    if group and group[0] is not None:
        q_chunk = jnp.concatenate([jnp.full((b, sink_len), -1, jnp.int32), group[0].astype(jnp.int32)], axis=1)
    reads = memory_mask(q_chunk, mem_chunk, mem_valid, window)
    layout = None
    if not (group and group[0] is not None) and isinstance(mem_chunk, np.ndarray):  # static: splash can use it
        layout = MemoryLayout(sink_len, chunk_len, tuple(int(c) for c in mem_chunk), int(window))
    return AttentionMask(lengths, jnp.concatenate([reads, stream_mask(index, index, key_valid)], axis=-1),
                         mem_valid.astype(bool), layout)
