"""Memory writing: references -> sparse memories, batched and jit-compiled (SPEC 3).

`Memory3.encode_references` holds the computation; this module is the entry point that checks the
input on the host, pads to a fixed batch (one compilation for the whole knowledge base) and runs it.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, tokens, lengths):
    return nnx.merge(graphdef, state).encode_references(tokens, lengths)


def check_references(cfg, tokens, lengths):
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    limit = cfg.memory.reference_len
    if tokens.ndim != 2:
        raise ValueError(f"reference tokens must have shape (references, length), got {tokens.shape}")
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


def write_memories(model, tokens, lengths, batch_size: int = 64):
    """tokens: (N, L<=reference_len) right-padded ids; lengths: (N,) -> (memories, slot_valid) as NumPy.

    memories: (N, memory_layers, 2, kv_heads, tokens_per_head, head_dim) in the compute dtype.
    """
    tokens, lengths = check_references(model.cfg, tokens, lengths)
    graphdef, state = nnx.split(model)
    n = len(tokens)
    mems, valids = [], []
    for start in range(0, n, batch_size):
        t, l = tokens[start:start + batch_size], lengths[start:start + batch_size]
        pad = batch_size - len(t) if n > batch_size else 0  # fixed shape: one compilation
        if pad:
            t = np.concatenate([t, np.full((pad, t.shape[1]), model.cfg.model.pad_id, np.int32)])
            l = np.concatenate([l, np.ones(pad, np.int32)])
        mem, valid = _encode(graphdef, state, t, l)
        mems.append(np.asarray(mem)[:len(mem) - pad])
        valids.append(np.asarray(valid)[:len(valid) - pad])
    return np.concatenate(mems), np.concatenate(valids)
