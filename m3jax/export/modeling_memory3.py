"""Memory3 in PyTorch on Hugging Face Llama modules: reads explicit memories like m3jax's Memory3.

Copied by `m3jax export` into the export directory; `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` loads `Memory3ForCausalLM`. The weights are the plain Llama ones (same tensor
names), so this file only changes what attention sees:

- the stream is `sink | context`, sink = `<s>Reference:` + `<s>` (config.m3jax_sink_ids) at RoPE
  positions config.m3jax_sink_positions, the context right after; `forward` adds the sink itself and
  returns logits for the context tokens only;
- at memory layers (config.m3jax_memory_layers) every context query of chunk c also sees, in the same
  softmax, the valid memory slots of chunks c-window+1 .. c (keys stored after RoPE, so no rotation here).

Memories come in m3jax's `MemoryInputs` layout: memory_kv (B, C, R, memory_layers, 2, kv_heads, k,
head_dim), memory_valid (B, C, R, k) bool, memory_window int, and optionally memory_token_group (B, T)
(the memory group each token reads, -1 for none; by default token t reads chunk t // chunk_len).
`encode_references` writes memories (top-k sparsified keys/values) like m3jax's `write_memories`.
No KV cache: this is a reference implementation for scoring and parity, not for fast generation.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .bank_memory3 import MemoryBankReader, load_memory_bank  # noqa: F401  (re-exported for users)
from .configuration_memory3 import Memory3Config


def _additive(keep: torch.Tensor, dtype) -> torch.Tensor:
    """Boolean (B, 1, Tq, Tk) mask -> the additive mask HF's eager attention expects."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


class Memory3Attention(LlamaAttention):
    """Llama attention whose keys/values may be preceded by memory keys/values (already rotated)."""

    def project(self, hidden_states, position_embeddings):
        """(q, k) before RoPE, k after RoPE, v; each (B, heads, T, head_dim)."""
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, q_rot, k_rot, v

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, memory_kv=None, **kwargs):
        _, _, q, k, v = self.project(hidden_states, position_embeddings)
        if memory_kv is not None:  # (B, kv_heads, Nm, head_dim) each; memory keys come first
            k = torch.cat([memory_kv[0].to(k.dtype), k], dim=2)
            v = torch.cat([memory_kv[1].to(v.dtype), v], dim=2)
        out, weights = eager_attention_forward(self, q, k, v, attention_mask, scaling=self.scaling)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


class Memory3Model(LlamaModel):
    config_class = Memory3Config

    def __init__(self, config):
        super().__init__(config)
        for i, layer in enumerate(self.layers):
            layer.self_attn = Memory3Attention(config, i)

    def stream_positions(self, length: int, device=None) -> torch.Tensor:
        sink = torch.tensor(self.config.m3jax_sink_positions, dtype=torch.long, device=device)
        return torch.cat([sink, sink[-1] + 1 + torch.arange(length, device=device)])

    def _memory(self, kv, valid, window, token_group, b, t, s):
        """MemoryInputs -> per memory layer (k, v) (B, kv_heads, Nm, D) and the (B, 1, S+T, Nm) read mask."""
        cfg = self.config
        chunks = -(-t // cfg.m3jax_chunk_len) if token_group is None else kv.shape[1]
        n_layers = len(cfg.memory_layer_range)
        want = (b, chunks, kv.shape[2], n_layers, 2, cfg.num_key_value_heads, kv.shape[6], cfg.head_dim)
        if tuple(kv.shape) != want:
            raise ValueError(f"memory_kv has shape {tuple(kv.shape)}, expected {want} (B, C, R, memory layers, 2, "
                             "kv heads, k, head dim)")
        if tuple(valid.shape) != (b, chunks, kv.shape[2], kv.shape[6]):
            raise ValueError(f"memory_valid has shape {tuple(valid.shape)}, "
                             f"expected {(b, chunks, kv.shape[2], kv.shape[6])}")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"memory_window must be a positive int, got {window!r}")
        per_chunk = kv.shape[2] * kv.shape[6]
        kv = kv.permute(3, 4, 0, 5, 1, 2, 6, 7)  # (layers, 2, B, Hkv, C, R, k, D)
        kv = kv.reshape(n_layers, 2, b, cfg.num_key_value_heads, chunks * per_chunk, cfg.head_dim)
        slot_chunk = torch.arange(chunks, device=kv.device).repeat_interleave(per_chunk)
        index = torch.arange(s + t, device=kv.device)
        if token_group is None:
            q_chunk = torch.where(index >= s, (index - s) // cfg.m3jax_chunk_len, -1)[None]
        else:
            q_chunk = torch.cat([torch.full((b, s), -1, device=kv.device), token_group.to(kv.device).long()], 1)
        lag = q_chunk[:, :, None] - slot_chunk[None, None, :]
        reads = (q_chunk[:, :, None] >= 0) & (lag >= 0) & (lag < window)
        reads = reads & valid.reshape(b, 1, -1).bool()
        return kv, reads[:, None]

    def forward(self, input_ids, attention_mask=None, memory_kv=None, memory_valid=None, memory_window=1,
                memory_token_group=None, **kwargs):
        """input_ids: (B, T) context tokens (no sink); attention_mask: (B, T), 1 for real tokens (right padding).

        Returns the final hidden states of the context positions, (B, T, hidden).
        """
        b, t = input_ids.shape
        device = input_ids.device
        sink = torch.tensor(self.config.m3jax_sink_ids, dtype=torch.long, device=device)
        s = sink.shape[0]
        stream = torch.cat([sink.expand(b, s), input_ids], dim=1)
        real = torch.ones(b, t, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        key_valid = torch.cat([torch.ones(b, s, dtype=torch.bool, device=device), real], dim=1)
        index = torch.arange(s + t, device=device)
        keep = (index[None, :] <= index[:, None])[None, None] & key_valid[:, None, None, :]
        h = self.embed_tokens(stream)
        position_embeddings = self.rotary_emb(h, self.stream_positions(t, device)[None])
        plain = _additive(keep, h.dtype)
        mem_layers = self.config.memory_layer_range
        if memory_kv is not None:
            mem_kv, reads = self._memory(memory_kv, memory_valid, memory_window, memory_token_group, b, t, s)
            with_memory = _additive(torch.cat([reads, keep], dim=-1), h.dtype)
        for i, layer in enumerate(self.layers):
            if memory_kv is not None and i in mem_layers:
                j = i - mem_layers.start
                h = layer(h, attention_mask=with_memory, position_embeddings=position_embeddings,
                          memory_kv=(mem_kv[j, 0], mem_kv[j, 1]))
            else:
                h = layer(h, attention_mask=plain, position_embeddings=position_embeddings)
        return self.norm(h[:, s:])


class Memory3ForCausalLM(LlamaForCausalLM):
    config_class = Memory3Config

    def __init__(self, config):
        LlamaPreTrainedModel.__init__(self, config)  # not LlamaForCausalLM's: it would build a plain LlamaModel
        self.model = Memory3Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, memory_kv=None, memory_valid=None, memory_window=1,
                memory_token_group=None, labels=None, **kwargs):
        """Logits (B, T, vocab rows) of the context tokens; logits[:, t] predicts input_ids[:, t+1]."""
        if kwargs.get("past_key_values") is not None:
            raise ValueError("Memory3ForCausalLM keeps no KV cache; call it on the whole context")
        h = self.model(input_ids, attention_mask, memory_kv, memory_valid, memory_window, memory_token_group)
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @torch.no_grad()
    def encode_references(self, ref_tokens, ref_lengths):
        """Write memories: each reference alone after `<s>Reference:`, through the layers up to the last memory layer.

        ref_tokens: (N, L) right-padded ids, L <= m3jax_reference_len; ref_lengths: (N,). Returns memories
        (N, memory_layers, 2, kv_heads, k, head_dim) (keys after RoPE, values) and slot validity (N, k).
        Per layer and KV head the k tokens with the largest summed attention (q, k before RoPE, no causal
        mask, start tokens and padding excluded) are kept, best first.
        """
        cfg, model = self.config, self.model
        n, length = ref_tokens.shape
        device = ref_tokens.device
        prefix = torch.tensor(cfg.m3jax_reference_prefix_ids, dtype=torch.long, device=device)
        p, top_k = prefix.shape[0], cfg.m3jax_tokens_per_head
        real = torch.arange(length, device=device)[None] < ref_lengths.to(device)[:, None]
        token_valid = torch.cat([torch.zeros(n, p, dtype=torch.bool, device=device), real], dim=1)
        key_valid = torch.cat([torch.ones(n, p, dtype=torch.bool, device=device), real], dim=1)
        index = torch.arange(p + length, device=device)
        keep = (index[None, :] <= index[:, None])[None, None] & key_valid[:, None, None, :]
        h = model.embed_tokens(torch.cat([prefix.expand(n, p), ref_tokens], dim=1))
        position_embeddings = model.rotary_emb(h, index[None])
        mask = _additive(keep, h.dtype)
        memories = []
        for i in range(cfg.memory_layer_range.stop):
            layer = model.layers[i]
            if i in cfg.memory_layer_range:
                q, k, _, k_rot, v = layer.self_attn.project(layer.input_layernorm(h), position_embeddings)
                memories.append(self._select(q, k, k_rot, v, token_valid, top_k))
            h = layer(h, attention_mask=mask, position_embeddings=position_embeddings)
        slots = torch.arange(top_k, device=device)[None] < token_valid.sum(-1, keepdim=True)
        return torch.stack(memories, dim=1), slots

    def _select(self, q, k, k_rot, v, token_valid, top_k):
        """(2, kv_heads, k, D) per reference: the top-k tokens' rotated keys and values, best first."""
        n, hq, t, d = q.shape
        hkv = k.shape[1]
        logits = torch.einsum("nhgid,nhjd->nhgij", q.float().view(n, hkv, hq // hkv, t, d), k.float()) * d ** -0.5
        logits = logits.masked_fill(~token_valid[:, None, None, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1).masked_fill(~token_valid[:, None, None, :, None], 0.0)
        per_head = probs.sum(dim=3)  # (N, Hkv, group, T): attention each token receives
        scores = per_head.sum(2) if self.config.m3jax_head_combine == "sum" else per_head.amax(2)
        scores = scores.masked_fill(~token_valid[:, None, :], float("-inf"))
        idx = torch.topk(scores, top_k, dim=-1).indices[..., None].expand(-1, -1, -1, d)
        return torch.stack([torch.gather(k_rot, 2, idx), torch.gather(v, 2, idx)], dim=1)
