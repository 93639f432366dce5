"""Next-token loss on the prepared held-out sequences, with and without memory.

With a memory source each sequence is its own leak text: a reference that gives away the sequence
(overlap above the evaluation threshold) is dropped, as at evaluation in the paper.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from m3jax.eval.memory import MemorySource, pad_memory
from m3jax.train.loss import lm_loss


@jax.jit
def sequence_loss(graphdef, state, tokens, memory=None, padding_mask=None):
    """(sum of next-token losses, token count) of a batch; padding_mask marks real tokens (right padding)."""
    logits = nnx.merge(graphdef, state)(tokens, memory=memory, padding_mask=padding_mask)
    return lm_loss(logits, tokens, padding_mask)


def heldout_loss(model, sequences: np.ndarray, *, batch_size: int, limit: int | None = None,
                 memory_source: MemorySource | None = None) -> dict:
    """{loss, tokens, sequences} over the first `limit` rows of `sequences` (N, T)."""
    n = len(sequences) if limit is None else min(limit, len(sequences))
    if n == 0:
        raise ValueError("there are no held-out sequences to evaluate")
    graphdef, state = nnx.split(model)
    total, count = 0.0, 0.0
    for lo in range(0, n, batch_size):
        real = np.asarray(sequences[lo:min(lo + batch_size, n)], np.int32)
        tokens = np.zeros((batch_size, real.shape[1]), np.int32)
        tokens[:len(real)] = real
        mask = np.arange(batch_size)[:, None] < len(real)
        mask = np.broadcast_to(mask, tokens.shape)  # a filler row of the last batch is all padding
        memory = None
        if memory_source is not None:
            lengths = np.full(len(real), real.shape[1], np.int32)
            memory = pad_memory(memory_source.memory_inputs(real, lengths, list(real)), batch_size)
        s, c = jax.device_get(sequence_loss(graphdef, state, tokens, memory, mask))
        total, count = total + float(s), count + float(c)
    return {"loss": total / count, "tokens": int(count), "sequences": n}
