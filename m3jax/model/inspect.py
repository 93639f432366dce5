"""Looking inside memory writing and reading, for notebooks and debugging (not used by training).

- `kept_tokens`: which tokens of each reference became its memory, per memory layer and KV head, with
  the sparsification scores of all its tokens;
- `memory_attention`: how much attention probability each context query puts on memory keys, per
  memory layer and query head.

Both run the model layer by layer with its own parameters (each layer is the model's own Block, so the
hidden states are the model's), and recompute from that layer's q and k what the fused forward pass
does not return: the top-k indices, and the attention probabilities. Eager and unbatched over layers:
meant for a few references or texts at a time.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3jax.config import memory_layer_range, sink_len
from m3jax.model.layers import apply_rope, rope_angles
from m3jax.model.masks import AttentionMask, context_mask
from m3jax.model.sparsify import token_scores


@dataclasses.dataclass
class KeptTokens:
    """What writing a memory kept, for N references (NumPy arrays).

    index: (N, memory_layers, kv_heads, k) position of each kept token inside its reference (0 = its first
        token after `<s>Reference:`), best first; -1 for empty slots (references shorter than k);
    scores: (N, memory_layers, kv_heads, L) the attention each token received (-inf for padding);
    keys, values: (N, memory_layers, kv_heads, k, head_dim) the kept tokens' keys after RoPE and values,
        as `write_memories` stores them.
    """
    index: np.ndarray
    scores: np.ndarray
    keys: np.ndarray
    values: np.ndarray


@dataclasses.dataclass
class MemoryAttention:
    """Attention of B contexts at the memory layers (NumPy arrays, f32).

    memory_share: (B, memory_layers, q_heads, T) probability mass each context query puts on memory keys;
    by_reference: (B, memory_layers, q_heads, T, R) the same, split over the R references of its group;
    chunk_share: (B, memory_layers, q_heads, C) memory_share averaged over the real tokens of each chunk;
    stream_share: (B, memory_layers, q_heads, T) mass on the sink and the context (the rest of the softmax);
    logits: (B, T, padded_vocab) the model's output, from the same layer-by-layer pass.
    """
    memory_share: np.ndarray
    by_reference: np.ndarray
    chunk_share: np.ndarray
    stream_share: np.ndarray
    logits: np.ndarray


def _layers(model):
    """(layer index, is memory layer, Block with that layer's parameters) for every layer, in order."""
    for seg in model.layers:
        graphdef, state = nnx.split(seg.blocks)
        for j in range(seg.num_layers):
            yield seg.first_layer + j, seg.is_memory, nnx.merge(graphdef, jax.tree.map(lambda x, j=j: x[j], state))


def _embed(model, ids):
    return jnp.take(model.embed_tokens[...], jnp.asarray(ids, jnp.int32), axis=0).astype(model.dtype)


def _gather(x, idx):
    """x: (N, T, Hkv, D), idx: (N, Hkv, k) -> (N, Hkv, k, D)."""
    return jnp.take_along_axis(jnp.swapaxes(x, 1, 2), idx[..., None], axis=2)


def kept_tokens(model, ref_tokens, ref_lengths) -> KeptTokens:
    """ref_tokens: (N, L) right-padded ids, L <= reference_len; ref_lengths: (N,) real tokens per reference."""
    cfg = model.cfg
    ref_tokens, ref_lengths = np.asarray(ref_tokens, np.int32), np.asarray(ref_lengths, np.int32)
    n, length = ref_tokens.shape
    prefix = np.asarray(cfg.memory.reference_prefix_ids, np.int32)
    p, top_k = len(prefix), cfg.memory.tokens_per_head
    stream = np.concatenate([np.broadcast_to(prefix, (n, p)), ref_tokens], axis=1)
    # as in writing: the start tokens are context for the reference, but neither score nor are scored
    token_valid = jnp.asarray(np.concatenate([np.zeros((n, p), bool),
                                              np.arange(length)[None] < ref_lengths[:, None]], axis=1))
    mask = AttentionMask(jnp.asarray(p + ref_lengths))
    cos, sin = rope_angles(jnp.arange(p + length), cfg.model.head_dim, cfg.model.rope_theta)
    h = _embed(model, stream)
    last = memory_layer_range(cfg)[-1]
    out = {"index": [], "scores": [], "keys": [], "values": []}
    for layer, is_memory, block in _layers(model):
        h, aux = block(h, cos, sin, mask, collect=is_memory)
        if is_memory:
            q_pre, k_pre, k_rot, v = aux
            scores = token_scores(q_pre, k_pre, token_valid, cfg.memory.head_combine)  # (N, Hkv, p + L)
            _, idx = jax.lax.top_k(scores, top_k)
            filled = jnp.arange(top_k)[None, None, :] < ref_lengths[:, None, None]
            out["index"].append(jnp.where(filled, idx - p, -1))
            out["scores"].append(scores[..., p:])
            out["keys"].append(_gather(k_rot, idx))
            out["values"].append(_gather(v, idx))
        if layer == last:
            break
    return KeptTokens(**{name: np.stack([np.asarray(x) for x in xs], axis=1) for name, xs in out.items()})


def memory_attention(model, tokens, memory, padding_mask=None) -> MemoryAttention:
    """tokens: (B, T) ids; memory: a MemoryInputs (as the model reads it); padding_mask: (B, T), right padding."""
    cfg = model.cfg
    tokens = np.asarray(tokens, np.int32)
    b, t = tokens.shape
    s, chunk_len = sink_len(cfg), cfg.memory.chunk_len
    padding_mask = np.ones((b, t), bool) if padding_mask is None else np.asarray(padding_mask, bool)
    kv, valid = jnp.asarray(memory.kv), jnp.asarray(memory.valid)
    _, groups, refs, layers, _, hkv, k, d = kv.shape
    if layers != cfg.memory.num_layers:
        raise ValueError(f"memory.kv holds {layers} memory layers, the model has {cfg.memory.num_layers}")
    # memory keys in (group, reference, slot) order, per memory layer: (layers, B, groups*refs*k, Hkv, D)
    mem = jnp.transpose(kv, (3, 4, 0, 1, 2, 6, 5, 7)).reshape(layers, 2, b, groups * refs * k, hkv, d)
    slot_group = np.repeat(np.arange(groups), refs * k)
    mem_mask = context_mask(jnp.asarray(padding_mask), s, chunk_len,
                            (slot_group, valid.reshape(b, -1), memory.window, memory.token_group))
    plain_mask = context_mask(jnp.asarray(padding_mask), s, chunk_len)
    cos, sin = rope_angles(model.stream_positions(t), cfg.model.head_dim, cfg.model.rope_theta)
    stream = np.concatenate([np.broadcast_to(np.asarray(model.sink_ids()), (b, s)), tokens], axis=1)
    h = _embed(model, stream)
    shares, stream_shares = [], []
    for layer, is_memory, block in _layers(model):
        if not is_memory:
            h, _ = block(h, cos, sin, plain_mask)
            continue
        i = layer - cfg.memory.layer_start
        h, (q_pre, _, k_rot, _) = block(h, cos, sin, mem_mask, (mem[i, 0], mem[i, 1]), collect=True)
        q = apply_rope(q_pre, cos, sin).astype(jnp.float32)
        keys = jnp.concatenate([mem[i, 0].astype(jnp.float32), k_rot.astype(jnp.float32)], axis=1)
        qg = q.reshape(b, s + t, hkv, -1, d)
        logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, keys) * d ** -0.5
        logits = jnp.where(mem_mask.dense[:, :, None], logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1).reshape(b, -1, s + t, logits.shape[-1])[:, :, s:]  # context queries
        n_mem = groups * refs * k
        shares.append(probs[..., :n_mem].reshape(b, -1, t, groups, refs, k).sum(axis=(3, 5)))
        stream_shares.append(probs[..., n_mem:].sum(-1))
    h = model.norm(h[:, s:])
    head = model.embed_tokens[...].T if cfg.model.tie_embeddings else model.lm_head.kernel[...]
    logits = jnp.einsum("btd,dv->btv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)
    by_reference = np.stack([np.asarray(x) for x in shares], axis=1)  # (B, layers, Hq, T, R)
    memory_share = by_reference.sum(-1)
    return MemoryAttention(memory_share, by_reference, _chunk_means(memory_share, padding_mask, chunk_len),
                           np.stack([np.asarray(x) for x in stream_shares], axis=1), np.asarray(logits))


def _chunk_means(per_token, padding_mask, chunk_len: int):
    """(..., T) -> (..., C): mean over the real tokens of each chunk (NaN for a chunk of padding only)."""
    t = per_token.shape[-1]
    chunks = -(-t // chunk_len)
    pad = chunks * chunk_len - t
    values = np.pad(per_token, [(0, 0)] * (per_token.ndim - 1) + [(0, pad)])
    real = np.pad(padding_mask, [(0, 0), (0, pad)]).astype(np.float64)[:, None, None]  # (B, 1, 1, T')
    values = values.reshape(*values.shape[:-1], chunks, chunk_len)
    real = real.reshape(*real.shape[:-1], chunks, chunk_len)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (values * real).sum(-1) / real.sum(-1)
