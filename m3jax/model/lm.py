"""Memory3: the decoder LM that reads explicit memories, and writes them from references.

Layout of a context (free choice where SPEC 4 leaves it open, following the paper's Fig. 9):

    position:  0 .. P-1             P .. P+R-1              P+R     P+R+1 ...
    token:     <s>Reference:        [memory interval]       <s>     context tokens
               (sink)               (keys of memories)      (sink)

P = len(`<s>Reference:`), R = memory.reference_len. A reference is encoded alone as
`<s>Reference:` + its tokens, so its token j sits at position P + j; its memory keys keep that
position, and all memories of a chunk share the interval [P, P+R) (parallel positions). The sink
is computed at every layer and seen by every query; it reads no memory, so it is the same for every
context. `logits[:, t]` is the prediction for token t+1, as usual.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from m3jax.config import memory_layer_range, padded_vocab_size, sink_len, validate
from m3jax.model.decode_matmul import decode_matmul, resolve_impl
from m3jax.model.decode_norm import add_and_norm
from m3jax.model.layers import Linear, RMSNorm, param, rope_angles
from m3jax.model.masks import AttentionMask, context_mask
from m3jax.model.sparsify import Selection, slot_valid
from m3jax.model.transformer import LayerStack
from m3jax.sharding import constrain


@flax.struct.dataclass
class MemoryInputs:
    """The memories a batch of contexts reads.

    kv: (B, C, R, memory_layers, 2, kv_heads, k, head_dim), the memories written for each chunk's
        R references (as `write_memories` returns them), C = number of chunks of the context;
    valid: (B, C, R, k) bool, False for padding slots (short references, missing retrievals);
    window: chunk c reads the memories of chunks c-window+1 .. c (1 at inference, 5 in stage 2);
    token_group: None, or (B, T) int: the group (index on the C axis) whose memories each context token
        reads, -1 for none. Generation uses it: decoded tokens read memories retrieved with earlier text,
        not their own chunk's. None means chunk t // chunk_len, and then C must be the chunk count.
    """
    kv: jax.Array
    valid: jax.Array
    window: int = flax.struct.field(pytree_node=False, default=1)
    token_group: jax.Array | None = None


# Streams are padded to a multiple of this (masked keys, dropped outputs): cuDNN's fused attention
# refuses odd lengths when differentiated (seen on an H200: "Unsupported sequence length Q 2051").
STREAM_MULTIPLE = 8


def _segments(cfg):
    """(first_layer, num_layers, is_memory) runs of the stack: before, at and after the memory layers."""
    mem = memory_layer_range(cfg)
    runs = [(0, mem.start, False), (mem.start, len(mem), True), (mem.stop, cfg.model.num_layers - mem.stop, False)]
    return [r for r in runs if r[1] > 0]


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _checked_padding(padding_mask, b: int, t: int):
    """(B, T) bool, True for real tokens (all of them when None); a clear error unless right padding."""
    if padding_mask is None:
        return jnp.ones((b, t), bool)
    if padding_mask.shape != (b, t):
        raise ValueError(f"padding_mask has shape {padding_mask.shape}, expected {(b, t)} like tokens")
    if _is_concrete(padding_mask) and np.any(np.diff(np.asarray(padding_mask, np.int8), axis=1) > 0):
        raise ValueError("padding_mask must be right padding: no real token after a padding position")
    return padding_mask


class Memory3(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        validate(cfg)
        self.cfg = ml_collections.FrozenConfigDict(cfg)
        m = cfg.model
        self.dtype = jnp.dtype(m.dtype)
        self.decode_matmul = resolve_impl(m.decode_matmul)  # how decoding multiplies by weights
        self.embed_tokens = param(rngs, nnx.initializers.normal(m.init_std), (padded_vocab_size(m), m.hidden_size),
                                  ("vocab", "embed"), jnp.dtype(m.param_dtype))
        self.layers = nnx.List([LayerStack(m, n, first, is_mem, rngs=rngs) for first, n, is_mem in _segments(cfg)])
        self.norm = RMSNorm(m.hidden_size, eps=m.norm_eps, dtype=self.dtype, param_dtype=jnp.dtype(m.param_dtype),
                            rngs=rngs)
        if not m.tie_embeddings:
            self.lm_head = Linear((m.hidden_size,), (padded_vocab_size(m),), ("embed",), ("vocab",),
                                  std=m.init_std, dtype=self.dtype, param_dtype=jnp.dtype(m.param_dtype), rngs=rngs)

    # ---- layout -------------------------------------------------------------------------------
    def sink_ids(self):
        return jnp.array(tuple(self.cfg.memory.reference_prefix_ids) + (self.cfg.model.bos_id,), jnp.int32)

    def stream_positions(self, length: int):
        """RoPE positions of `[sink | context of `length` tokens]`."""
        return self.position_of(jnp.arange(sink_len(self.cfg) + length))

    def position_of(self, stream_index):
        """Stream index -> RoPE position: the memory interval [P, P+R) sits between the sink's two parts."""
        p, r = len(self.cfg.memory.reference_prefix_ids), self.cfg.memory.reference_len
        return jnp.where(stream_index < p, stream_index, stream_index + r)

    # ---- reading ------------------------------------------------------------------------------
    def __call__(self, tokens, *, memory: MemoryInputs | None = None, padding_mask=None):
        """tokens: (B, T) ids; padding_mask: (B, T) bool, True for real tokens (right padding).

        Returns logits (B, T, padded_vocab) in f32; logits[:, t] predicts tokens[:, t+1].
        """
        return self._forward(self._check_tokens(tokens, "tokens"), memory, padding_mask, collect_kv=False)[0]

    def prefill(self, tokens, *, cache_len: int, memory: MemoryInputs | None = None, padding_mask=None,
                memory_slots: int = 0, logits_at=None, layer_states=None, sink_kv=None):
        """Read a prompt and keep its keys and values for decoding.

        logits_at: None, or (B,) one position per row: only its logits are computed (decoding needs the
        last prompt token's; the LM head over every position costs a 32 x 128 prompt ~1.6 TFLOP).
        layer_states: None, or per segment `LayerStack.layer_states()`: the layers run over those per-layer
        weights, as decoding does (`decode_step`), and the cache comes per layer.
        Returns (logits (B, T, padded_vocab), or (B, padded_vocab) with logits_at; cache): cache holds,
        per segment of the stack, (k, v) each (layers, B, cache_len, Hkv, D) (with layer_states: a list of
        per-layer (k, v), each (B, cache_len, Hkv, D)) over the stream `[sink | tokens]` (stream index =
        sink_len + t); the memory layers' caches have `memory_slots` more positions at the end, for the
        memories that decoding reads (`load_memory`).
        sink_kv: None, or `sink_kv(layer_states)` (with layer_states): the sink's keys and values are not
        computed again, the layers read the prompt alone and merge the sink's into each attention (faster:
        see `attention.attend_after_sink`, which says which kernels can); the same results up to rounding.
        """
        tokens = self._check_tokens(tokens, "tokens")
        stream = self._stream_len(tokens.shape[1], sink_apart=sink_kv is not None)
        if cache_len < stream:
            raise ValueError(f"cache_len={cache_len} is shorter than the prompt's stream ({stream} positions)")
        if sink_kv is not None and layer_states is None:
            raise ValueError("prefill with sink_kv runs over per-layer weights: pass layer_states too")
        if sink_kv is not None:
            self._check_sink_kv(sink_kv)
        room = {False: cache_len - stream, True: cache_len - stream + memory_slots}  # by segment.is_memory
        logits, kv = self._forward(tokens, memory, padding_mask, collect_kv=True, logits_at=logits_at,
                                   layer_states=layer_states, room=room, sink_kv=sink_kv)
        if layer_states is not None:
            return logits, kv
        cache = []
        for seg, seg_kv in zip(self.layers, kv):
            pad = [(0, 0), (0, 0), (0, room[seg.is_memory]), (0, 0), (0, 0)]
            cache.append(tuple(jnp.pad(x, pad) for x in seg_kv))
        return logits, cache

    def load_memory(self, cache, kv, valid):
        """Write one memory set per row into the memory slots of the memory layers' caches (their last
        Nm positions, `prefill(memory_slots=Nm)`), replacing what was there.

        kv (B, R, memory_layers, 2, Hkv, k, D), valid (B, R, k) -> (cache, memory_valid (B, Nm = R*k)) for
        `decode_step`. The cache is per segment, stacked (k, v) or a list of per-layer (k, v) (LayerStack.decode).
        """
        b = kv.shape[0]
        mem_k, mem_v, _, memory_valid = self._memory_layout(MemoryInputs(kv[:, None], valid[:, None]), b, 1)
        n = memory_valid.shape[1]
        lengths = {seg.is_memory: seg_kv[0][0].shape[1] for seg, seg_kv in zip(self.layers, cache)}  # B, S, ..
        if False in lengths and lengths[True] - lengths[False] != n:
            raise ValueError(f"the memory layers' caches have {lengths[True] - lengths[False]} memory slots, these "
                             f"memories need {n}: prefill with memory_slots={n}")
        out = []
        for seg, seg_kv in zip(self.layers, cache):
            if seg.is_memory and isinstance(seg_kv, list):
                seg_kv = [(k.at[:, -n:].set(mem_k[i].astype(k.dtype)), v.at[:, -n:].set(mem_v[i].astype(v.dtype)))
                          for i, (k, v) in enumerate(seg_kv)]
            elif seg.is_memory:
                k, v = seg_kv
                seg_kv = (k.at[:, :, -n:].set(mem_k.astype(k.dtype)), v.at[:, :, -n:].set(mem_v.astype(v.dtype)))
            out.append(seg_kv)
        return out, memory_valid

    def decode_step(self, tokens, write_at, cache, memory_valid=None, layer_states=None):
        """One token per row: tokens (B,) at stream index write_at (B,); cache as `prefill` returns it;
        memory_valid: None, or (B, Nm) as `load_memory` returns it with the cache holding the memories.

        Returns (logits (B, padded_vocab) predicting the next token, updated cache). layer_states: None
        (layers scanned over the stacked weights), or per segment `LayerStack.layer_states()`, with the
        cache per layer (see LayerStack.decode).
        """
        cos, sin = rope_angles(self.position_of(write_at)[:, None], self.cfg.model.head_dim, self.cfg.model.rope_theta)
        h = self._embed(tokens[:, None].astype(jnp.int32))
        new_cache = []
        if layer_states is None:
            for seg, seg_kv in zip(self.layers, cache):
                h, seg_kv = seg.decode(h, cos, sin, seg_kv, write_at, memory_valid if seg.is_memory else None)
                new_cache.append(seg_kv)
            return self._logits(self.norm(h))[:, 0], new_cache
        pending = None  # each layer's last product, added to h by the next norm (decode_norm)
        for seg, seg_kv, states in zip(self.layers, cache, layer_states):
            h, pending, seg_kv = seg.decode_fused(h, pending, cos, sin, seg_kv, write_at,
                                                  memory_valid if seg.is_memory else None, states)
            new_cache.append(seg_kv)
        head = None if self.cfg.model.tie_embeddings else self.lm_head.kernel[...]
        _, h = add_and_norm(h, pending, self.norm, self.decode_matmul, next_weight=head)
        if self.cfg.model.tie_embeddings:  # a tied head is transposed: XLA's dot
            return self._logits(h)[:, 0], new_cache
        return decode_matmul(h[:, 0], head, self.decode_matmul, out_dtype=jnp.float32), new_cache

    def _stream_len(self, t: int, sink_apart: bool = False) -> int:
        """Positions of the stream `[sink | t tokens]`, padded to a multiple of STREAM_MULTIPLE (with the
        sink apart, the tokens alone are padded: the layers read them without the sink)."""
        s = sink_len(self.cfg)
        if sink_apart:
            return s + t + (-t) % STREAM_MULTIPLE
        return s + t + (-(s + t)) % STREAM_MULTIPLE

    def sink_kv(self, layer_states=None):
        """The sink's keys (after RoPE) and values at every layer: per segment, a list of per-layer (k, v)
        each (S, Hkv, D). The sink reads no memory, so for given weights they are the same for every
        context; `prefill(sink_kv=...)` takes them instead of computing them for every prompt. They come
        from the ordinary prefill of an empty context (over layer_states when given, as `prefill`)."""
        s = sink_len(self.cfg)
        _, kv = self._forward(jnp.zeros((1, 0), jnp.int32), None, None, collect_kv=True,
                              layer_states=layer_states, room={False: 0, True: 0})
        if layer_states is None:  # stacked (k, v) per segment
            kv = [[(k[i], v[i]) for i in range(seg.num_layers)] for seg, (k, v) in zip(self.layers, kv)]
        return [[(k[0, :s], v[0, :s]) for k, v in seg_kv] for seg_kv in kv]

    def _check_sink_kv(self, sink_kv) -> None:
        """A clear error unless sink_kv has `sink_kv()`'s structure and shapes for this model."""
        m = self.cfg.model
        want = (sink_len(self.cfg), m.num_kv_heads, m.head_dim)
        layers = [seg.num_layers for seg in self.layers]
        got = [len(seg_kv) if isinstance(seg_kv, (list, tuple)) else None for seg_kv in sink_kv] \
            if isinstance(sink_kv, (list, tuple)) else None
        if got != layers:
            raise ValueError(f"sink_kv must hold, per segment of the stack, one (k, v) per layer ({layers}), as "
                             f"Memory3.sink_kv() returns them for this model; got {got or type(sink_kv).__name__}")
        for i, seg_kv in enumerate(sink_kv):
            for j, pair in enumerate(seg_kv):
                shapes = [jnp.shape(x) for x in pair] if isinstance(pair, (list, tuple)) else None
                if shapes != [want, want]:
                    raise ValueError(f"sink_kv[{i}][{j}] must be (k, v) each of shape {want} (sink tokens, kv heads, "
                                     f"head dim) for this model, got {shapes or type(pair).__name__}")

    def _forward(self, tokens, memory, padding_mask, collect_kv: bool, logits_at=None, layer_states=None,
                 room=None, sink_kv=None):
        """tokens: checked by the caller (`_check_tokens`, once: on concrete ids it is a pass over them).
        layer_states, room, sink_kv: as `prefill` (per-layer weights; cache positions after the stream by
        is_memory; the sink's keys and values, so that the layers' stream leaves the sink out)."""
        b, t = tokens.shape
        if logits_at is not None and jnp.shape(logits_at) != (b,):
            raise ValueError(f"logits_at has shape {jnp.shape(logits_at)}, expected ({b},): one position per row")
        s = sink_len(self.cfg)
        lead = s if sink_kv is None else 0  # sink positions in the stream the layers read
        padding_mask = _checked_padding(padding_mask, b, t)
        extra = self._stream_len(t, sink_apart=sink_kv is not None) - s - t
        stream = jnp.concatenate([jnp.broadcast_to(self.sink_ids()[:lead], (b, lead)), tokens,
                                  jnp.full((b, extra), self.cfg.model.pad_id, jnp.int32)], axis=1)
        padding_mask = jnp.concatenate([padding_mask.astype(bool), jnp.zeros((b, extra), bool)], axis=1)
        cos, sin = rope_angles(self.position_of(jnp.arange(s - lead, s + t + extra)), self.cfg.model.head_dim,
                               self.cfg.model.rope_theta)
        mask = context_mask(padding_mask, lead, self.cfg.memory.chunk_len)
        if memory is not None:
            mem_k, mem_v, mem_chunk, mem_valid = self._memory_layout(memory, b, t)
            group = memory.token_group
            if group is not None:
                group = jnp.concatenate([jnp.asarray(group, jnp.int32), jnp.full((b, extra), -1, jnp.int32)], axis=1)
            mem_mask = context_mask(padding_mask, lead, self.cfg.memory.chunk_len,
                                    (mem_chunk, mem_valid, memory.window, group))
        h = self._embed(stream)
        kv = []
        for i, seg in enumerate(self.layers):
            seg_memory = (mem_k, mem_v) if seg.is_memory and memory is not None else None
            seg_mask = mask if seg_memory is None else mem_mask
            if layer_states is None:
                h, seg_kv = seg(h, cos, sin, seg_mask, seg_memory, collect_kv=collect_kv)
            else:
                h, seg_kv = seg.prefill_fused(h, cos, sin, seg_mask, seg_memory, layer_states[i], room[seg.is_memory],
                                              None if sink_kv is None else sink_kv[i])
            kv.append(seg_kv)
        if logits_at is not None:
            last = jnp.take_along_axis(h, (lead + jnp.asarray(logits_at, jnp.int32))[:, None, None], axis=1)
            return self._logits(self.norm(last))[:, 0], kv
        return self._logits(self.norm(h[:, lead:lead + t])), kv

    def _memory_layout(self, memory: MemoryInputs, b: int, t: int):
        """MemoryInputs -> per-layer keys/values (layers, B, Nm, Hkv, D), slot chunk ids, slot validity."""
        m, mem = self.cfg.model, self.cfg.memory
        chunks = -(-t // mem.chunk_len)
        kv, valid = memory.kv, memory.valid
        if memory.token_group is not None:
            if memory.token_group.shape != (b, t):
                raise ValueError(f"memory.token_group has shape {memory.token_group.shape}, expected {(b, t)}")
            chunks = kv.shape[1]  # groups, not chunks
        if kv.ndim != 8:
            raise ValueError(f"memory.kv must have 8 axes (B, C, R, layers, 2, kv_heads, k, head_dim), got {kv.shape}")
        want = (b, chunks, kv.shape[2], mem.num_layers, 2, m.num_kv_heads, kv.shape[6], m.head_dim)
        if kv.shape != want:
            raise ValueError(f"memory.kv has shape {kv.shape}; for {b} sequences of {t} tokens ({chunks} chunks "
                             f"of {mem.chunk_len}) this model needs {want} (R references, k tokens free)")
        if valid.shape != (b, chunks, kv.shape[2], kv.shape[6]):
            raise ValueError(f"memory.valid has shape {valid.shape}, expected {(b, chunks, kv.shape[2], kv.shape[6])}")
        if not isinstance(memory.window, int) or memory.window < 1:
            raise ValueError(f"memory.window must be a positive int, got {memory.window!r}")
        per_chunk = kv.shape[2] * kv.shape[6]
        kv = jnp.transpose(kv, (3, 4, 0, 1, 2, 6, 5, 7))  # (layers, 2, B, C, R, k, Hkv, D)
        kv = kv.reshape(mem.num_layers, 2, b, chunks * per_chunk, m.num_kv_heads, m.head_dim)
        kv = constrain(kv, ("layers", None, "batch", "mem_length", "kv_heads", None))
        mem_chunk = np.repeat(np.arange(chunks), per_chunk)  # static, so masks can carry a MemoryLayout
        return kv[:, 0], kv[:, 1], mem_chunk, valid.reshape(b, chunks * per_chunk).astype(bool)

    # ---- writing ------------------------------------------------------------------------------
    def encode_references(self, ref_tokens, ref_lengths):
        """Write memories: encode each reference alone after `<s>Reference:`, through the memory layers.

        ref_tokens: (N, L) ids, L <= memory.reference_len, right-padded; ref_lengths: (N,) real tokens.
        Returns (memories (N, memory_layers, 2, kv_heads, k, head_dim) in the compute dtype, with keys
        after RoPE; slot validity (N, k)). Layers after the last memory layer are not run.
        """
        with jax.named_scope("encode_references"):  # profiles attribute the writing's kernels by this name
            return self._encode_references(ref_tokens, ref_lengths)

    def _encode_references(self, ref_tokens, ref_lengths):
        mem = self.cfg.memory
        ref_tokens = self._check_tokens(ref_tokens, "ref_tokens")
        n, length = ref_tokens.shape
        if length > mem.reference_len:
            raise ValueError(f"references have {length} tokens, more than memory.reference_len={mem.reference_len}")
        if ref_lengths.shape != (n,):
            raise ValueError(f"ref_lengths has shape {ref_lengths.shape}, expected ({n},)")
        if _is_concrete(ref_lengths):
            lengths = np.asarray(ref_lengths)
            if lengths.min(initial=1) < 1 or lengths.max(initial=0) > length:
                raise ValueError(f"ref_lengths must be in [1, {length}], got {lengths.min()}..{lengths.max()}")
        prefix = jnp.array(mem.reference_prefix_ids, jnp.int32)
        p = prefix.shape[0]
        extra = (-(p + length)) % STREAM_MULTIPLE
        ref_tokens = jnp.concatenate([ref_tokens, jnp.full((n, extra), self.cfg.model.pad_id, jnp.int32)], axis=1)
        length += extra
        real = jnp.arange(length)[None, :] < ref_lengths[:, None]
        token_valid = jnp.concatenate([jnp.zeros((n, p), bool), real], axis=1)  # start tokens excluded
        mask = AttentionMask(p + ref_lengths.astype(jnp.int32))
        cos, sin = rope_angles(jnp.arange(p + length), self.cfg.model.head_dim, self.cfg.model.rope_theta)
        h = self._embed(jnp.concatenate([jnp.broadcast_to(prefix, (n, p)), ref_tokens], axis=1))
        impl = next(seg for seg in self.layers if seg.is_memory).blocks.self_attn.impl
        kernel = impl.removesuffix("_split") if impl in ("cudnn", "cudnn_split", "xla", "xla_split") else None
        select = Selection(token_valid, mem.tokens_per_head, mem.head_combine, p, ref_lengths, kernel)
        for seg in self.layers:
            if seg.is_memory:
                _, (keys, values) = seg(h, cos, sin, mask, select=select)  # (layers, N, Hkv, k, D)
                memories = jnp.stack([keys, values], axis=2)  # (layers, N, 2, Hkv, k, D)
                return jnp.moveaxis(memories, 1, 0), slot_valid(token_valid, mem.tokens_per_head)
            h, _ = seg(h, cos, sin, mask)
        raise ValueError("this config has no memory layers (memory.num_layers = 0)")

    # ---- pieces -------------------------------------------------------------------------------
    def _embed(self, ids):
        h = jnp.take(self.embed_tokens[...], ids, axis=0).astype(self.dtype)
        return constrain(h, ("batch", "length", "embed"))

    def _logits(self, h):
        w = self.embed_tokens[...].T if self.cfg.model.tie_embeddings else self.lm_head.kernel[...]
        logits = jnp.einsum("btd,dv->btv", h, w.astype(self.dtype), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"))

    def _check_tokens(self, tokens, name):
        tokens = jnp.asarray(tokens) if not isinstance(tokens, jax.Array) else tokens
        if tokens.ndim != 2:
            raise ValueError(f"{name} must have shape (batch, length), got {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"{name} must be integer token ids, got dtype {tokens.dtype}")
        if _is_concrete(tokens) and tokens.size:
            bad = np.argwhere((np.asarray(tokens) < 0) | (np.asarray(tokens) >= self.cfg.model.vocab_size))
            if len(bad):
                i, j = bad[0]
                raise ValueError(f"{name}[{i}, {j}] = {int(tokens[i, j])} is outside the vocabulary "
                                 f"[0, {self.cfg.model.vocab_size}) ({len(bad)} such ids)")
        return tokens.astype(jnp.int32)
