"""PyTorch / Hugging Face export and import of Memory3.

- `hf_export.export_model(model, out, bank=...)` (`m3jax export`): an HF Llama directory that
  `transformers.LlamaForCausalLM.from_pretrained(out)` loads, plus `modeling_memory3.py` for
  `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`, which reads memories;
- `bank.export_bank` (`--bank`): a memory bank as safetensors shards, read by `bank_memory3.load_memory_bank`;
- `hf_import.import_hf(hf_dir, out)` (`m3jax import`): any plain HF Llama checkpoint -> m3jax config + weights.

What "the same model" means without memory: Memory3 always prepends the attention sink
`<s>Reference:` `<s>` (config.json `m3jax_sink_ids`) at RoPE positions `m3jax_sink_positions`
(0, 1, then 2 + reference_len: the memory interval lies in between), and context token t sits at
position m3jax_sink_positions[-1] + 1 + t. A plain LlamaForCausalLM given
`input_ids = sink_ids + tokens`, those `position_ids` and an explicit all-ones `attention_mask` returns,
at the context positions, Memory3's logits (without the mask, transformers takes the position jump for
a packed-sequence boundary and hides the sink). `Memory3ForCausalLM` adds the sink itself.

vocab_size in config.json is the padded row count of the embedding (lossless mapping); the real
vocabulary is `m3jax_vocab_size` and rows past it are padding no token reaches.
"""
