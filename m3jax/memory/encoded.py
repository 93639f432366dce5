"""A bank-like view of a knowledge base whose memories are encoded on demand with given weights.

For weights that have no bank yet (e.g. each arm of an experiment): it reads like a `MemoryBank`
(`read(ids, dtype)`, `memory_shape`, `count`), so `CachedBankReader` and `MemorySource` take it as is, and
it returns what a bank written by the same weights would hold (bf16 aside).
"""
from __future__ import annotations

import numpy as np

from m3jax.memory.write import MemoryWriter


class EncodedReferences:
    def __init__(self, model, ref_tokens, ref_lengths, batch_size: int = 64):
        self.ref_tokens, self.ref_lengths = ref_tokens, np.asarray(ref_lengths)
        self.writer = MemoryWriter(model, batch_size)
        m, mem = model.cfg.model, model.cfg.memory
        self.memory_shape = (mem.num_layers, 2, m.num_kv_heads, mem.tokens_per_head, m.head_dim)

    @property
    def count(self) -> int:
        return len(self.ref_lengths)

    def read(self, ids, dtype=np.float32):
        ids = np.asarray(ids, np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.count):
            raise IndexError(f"reference ids must be in [0, {self.count}), got {ids.min()}..{ids.max()}")
        tokens = np.asarray(self.ref_tokens[ids], np.int32)
        memories, valid = self.writer(tokens, self.ref_lengths[ids].astype(np.int32))
        return np.asarray(memories).astype(dtype, copy=False), valid
