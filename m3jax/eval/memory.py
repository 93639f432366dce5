"""What evaluation needs from a memory source, and fitting its output to a padded batch."""
from __future__ import annotations

from typing import Protocol

import jax.numpy as jnp
import numpy as np

from m3jax.model.lm import MemoryInputs


class MemorySource(Protocol):
    """Retrieves memories for each chunk of each row (the chunk's own text is the query) and drops
    references whose overlap with leak_texts[b] exceeds the evaluation threshold
    (`memory.leak_threshold_eval`). `m3jax.generate.memory_source.MemorySource` implements it."""

    def memory_inputs(self, tokens: np.ndarray, lengths: np.ndarray,
                      leak_texts: list[np.ndarray] | None) -> MemoryInputs:
        """tokens: (B, T) int32, right-padded; lengths: (B,) real tokens per row."""
        ...


def pad_memory(memory: MemoryInputs, batch: int) -> MemoryInputs:
    """Grow the batch axis to `batch` with invalid slots (filler rows read no memory)."""
    n = memory.kv.shape[0]
    if n > batch:
        raise ValueError(f"memory for {n} rows does not fit a batch of {batch}")
    if n == batch:
        return memory

    def grow(x, fill):
        x = jnp.asarray(x)
        return jnp.pad(x, [(0, batch - n)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)

    changes = {"kv": grow(memory.kv, 0), "valid": grow(jnp.asarray(memory.valid, bool), False)}
    if getattr(memory, "token_group", None) is not None:  # rows that name their memory groups: filler reads none
        changes["token_group"] = grow(memory.token_group, -1)
    return memory.replace(**changes)
