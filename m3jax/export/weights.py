"""Parameter mapping between m3jax's Memory3 and HF Llama tensor names (both directions).

m3jax keeps the decoder layers stacked per LayerStack segment (leading `layers` axis) and linear kernels
(in..., out...) with head axes; HF keeps one tensor per layer, linear weights (out, in) flattened. So
each kernel maps by `reshape(in, out).T`, and back by `.T.reshape(kernel shape)`. RoPE needs no
permutation: both use the rotate-half layout (m3jax.model.layers.apply_rope, HF's rotate_half).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

# per-layer parameter (path below `blocks`) -> (HF name below `model.layers.{i}.`, input axes of the kernel;
# None: not a kernel, copied as is)
LAYER_PARAMS = {
    ("input_layernorm", "weight"): ("input_layernorm.weight", None),
    ("post_attention_layernorm", "weight"): ("post_attention_layernorm.weight", None),
    ("self_attn", "q_proj", "kernel"): ("self_attn.q_proj.weight", 1),
    ("self_attn", "k_proj", "kernel"): ("self_attn.k_proj.weight", 1),
    ("self_attn", "v_proj", "kernel"): ("self_attn.v_proj.weight", 1),
    ("self_attn", "o_proj", "kernel"): ("self_attn.o_proj.weight", 2),
    ("mlp", "gate_proj", "kernel"): ("mlp.gate_proj.weight", 1),
    ("mlp", "up_proj", "kernel"): ("mlp.up_proj.weight", 1),
    ("mlp", "down_proj", "kernel"): ("mlp.down_proj.weight", 1),
}
TOP_PARAMS = {
    ("embed_tokens",): ("model.embed_tokens.weight", None),
    ("norm", "weight"): ("model.norm.weight", None),
    ("lm_head", "kernel"): ("lm_head.weight", 1),
}


def _to_hf(x: np.ndarray, in_axes) -> np.ndarray:
    if in_axes is None:
        return x
    n_in = math.prod(x.shape[:in_axes])
    return np.ascontiguousarray(x.reshape(n_in, -1).T)


def _hf_shape(shape, in_axes) -> tuple:
    if in_axes is None:
        return tuple(shape)
    return (math.prod(shape[in_axes:]), math.prod(shape[:in_axes]))


def _names(model):
    """(m3jax flat path, layer index within the segment or None, HF name, kernel input axes) of every parameter."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[0] == "layers":
            seg = model.layers[path[1]]
            hf, in_axes = LAYER_PARAMS[tuple(path[3:])]
            for j in range(seg.num_layers):
                yield path, var, j, f"model.layers.{seg.first_layer + j}.{hf}", in_axes
        else:
            hf, in_axes = TOP_PARAMS[tuple(path)]
            yield path, var, None, hf, in_axes


def hf_tensors(model, dtype=None) -> dict:
    """{HF name: NumPy array} of a Memory3's parameters (in `dtype`, default the parameter dtype)."""
    out = {}
    for _, var, j, name, in_axes in _names(model):
        x = np.asarray(var[...])
        x = x if j is None else x[j]
        out[name] = _to_hf(x if dtype is None else x.astype(dtype), in_axes)
    return out


def load_hf_tensors(abstract_model, tensors: dict):
    """Fill an abstract Memory3 (`nnx.eval_shape`) from HF tensors; returns the param state to merge.

    Refuses missing tensors, unexpected tensors and wrong shapes, naming the tensor.
    """
    graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
    used, per_path = set(), {}
    for path, var, j, name, in_axes in _names(abstract_model):
        abstract = var.get_value()  # a ShapeDtypeStruct: the model is abstract
        shape = abstract.shape if j is None else abstract.shape[1:]
        if name not in tensors:
            raise ValueError(f"the HF checkpoint has no tensor {name} (expected shape {_hf_shape(shape, in_axes)})")
        x = np.asarray(tensors[name])
        if x.shape != _hf_shape(shape, in_axes):
            raise ValueError(f"tensor {name} has shape {x.shape}, but this config needs {_hf_shape(shape, in_axes)}")
        used.add(name)
        x = (x if in_axes is None else x.T.reshape(shape)).astype(abstract.dtype)
        per_path.setdefault(path, {})[j] = x
    extra = sorted(n for n in tensors if n not in used and not _ignorable(n, abstract_model))
    if extra:
        raise ValueError(f"the HF checkpoint has {len(extra)} tensors this model does not use, e.g. {extra[0]} "
                         "(not a plain Llama checkpoint, or a config that does not match it)")
    flat = []
    for path, var in nnx.to_flat_state(params):
        parts = per_path[path]
        value = parts[None] if None in parts else np.stack([parts[j] for j in range(len(parts))])
        var.set_value(jnp.asarray(value))
        flat.append((path, var))
    return graphdef, nnx.from_flat_state(flat), rest


def _ignorable(name: str, model) -> bool:
    """Buffers some Llama checkpoints carry, and the LM head of a tied model (it repeats the embedding)."""
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and model.cfg.model.tie_embeddings)
