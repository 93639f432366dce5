"""m3jax config <-> HF `config.json` (LlamaConfig fields plus `m3jax_*` keys).

vocab_size: the HF config gets the *padded* embedding rows (padded_vocab_size), so the tensors keep
their shapes and the mapping is lossless; rows >= `m3jax_vocab_size` (the real vocabulary) are padding
that no token id reaches. Logits over the real vocabulary match; compare `logits[..., :m3jax_vocab_size]`.

The sink: Memory3 reads `<s>Reference:` + `<s>` (`m3jax_sink_ids`) at RoPE positions
`m3jax_sink_positions` before every context, whose tokens then sit at positions
sink_positions[-1] + 1 + t. A plain LlamaForCausalLM computes the same logits when fed
`input_ids = sink_ids + tokens`, `position_ids` as above, and an explicit all-ones `attention_mask`
(without it, transformers reads the position jump as the start of a packed sequence and hides the sink).
"""
from __future__ import annotations

import json

import ml_collections

from m3jax import config as config_lib

AUTO_MAP = {"AutoConfig": "configuration_memory3.Memory3Config",
            "AutoModelForCausalLM": "modeling_memory3.Memory3ForCausalLM"}
EOS_ID = 2  # m3jax's tokenizer: pad 0, <s> 1, </s> 2 (m3jax/data/tokenizer.py)


def sink_positions(cfg) -> list:
    p, r = len(cfg.memory.reference_prefix_ids), cfg.memory.reference_len
    return list(range(p)) + [p + r]


def hf_config(cfg, *, fingerprint: str, dtype: str) -> dict:
    m, mem = cfg.model, cfg.memory
    layers = config_lib.memory_layer_range(cfg)
    sink = list(mem.reference_prefix_ids) + [m.bos_id]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "auto_map": AUTO_MAP,
        "vocab_size": config_lib.padded_vocab_size(m), "hidden_size": m.hidden_size,
        "intermediate_size": m.mlp_dim, "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim, "hidden_act": "silu",
        "max_position_embeddings": sink_positions(cfg)[-1] + 1 + cfg.data.seq_len,
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1,
        "initializer_range": m.init_std, "tie_word_embeddings": bool(m.tie_embeddings),
        "bos_token_id": m.bos_id, "eos_token_id": EOS_ID, "pad_token_id": m.pad_id,
        "torch_dtype": dtype, "dtype": dtype, "use_cache": False,
        "m3jax_vocab_size": m.vocab_size, "m3jax_sink_ids": sink, "m3jax_sink_positions": sink_positions(cfg),
        "m3jax_memory_layers": [layers.start, layers.stop], "m3jax_chunk_len": mem.chunk_len,
        "m3jax_reference_prefix_ids": list(mem.reference_prefix_ids), "m3jax_reference_len": mem.reference_len,
        "m3jax_tokens_per_head": mem.tokens_per_head, "m3jax_head_combine": mem.head_combine,
        "m3jax_weights_fingerprint": fingerprint, "m3jax_config": json.loads(config_lib.to_json(cfg)),
    }


def check_compatible(hf: dict) -> None:
    """Refuse HF configs whose model m3jax cannot represent, naming the field."""
    if hf.get("model_type") not in ("llama", None) and "LlamaForCausalLM" not in hf.get("architectures", []):
        raise ValueError(f"HF config has model_type {hf.get('model_type')!r}; only Llama checkpoints can be imported")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"HF config has {key}=true; m3jax's Llama layers have no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"HF config has hidden_act={hf['hidden_act']!r}; m3jax's MLP is SiLU-gated")
    rope = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if hf.get("rope_scaling") or rope_type != "default":
        raise ValueError(f"HF config uses RoPE scaling ({hf.get('rope_scaling') or rope_type}); m3jax supports "
                         "plain RoPE only")
    if hf.get("pretraining_tp", 1) not in (1, None):
        raise ValueError(f"HF config has pretraining_tp={hf['pretraining_tp']}; only 1 is supported")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(key), int):
            raise ValueError(f"HF config lacks the integer field {key}")


def _set(node, values: dict, base) -> None:
    """Write a JSON dict into a ConfigDict, restoring tuples where the base config has tuples."""
    for key, value in values.items():
        old = base.get(key) if base is not None else None
        if isinstance(value, dict):
            if key not in node:
                node[key] = ml_collections.ConfigDict()
            _set(node[key], value, old)
        else:
            is_list = isinstance(value, list)
            node[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value) if is_list else value


def config_from_dict(values: dict) -> ml_collections.ConfigDict:
    cfg = config_lib.base_config()
    _set(cfg, values, cfg)
    return cfg


def config_from_hf(hf: dict, name: str = "imported") -> ml_collections.ConfigDict:
    """An m3jax config for an HF Llama config: model fields from the HF fields; memory, data and train fields
    from `m3jax_config` when the checkpoint came from m3jax, else the paper's defaults with the reference
    prefix reduced to `<s>` (a foreign vocabulary has no `Reference:` token), memory layers the first half,
    and the compute dtype of the checkpoint's `dtype`."""
    check_compatible(hf)
    cfg = config_from_dict(hf["m3jax_config"]) if isinstance(hf.get("m3jax_config"), dict) else config_lib.base_config()
    if "m3jax_config" not in hf:
        cfg.name = name
    m = cfg.model
    rows = hf["vocab_size"]
    m.vocab_size = int(hf.get("m3jax_vocab_size") or rows)
    if "m3jax_config" not in hf:
        m.vocab_multiple = 1
    if config_lib.padded_vocab_size(m) != rows:
        raise ValueError(f"HF vocab_size {rows} is not the padded size of m3jax_vocab_size {m.vocab_size} "
                         f"(multiple {m.vocab_multiple})")
    m.hidden_size, m.mlp_dim = hf["hidden_size"], hf["intermediate_size"]
    m.num_layers, m.num_heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    m.num_kv_heads = hf.get("num_key_value_heads") or m.num_heads
    m.head_dim = hf.get("head_dim") or m.hidden_size // m.num_heads
    m.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
    m.rope_theta = float((hf.get("rope_parameters") or {}).get("rope_theta") or hf.get("rope_theta", 10000.0))
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    m.init_std = float(hf.get("initializer_range", m.init_std))
    if "m3jax_config" not in hf:
        m.bos_id = hf.get("bos_token_id") if isinstance(hf.get("bos_token_id"), int) else 1
        m.pad_id = hf.get("pad_token_id") if isinstance(hf.get("pad_token_id"), int) else 0
        dtype = hf.get("dtype") or hf.get("torch_dtype")
        if dtype in config_lib.DTYPES:  # compute as the checkpoint was saved; parameters stay float32
            m.dtype = dtype
        mem = cfg.memory
        mem.reference_prefix_ids = (m.bos_id,)
        mem.layer_start, mem.num_layers = 0, m.num_layers // 2  # the paper's choice: the first half
        if m.head_dim != 80:  # the default quantizer rotates 80-dim vectors; rescale it to head_dim
            mem.vq_factory = f"OPQ{max(1, m.head_dim // 4)}x{m.head_dim}-Residual2x14-PQ8x10"
    try:
        return config_lib.validate(cfg)
    except config_lib.ConfigError as e:
        raise ValueError(f"the HF config gives an m3jax config that does not validate: {e}") from None
