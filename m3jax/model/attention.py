"""Attention with explicit memory: one softmax over `[memory | sink | causal context]` keys.

Kernels (all take one explicit boolean mask, so memory keys can sit anywhere among the keys):
- `exact`: einsum + f32 softmax, GQA by grouping query heads; the reference path on any device.
- `splash`: the Pallas TPU splash kernel with the masks' static structure (m3jax/model/splash.py);
  interpret mode off TPU. Masks without a static layout (per-row token groups) take the exact path.
- `xla` / `cudnn`: `jax.nn.dot_product_attention` with the same mask. `is_causal` is never used: with
  fewer queries than keys it aligns queries to the *start* of the keys, which is wrong once memory
  keys are in front.
- `xla_split` / `cudnn_split`: with a static memory layout, the stream in the kernel's causal mode and
  the memory keys exactly, per chunk, merged by log-sum-exp (m3jax/model/split_attention.py gives the
  kernel's log-sum-exp the gradient it lacks); otherwise as `xla` / `cudnn`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from m3jax.model import decode_attention as da
from m3jax.model import decode_matmul as dm
from m3jax.model.layers import Linear, apply_rope
from m3jax.model.masks import MASKED_SCORE, AttentionMask
from m3jax.sharding import constrain



def resolve_impl(impl: str, dtype, platform: str | None = None) -> str:
    """`auto` picks splash on TPU, cuDNN split in two on GPU for half-precision compute (faster than one
    dense-mask call: benchmarks/RESULTS.md; masks without a static layout still take the dense call),
    the exact path otherwise.

    platform: the devices the model will run on (default: JAX's default backend); ahead-of-time
    compilation for TPUs from a CPU host passes "tpu".
    """
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return "splash"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn_split" if half and platform == "gpu" else "exact"


def exact_attention(q, k, v, mask):
    """q: (B, Tq, Hq, D); k, v: (B, Tk, Hkv, D); mask: (B, 1, Tq, Tk) bool -> (B, Tq, Hq, D)."""
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, tq, hkv, hq // hkv, d)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    scores = jnp.where(mask[:, :, None], scores, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, tq, hq, d).astype(q.dtype)


# the kernels that can take the sink's keys apart (`attend_after_sink`)
SINK_APART = ("xla_split", "cudnn_split", "splash")


def attend_after_sink(q, k, v, mask: AttentionMask, sink_kv, impl: str):
    """`attend` for a stream without the sink, whose keys and values sink_kv ((S, Hkv, D) each, the same
    for every row) every query also sees: merged by log-sum-exp (split_attention.attention_after_sink).
    For inference (no gradient); the split kernels and splash take it."""
    from m3jax.model.split_attention import attention_after_sink
    if impl not in SINK_APART:
        raise ValueError(f"attention with the sink apart needs one of {SINK_APART}, not {impl!r}")
    if mask.memory_valid is not None and mask.layout is None:
        raise ValueError("attention with the sink apart needs memory with a static layout (no token groups)")
    return attention_after_sink(q, k, v, mask, *sink_kv, impl.removesuffix("_split"))


def attend(q, k, v, mask: AttentionMask, impl: str):
    """q: (B, Tq, Hq, D); k, v: (B, Tk, Hkv, D) -> (B, Tq, Hq, D)."""
    tq, tk = q.shape[1], k.shape[1]
    if impl == "exact":
        return exact_attention(q, k, v, mask.to_dense(tq, tk))
    if impl == "splash":
        if mask.dense is not None and mask.layout is None:  # per-row structure: no static mask can hold it
            return exact_attention(q, k, v, mask.dense)
        from m3jax.model.splash import splash_attention  # imports Pallas TPU: only when chosen
        return splash_attention(q, k, v, mask)
    if impl in ("xla_split", "cudnn_split"):
        impl = impl.removesuffix("_split")
        if mask.layout is not None and mask.memory_valid is not None:
            from m3jax.model.split_attention import split_memory_attention
            return split_memory_attention(q, k, v, mask, impl)
    if impl not in ("xla", "cudnn"):
        raise ValueError(f"unknown attention implementation {impl!r}")
    if mask.dense is not None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask.dense, implementation=impl)
    if tq != tk:  # is_causal aligns queries to the start of the keys: only right when they are the same
        raise ValueError(f"causal attention without a dense mask needs as many queries as keys ({tq} vs {tk})")
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=mask.kv_lengths,
                                        implementation=impl)


class Attention(nnx.Module):
    """GQA self-attention with HF Llama projections; at memory layers, memory keys join the softmax."""

    def __init__(self, model_cfg, *, rngs):
        m = model_cfg
        kw = dict(std=m.init_std, dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype), rngs=rngs)
        dim, hq, hkv, hd = m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim
        self.q_proj = Linear((dim,), (hq, hd), ("embed",), ("q_heads", "head_dim"), **kw)
        self.k_proj = Linear((dim,), (hkv, hd), ("embed",), ("kv_heads", "head_dim"), **kw)
        self.v_proj = Linear((dim,), (hkv, hd), ("embed",), ("kv_heads", "head_dim"), **kw)
        self.o_proj = Linear((hq, hd), (dim,), ("q_heads", "head_dim"), ("embed",), **kw)
        self.impl = resolve_impl(m.attention, m.dtype)
        self.decode_matmul = dm.resolve_impl(m.decode_matmul)
        self.decode_attention = da.resolve_impl(m.decode_attention)

    def __call__(self, x, cos, sin, mask, memory_kv=None, collect=False, qkv_kernel=None, sink_kv=None):
        """x: (B, T, dim); mask: AttentionMask over (Nm +) T keys; memory_kv: (k, v) each (B, Nm, Hkv, D) or None.
        sink_kv: None, or the sink's (k, v) each (S, Hkv, D) when x is a stream without it (prefill: the
        sink is the same for every context, `Memory3.sink_kv`); see `attend_after_sink`.

        With `collect`, also returns (q, k) before RoPE and (k, v) after it, for memory writing.
        qkv_kernel: None, or the three projections' kernels concatenated, (dim, Hq + 2 Hkv, D) (prefill over
        `LayerStack.layer_states`): one product instead of three.
        """
        if qkv_kernel is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            hq = self.o_proj.kernel.shape[0]
            hkv = (qkv_kernel.shape[1] - hq) // 2
            qkv = jnp.einsum("btd,dhk->bthk", x.astype(self.q_proj.dtype), qkv_kernel.astype(self.q_proj.dtype))
            q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
        q = constrain(checkpoint_name(q, "attn_proj"), ("batch", "length", "heads", None))
        k = constrain(checkpoint_name(k, "attn_proj"), ("batch", "length", "kv_heads", None))
        v = constrain(checkpoint_name(v, "attn_proj"), ("batch", "length", "kv_heads", None))
        q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = k_rot, v
        if memory_kv is not None:
            mem_k, mem_v = memory_kv
            keys = jnp.concatenate([mem_k.astype(k.dtype), k_rot], axis=1)
            values = jnp.concatenate([mem_v.astype(v.dtype), v], axis=1)
        if mask.dense is not None and keys.shape[1] != mask.dense.shape[-1]:
            raise ValueError(f"attention mask covers {mask.dense.shape[-1]} keys, but there are {keys.shape[1]}")
        with jax.named_scope("attention_kernel"):
            if sink_kv is None:
                out = attend(q_rot, keys, values, mask, self.impl)
            else:
                out = attend_after_sink(q_rot, keys, values, mask, sink_kv, self.impl)
        out = checkpoint_name(self.o_proj(out), "attn_proj")
        return out, ((q, k, k_rot, v) if collect else None)

    def decode(self, x, cos, sin, cache_kv, write_at, memory_valid=None, qkv_kernel=None, update_cache=False,
               partials=False):
        """One new token per row against a KV cache (generation).

        x: (B, 1, dim); cache_kv: (k, v) each (B, S, Hkv, D), the stream so far; write_at: (B,) the stream
        index of this token (cache keys at and after it are ignored); memory_valid: None, or (B, Nm) bool
        when the cache's last Nm positions hold memories (`Memory3.load_memory`): which of them this token
        reads. qkv_kernel: None, or (dim, Hq + 2 Hkv, D), the three projections' kernels concatenated: one
        GEMM (then the projections run as `model.decode_matmul` says).

        Returns (out (B, 1, dim), kv). Without `update_cache`, the cache is only read and kv is this token's
        (k, v), each (B, Hkv, D), for the caller to store: an update of a cache stacked over layers inside
        the layer loop makes XLA copy the whole cache once per layer. With `update_cache` (a cache of this
        layer alone), kv is the cache with the token written, by the Pallas kernel when
        `model.decode_attention` says so (m3jax/model/decode_attention.py). partials (with qkv_kernel): out is
        the output projection as f32 partial sums instead, (splits, rows >= B, dim) as
        `decode_matmul.partial_products` gives them.
        """
        b, hq = x.shape[0], self.o_proj.kernel.shape[0]
        if qkv_kernel is None:
            qkv = jnp.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=2)
        else:
            qkv = dm.decode_matmul(x.astype(self.q_proj.dtype), qkv_kernel, self.decode_matmul,
                                   next_weight=self.o_proj.kernel[...].reshape(hq * qkv_kernel.shape[-1], -1))
        hkv, d = (qkv.shape[2] - hq) // 2, qkv.shape[3]
        # RoPE on q and k with v passed through: one element-wise pass, one array for the kernel
        qkv = jnp.concatenate([apply_rope(qkv[:, :, :hq + hkv], cos, sin), qkv[:, :, hq + hkv:]], axis=2)
        cache_k, cache_v = cache_kv
        if update_cache and self.decode_attention == "pallas" and da.fits(hq, hkv, d):
            out, cache_k, cache_v = da.decode_attention_packed(qkv[:, 0], cache_k, cache_v, write_at, memory_valid)
            out, kv = out[:, None], (cache_k, cache_v)
        else:
            q_rot, k_rot, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
            out = self._decode_attention_xla(q_rot, k_rot, v, cache_k, cache_v, write_at, memory_valid)
            kv = (k_rot[:, 0], v[:, 0])
            if update_cache:
                rows = jnp.arange(b)
                kv = (cache_k.at[rows, write_at].set(kv[0].astype(cache_k.dtype)),
                      cache_v.at[rows, write_at].set(kv[1].astype(cache_v.dtype)))
        if qkv_kernel is None:
            out = self.o_proj(out)
        else:
            o_kernel = self.o_proj.kernel[...].reshape(hq * d, -1)
            if partials:
                return dm.partial_products(out.reshape(b, hq * d), o_kernel, self.decode_matmul), kv
            out = dm.decode_matmul(out.reshape(b, 1, hq * d), o_kernel, self.decode_matmul)
        return out, kv

    @staticmethod
    def _decode_attention_xla(q_rot, k_rot, v, cache_k, cache_v, write_at, memory_valid):
        """(B, 1, Hq, D): one softmax over [cache | this token], in two parts (no concatenation of the new key)."""
        b, _, hq, d = q_rot.shape
        hkv = k_rot.shape[2]
        qg = q_rot.reshape(b, hkv, hq // hkv, d)
        ok = jnp.arange(cache_k.shape[1])[None, :] < write_at[:, None]
        if memory_valid is not None:  # memories in the cache's tail: one softmax over stream and memories
            ok = jnp.concatenate([ok[:, :cache_k.shape[1] - memory_valid.shape[1]], memory_valid], axis=1)
        scale = d ** -0.5
        scores = jnp.einsum("bhgd,bkhd->bhgk", qg, cache_k.astype(qg.dtype), preferred_element_type=jnp.float32)
        scores = jnp.where(ok[:, None, None, :], scores * scale, MASKED_SCORE)
        own = jnp.einsum("bhgd,bhd->bhg", qg, k_rot[:, 0], preferred_element_type=jnp.float32)[..., None] * scale
        top = jnp.maximum(scores.max(axis=-1, keepdims=True), own)
        weights, own = jnp.exp(scores - top), jnp.exp(own - top)
        total = weights.sum(axis=-1, keepdims=True) + own
        out = own * v[:, 0, :, None, :].astype(jnp.float32)
        out += jnp.einsum("bhgk,bkhd->bhgd", weights.astype(qg.dtype), cache_v.astype(qg.dtype),
                          preferred_element_type=jnp.float32)
        return (out / total).reshape(b, 1, hq, d).astype(q_rot.dtype)
