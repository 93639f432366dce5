"""Log-likelihood of each row's continuation under the model, batched and jitted, optionally with memory.

Rows are sorted by length (longest first, so the first batch shows the peak memory use) and cut into
batches of a fixed size; a batch is right-padded to a bucket length (powers of two from the chunk
length, capped at the longest allowed row), so only a few shapes are ever compiled. Filler rows of the
last batch are fully masked and dropped from the results.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3jax.eval.encode import Row
from m3jax.eval.memory import MemorySource, pad_memory


def bucket_length(length: int, chunk_len: int, max_len: int) -> int:
    """The padded length of a batch whose longest row has `length` tokens."""
    if length > max_len:
        raise ValueError(f"a row of {length} tokens is longer than the maximum {max_len}")
    bucket = chunk_len
    while bucket < length:
        bucket *= 2
    return min(bucket, -(-max_len // chunk_len) * chunk_len)


@jax.jit
def _continuation_logprobs(graphdef, state, tokens, lengths, starts, memory):
    """Per row: sum of log p(token t+1 | tokens <= t) over the continuation, and its greedy match."""
    t = tokens.shape[1]
    mask = jnp.arange(t)[None, :] < lengths[:, None]
    logits = nnx.merge(graphdef, state)(tokens, memory=memory, padding_mask=mask)[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    pos = jnp.arange(t - 1)[None, :]
    scored = (pos >= starts[:, None] - 1) & (pos < lengths[:, None] - 1)  # positions predicting the continuation
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logprob = picked - jax.nn.logsumexp(logits, axis=-1)
    greedy = jnp.all(jnp.where(scored, jnp.argmax(logits, axis=-1) == targets, True), axis=1)
    return jnp.sum(jnp.where(scored, logprob, 0.0), axis=1), greedy


def score_rows(model, rows: list[Row], *, batch_size: int, max_len: int, memory_source: MemorySource | None = None,
               leak_texts: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(log-likelihood sums (N,) float64, greedy (N,) bool) in the order of `rows`.

    With a memory source each row reads the memories retrieved for its own chunks; leak_texts[q] (by
    question index) is handed to the source for the rows of question q.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if memory_source is not None and leak_texts is None:
        raise ValueError("scoring with memory needs the leak texts of the questions")
    chunk_len = model.cfg.memory.chunk_len
    graphdef, state = nnx.split(model)
    order = sorted(range(len(rows)), key=lambda i: -rows[i].length)
    sums, greedy = np.zeros(len(rows)), np.zeros(len(rows), bool)
    for lo in range(0, len(order), batch_size):
        ids = order[lo:lo + batch_size]
        batch = [rows[i] for i in ids]
        t = bucket_length(batch[0].length, chunk_len, max_len)
        tokens = np.zeros((batch_size, t), np.int32)
        lengths, starts = np.zeros(batch_size, np.int32), np.ones(batch_size, np.int32)
        for b, row in enumerate(batch):
            tokens[b, :row.length], lengths[b], starts[b] = row.tokens, row.length, row.start
        memory = None
        if memory_source is not None:
            n = len(batch)
            memory = pad_memory(memory_source.memory_inputs(tokens[:n], lengths[:n],
                                                            [leak_texts[row.question] for row in batch]), batch_size)
        s, g = jax.device_get(_continuation_logprobs(graphdef, state, tokens, lengths, starts, memory))
        sums[ids], greedy[ids] = np.asarray(s[:len(batch)], np.float64), np.asarray(g[:len(batch)])
    return sums, greedy
