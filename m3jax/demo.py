"""What runs end to end today, with random weights: write memories, read them, show that memory
enters only through the memory layers. Training on real data replaces this in the training issue."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3jax import sizes
from m3jax.config import memory_layer_range
from m3jax.memory.write import write_memories
from m3jax.model.lm import Memory3, MemoryInputs


@jax.jit
def _forward(graphdef, state, tokens, memory):
    return nnx.merge(graphdef, state)(tokens, memory=memory)


def run_demo(cfg, seed: int = 0, batch: int = 2, num_references: int = 64) -> dict:
    m, mem = cfg.model, cfg.memory
    rng = np.random.default_rng(seed)
    print("m3jax demo: random weights (no training, data or retrieval yet: those land with later issues).")
    model = Memory3(cfg, rngs=nnx.Rngs(seed))
    counts = sizes.parameter_counts(cfg)
    layers = memory_layer_range(cfg)
    print(f"model {cfg.name}: {counts['total']:,} parameters, memory layers {layers.start}..{layers.stop - 1}")

    lengths = rng.integers(mem.tokens_per_head, mem.reference_len + 1, num_references)
    refs = rng.integers(4, m.vocab_size, (num_references, mem.reference_len))
    start = time.perf_counter()
    memories, valid = write_memories(model, refs, lengths, batch_size=32)
    print(f"wrote {num_references} memories of shape {memories.shape[1:]} in {time.perf_counter() - start:.1f}s "
          f"(compile included); {sizes.memory_bytes_per_reference(cfg):,} bytes each in bf16")

    chunks = cfg.data.seq_len // mem.chunk_len
    tokens = rng.integers(4, m.vocab_size, (batch, cfg.data.seq_len))
    ids = rng.integers(0, num_references, (batch, chunks, mem.refs_per_chunk))  # stand-in for retrieval
    memory = MemoryInputs(jnp.asarray(memories[ids]), jnp.asarray(valid[ids]))
    graphdef, state = nnx.split(model)
    plain = _forward(graphdef, state, tokens, None)
    with_memory = _forward(graphdef, state, tokens, memory)
    no_memory = MemoryInputs(memory.kv, jnp.zeros_like(memory.valid))
    masked = _forward(graphdef, state, tokens, no_memory)
    shift = float(jnp.abs(with_memory - plain).mean())
    off = float(jnp.abs(masked - plain).max())
    print(f"forward of {batch} x {cfg.data.seq_len} tokens ({chunks} chunks x {mem.refs_per_chunk} memories): "
          f"mean |logit change| from memory {shift:.4f}; with every memory masked out {off:.2e}")
    return {"logit_shift": shift, "masked_difference": off}
