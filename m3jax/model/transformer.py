"""Decoder layers: a pre-norm Block, and LayerStack, a run of layers stacked on a leading axis and scanned.

The model is a list of LayerStacks ("segments"): the memory layers form one segment, the layers
before and after it others. Each segment is one `lax.scan` (or an unrolled loop) with the remat
policy of the config; only the memory segment receives memory keys.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m3jax.model.attention import Attention
from m3jax.model.decode_norm import add_and_norm
from m3jax.model.layers import MLP, RMSNorm
from m3jax.model.sparsify import select_tokens
from m3jax.sharding import constrain


class Block(nnx.Module):
    def __init__(self, model_cfg, *, rngs):
        m = model_cfg
        dt, pdt = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
        self.input_layernorm = RMSNorm(m.hidden_size, eps=m.norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.self_attn = Attention(m, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(m.hidden_size, eps=m.norm_eps, dtype=dt, param_dtype=pdt,
                                                rngs=rngs)
        self.mlp = MLP(m.hidden_size, m.mlp_dim, std=m.init_std, dtype=dt, param_dtype=pdt, rngs=rngs,
                       decode_matmul=self.self_attn.decode_matmul)

    def __call__(self, h, cos, sin, mask, memory_kv=None, collect=False, fused=None, sink_kv=None):
        """fused: None, or this layer's `fuse_decode_weights` kernels (the state's are then placeholders);
        sink_kv: as `Attention.__call__`."""
        fused = fused or {}
        a, aux = self.self_attn(self.input_layernorm(h), cos, sin, mask, memory_kv, collect, fused.get("qkv"),
                                sink_kv)
        h = h + a
        h = h + self.mlp(self.post_attention_layernorm(h), fused.get("gate_up"))
        return constrain(h, ("batch", "length", "embed")), aux

    def decode(self, h, cos, sin, cache_kv, write_at, memory_valid=None):
        """One token per row over the stacked weights (a scan step): the cache is only read; returns (h,
        this token's (k, v)) as `Attention.decode` does."""
        a, kv = self.self_attn.decode(self.input_layernorm(h), cos, sin, cache_kv, write_at, memory_valid)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), kv

    def decode_fused(self, h, pending, cos, sin, cache_kv, write_at, memory_valid, fused):
        """The same over this layer's `fuse_decode_weights` kernels (the state's are placeholders), with
        its own cache updated in place; each residual add is done by the norm after it (decode_norm).
        pending: the previous layer's last product, not yet added to h, as partial sums (None: nothing).
        Returns (h, this layer's last product as partial sums, cache_kv)."""
        impl = self.self_attn.decode_matmul
        h, x = add_and_norm(h, pending, self.input_layernorm, impl, next_weight=fused["qkv"])
        a, cache_kv = self.self_attn.decode(x, cos, sin, cache_kv, write_at, memory_valid, fused["qkv"],
                                            update_cache=True, partials=True)
        h, x = add_and_norm(h, a, self.post_attention_layernorm, impl, next_weight=fused["gate_up"])
        return h, self.mlp.fused(x, fused["gate_up"], partials=True), cache_kv


def _cache(x, sink, extra_slots: int):
    """A layer's prefill cache: (B, T, Hkv, D) keys or values, after the sink's (S, Hkv, D) when given,
    with extra_slots zero positions at the end."""
    if sink is not None:
        x = jnp.concatenate([jnp.broadcast_to(sink.astype(x.dtype), (x.shape[0], *sink.shape)), x], axis=1)
    return jnp.pad(x, [(0, 0), (0, extra_slots), (0, 0), (0, 0)])


_FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def fuse_decode_weights(layer_state):
    """(state, fused) of one layer: fused["qkv"] (dim, Hq + 2 Hkv, D) and fused["gate_up"] (dim, 2, mlp);
    the state's copies of those kernels become zero-size (decoding never reads them)."""
    kernels = {}

    def take(path, x):
        names = [getattr(k, "key", None) for k in path]
        name = next((n for n in names if any(n in parts for parts in _FUSED.values())), None)
        if name is None or "kernel" not in names:
            return x
        kernels[name] = x
        return jnp.zeros((0,), x.dtype)

    state = jax.tree_util.tree_map_with_path(take, layer_state)
    fused = {"qkv": jnp.concatenate([kernels[n] for n in _FUSED["qkv"]], axis=1),
             "gate_up": jnp.stack([kernels[n] for n in _FUSED["gate_up"]], axis=1)}
    return state, fused


def remat_policy(name: str):
    if name == "save_attention_projections":
        return jax.checkpoint_policies.save_only_these_names("attn_proj")
    return getattr(jax.checkpoint_policies, name)


class LayerStack(nnx.Module):
    """`num_layers` Blocks with parameters stacked on a leading `layers` axis."""

    def __init__(self, model_cfg, num_layers: int, first_layer: int, is_memory: bool, *, rngs):
        self.num_layers, self.first_layer, self.is_memory = num_layers, first_layer, is_memory
        self.remat, self.scan = model_cfg.remat, model_cfg.scan_layers

        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(rngs):
            return Block(model_cfg, rngs=rngs)

        self.blocks = make(rngs)

    def __call__(self, h, cos, sin, mask, memory_kv=None, select=None, collect_kv=False):
        """Run the layers. memory_kv: (k, v) each (layers, B, Nm, Hkv, D), per layer of this stack.

        select: None, or a sparsify.Selection, to also return each layer's kept memory tokens
        as (keys, values), each (layers, N, Hkv, top_k, D). collect_kv: also return every layer's stream
        keys (after RoPE) and values, each (layers, B, T, Hkv, D): the KV cache of a prefill.
        """
        graphdef, state = nnx.split(self.blocks)

        def layer(h, xs):
            with jax.named_scope("encode_references" if select is not None else "layer"):  # names in profiles
                return layer_body(h, xs)

        def layer_body(h, xs):
            layer_state, kv = xs
            block = nnx.merge(graphdef, layer_state)
            h, aux = block(h, cos, sin, mask, kv, collect=select is not None or collect_kv)
            if collect_kv:
                return h, (aux[2], aux[3])
            if select is None:
                return h, None
            q_pre, k_pre, k_rot, v = aux
            return h, select_tokens(q_pre, k_pre, k_rot, v, select)

        if self.remat != "none":
            layer = jax.checkpoint(layer, policy=remat_policy(self.remat), prevent_cse=not self.scan)
        xs = (state, memory_kv)
        if self.scan:
            return jax.lax.scan(layer, h, xs)
        outs = []
        for i in range(self.num_layers):
            h, y = layer(h, jax.tree.map(lambda x, i=i: x[i], xs))
            outs.append(y)
        stacked = None if outs[0] is None else jax.tree.map(lambda *ys: jnp.stack(ys), *outs)
        return h, stacked

    def layer_states(self, state=None):
        """Each layer's parameters as separate arrays, for decoding (slicing the stacked parameters inside
        the step makes XLA copy a layer's weights at every generated token), as (state, fused) pairs:
        fused holds q/k/v and gate/up kernels concatenated, so a step reads each once as one wide GEMM
        (narrow k/v GEMMs stream their weights at a fraction of bandwidth), and the state keeps
        zero-size placeholders in their place. state: the stacked parameters (default: this stack's)."""
        state = nnx.state(self.blocks) if state is None else state
        return [fuse_decode_weights(jax.tree.map(lambda x, i=i: x[i], state)) for i in range(self.num_layers)]

    def prefill_fused(self, h, cos, sin, mask, memory_kv, layer_states, extra_slots: int, sink_kv=None):
        """`__call__(collect_kv=True)` as straight-line code over `layer_states()`, as decoding reads them: no
        slice of the stacked weights copied per layer, one product for q/k/v and one for gate/up. Returns
        (h, [(k, v) per layer]), each (B, T + extra_slots, Hkv, D): the caches `decode_fused` updates, with
        extra_slots zero positions at the end (room for decoding and memories).
        sink_kv: None, or per layer the sink's (k, v) each (S, Hkv, D) when h is a stream without the sink
        (`Memory3.sink_kv`): each layer's queries also see them, and its cache starts with them (S + T +
        extra_slots positions)."""
        graphdef, _ = nnx.split(self.blocks)
        cache = []
        for i, (layer_state, fused) in enumerate(layer_states):
            kv = None if memory_kv is None else (memory_kv[0][i], memory_kv[1][i])
            sink = None if sink_kv is None else sink_kv[i]
            with jax.named_scope("layer"):
                h, aux = nnx.merge(graphdef, layer_state)(h, cos, sin, mask, kv, collect=True, fused=fused,
                                                          sink_kv=sink)
            sink_k, sink_v = sink or (None, None)
            cache.append((_cache(aux[2], sink_k, extra_slots), _cache(aux[3], sink_v, extra_slots)))
        return h, cache

    def decode(self, h, cos, sin, cache_kv, write_at, memory_valid=None):
        """One token per row through the layers, scanned over the stacked weights. cache_kv: (k, v) each
        (layers, B, S, Hkv, D); memory_valid: None, or (B, Nm) when the caches' last Nm positions hold
        memories. Returns (h, cache_kv). Layers only read the cache; the new keys and values of all layers
        are written once, after the loop (an update inside it makes XLA copy the stacked cache per layer)."""
        graphdef, state = nnx.split(self.blocks)

        def layer(h, xs):
            layer_state, k, v = xs
            return nnx.merge(graphdef, layer_state).decode(h, cos, sin, (k, v), write_at, memory_valid)

        h, (new_k, new_v) = jax.lax.scan(layer, h, (state, *cache_kv))
        rows = jnp.arange(h.shape[0])
        cache_k = cache_kv[0].at[:, rows, write_at].set(new_k.astype(cache_kv[0].dtype))
        cache_v = cache_kv[1].at[:, rows, write_at].set(new_v.astype(cache_kv[1].dtype))
        return h, (cache_k, cache_v)

    def decode_fused(self, h, pending, cos, sin, cache_kv, write_at, memory_valid, layer_states):
        """The same as straight-line code over `layer_states()` (per-layer weights, fused q/k/v and gate/up
        kernels), with a cache per layer: cache_kv is a list of (k, v) each (B, S, Hkv, D), each updated in
        place. pending, and the result (h, pending, cache_kv): as `Block.decode_fused`."""
        graphdef, _ = nnx.split(self.blocks)
        new_cache = []
        for (layer_state, fused), layer_kv in zip(layer_states, cache_kv):
            block = nnx.merge(graphdef, layer_state)
            h, pending, layer_kv = block.decode_fused(h, pending, cos, sin, layer_kv, write_at, memory_valid, fused)
            new_cache.append(layer_kv)
        return h, pending, new_cache
