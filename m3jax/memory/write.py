"""Memory writing: references -> sparse memories, batched, jit-compiled, sharded over local devices (SPEC 3).

`Memory3.encode_references` holds the computation. `MemoryWriter` checks the input on the host, pads
each batch to a fixed size (one compilation for a whole knowledge base), splits the batch over the
local devices (parameters replicated) and returns NumPy arrays.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def check_references(cfg, tokens, lengths):
    """Validate right-padded reference tokens; return them with padding replaced by pad_id."""
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    limit = cfg.memory.reference_len
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"reference tokens must be integers of shape (references, length), got {tokens.dtype} "
                         f"{tokens.shape}")
    if tokens.shape[1] > limit:
        raise ValueError(f"references have {tokens.shape[1]} tokens; memory.reference_len is {limit} "
                         "(split longer text into references first)")
    if lengths.shape != tokens.shape[:1]:
        raise ValueError(f"lengths has shape {lengths.shape}, expected ({tokens.shape[0]},)")
    empty = np.flatnonzero(lengths < 1)
    if len(empty):
        raise ValueError(f"reference {empty[0]} is empty ({len(empty)} empty references): nothing to remember")
    if lengths.max(initial=0) > tokens.shape[1]:
        raise ValueError(f"a length ({lengths.max()}) exceeds the {tokens.shape[1]} token columns")
    real = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    bad = np.argwhere(real & ((tokens < 0) | (tokens >= cfg.model.vocab_size)))
    if len(bad):
        i, j = bad[0]
        raise ValueError(f"reference {i} token {j} = {tokens[i, j]} is outside the vocabulary "
                         f"[0, {cfg.model.vocab_size})")
    # padding is replaced by pad_id so that garbage there can never reach the model
    return np.where(real, tokens, cfg.model.pad_id).astype(np.int32), lengths.astype(np.int32)


class MemoryWriter:
    """Encode batches of references with fixed weights: `writer(tokens, lengths) -> (memories, slot_valid)`."""

    def __init__(self, model, batch_size: int = 64, devices=None):
        self.cfg = model.cfg
        devices = list(devices if devices is not None else jax.local_devices())
        self.batch_size = -(-batch_size // len(devices)) * len(devices)  # a multiple of the device count
        mesh = Mesh(np.array(devices), ("data",))
        self._batch = NamedSharding(mesh, P("data"))
        graphdef, state = nnx.split(model)
        self._state = jax.device_put(state, NamedSharding(mesh, P()))  # replicated
        self._encode = jax.jit(lambda s, t, n: nnx.merge(graphdef, s).encode_references(t, n),
                               out_shardings=(self._batch, self._batch))

    def dispatch(self, tokens, lengths):
        """Start encoding one batch (<= batch_size, already checked) on the devices; returns device arrays."""
        real = len(tokens)
        if real < self.batch_size:  # pad: the same compiled program for every batch
            pad = self.batch_size - real
            tokens = np.concatenate([tokens, np.full((pad, tokens.shape[1]), self.cfg.model.pad_id, np.int32)])
            lengths = np.concatenate([lengths, np.ones(pad, np.int32)])
        mem, valid = self._encode(self._state, jax.device_put(tokens, self._batch), jax.device_put(lengths, self._batch))
        return mem, valid, real

    @staticmethod
    def fetch(dispatched):
        """Wait for a dispatched batch and bring it to the host, without the padding rows."""
        mem, valid, real = dispatched
        return np.asarray(mem)[:real], np.asarray(valid)[:real]

    def __call__(self, tokens, lengths):
        tokens, lengths = check_references(self.cfg, tokens, lengths)
        out = [self.fetch(self.dispatch(tokens[i:i + self.batch_size], lengths[i:i + self.batch_size]))
               for i in range(0, len(tokens), self.batch_size)]
        return np.concatenate([m for m, _ in out]), np.concatenate([v for _, v in out])


def write_memories(model, tokens, lengths, batch_size: int = 64):
    """tokens: (N, L<=reference_len) right-padded ids; lengths: (N,) -> (memories, slot_valid) as NumPy.

    memories: (N, memory_layers, 2, kv_heads, tokens_per_head, head_dim) in the compute dtype.
    """
    return MemoryWriter(model, min(batch_size, max(len(tokens), 1))).__call__(tokens, lengths)
