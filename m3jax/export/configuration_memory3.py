"""Memory3Config: a LlamaConfig plus the fields Memory3 needs to place the sink and read memories.

Copied by `m3jax export` next to `modeling_memory3.py`; it imports nothing from m3jax. The exported
config.json keeps `model_type: llama`, so plain `LlamaForCausalLM` loads the same directory; the
`m3jax_*` keys below are extra keys that plain Llama ignores. Class attributes are the defaults of the
paper's layout (SPEC 2-4) and stand in for keys a config.json lacks.
"""
from transformers import LlamaConfig


class Memory3Config(LlamaConfig):
    model_type = "llama"

    # Rows >= m3jax_vocab_size of the embedding / LM head are padding (never a target).
    m3jax_vocab_size = None
    # Memory layers are [start, stop) of the stack.
    m3jax_memory_layers = (0, 0)
    m3jax_chunk_len = 64
    # `<s>Reference:`: starts every reference, and (followed by `<s>`) every context: the attention sink.
    m3jax_reference_prefix_ids = (1, 4)
    m3jax_reference_len = 128  # memories share the positions [len(prefix), len(prefix) + reference_len)
    m3jax_tokens_per_head = 8
    m3jax_head_combine = "sum"
    m3jax_sink_ids = (1, 4, 1)
    m3jax_sink_positions = (0, 1, 130)

    @property
    def memory_layer_range(self) -> range:
        start, stop = self.m3jax_memory_layers
        return range(int(start), int(stop))
