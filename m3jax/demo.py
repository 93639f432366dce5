"""The end of `make demo`: held-out loss with and without memory, for the stage-1 and stage-2 weights.

- stage 1 (warmup, never trained with memory): memories come from the bank that the stage-1 weights
  wrote for the knowledge base (`m3jax memory build`), one retrieved reference per chunk;
- stage 2 (continual train with memory): the same references encoded by the stage-2 weights, as in
  its training step (a bank written by stage-1 weights is not valid for them, Remark 9).
Each chunk reads the memories of chunks c-4..c (the stage-2 layout).
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from m3jax.checkpoint import load_model
from m3jax.data.loader import gather_references
from m3jax.data.prepare import open_prepared
from m3jax.eval.heldout import sequence_loss
from m3jax.memory.bank import MemoryBank
from m3jax.memory.cache import CachedBankReader
from m3jax.memory.fingerprint import weights_fingerprint
from m3jax.train.loss import lm_loss
from m3jax.train.step import batch_memory


@functools.partial(jax.jit, static_argnums=5)
def loss_encoding_references(graphdef, state, tokens, ref_tokens, ref_lengths, window):
    """(sum of losses, token count) with each chunk's reference encoded by these weights (stage 2's layout)."""
    model = nnx.merge(graphdef, state)
    memory = batch_memory(model, ref_tokens, ref_lengths, window, grad_through=False)
    return lm_loss(model(tokens, memory=memory), tokens)


def heldout_batches(arrays, batch: int, limit: int):
    """Whole batches of the first `limit` held-out rows: (tokens, reference ids, reference tokens, lengths)."""
    n = min(limit, len(arrays["heldout_tokens"]))
    ref_tokens, ref_lengths = np.asarray(arrays["ref_tokens"]), np.asarray(arrays["ref_lengths"])
    for lo in range(0, n - batch + 1, batch):
        ids = np.asarray(arrays["heldout_ref_ids"][lo:lo + batch])
        yield (np.asarray(arrays["heldout_tokens"][lo:lo + batch]).astype(np.int32), ids,
               *gather_references(ref_tokens, ref_lengths, ids))


def heldout_losses(cfg, data_dir, stage1, stage2, bank_path, batch: int = 16, limit: int = 256) -> dict:
    _, arrays = open_prepared(data_dir)
    window = cfg.memory.train_window
    batch = max(1, min(batch, len(arrays["heldout_tokens"])))
    m1, m2 = load_model(cfg, stage1), load_model(cfg, stage2)
    bank = MemoryBank.open(bank_path, fingerprint=weights_fingerprint(m1), cfg=cfg)
    reader = CachedBankReader(bank)
    (g1, s1), (g2, s2) = nnx.split(m1), nnx.split(m2)
    sums = np.zeros((4, 2))
    for tokens, ids, ref_tokens, ref_lengths in heldout_batches(arrays, batch, limit):
        memory = reader.memory_inputs(ids[..., None], window)
        for row, value in enumerate([sequence_loss(g1, s1, tokens, None), sequence_loss(g1, s1, tokens, memory),
                                     sequence_loss(g2, s2, tokens, None),
                                     loss_encoding_references(g2, s2, tokens, ref_tokens, ref_lengths, window)]):
            sums[row] += np.asarray(jax.device_get(value), np.float64)
    if not sums[0, 1]:
        raise ValueError(f"{data_dir} has no held-out sequences")
    losses = sums[:, 0] / sums[:, 1]
    names = ("stage1_without_memory", "stage1_with_memory", "stage2_without_memory", "stage2_with_memory")
    return {**dict(zip(names, map(float, losses))), "tokens": int(sums[0, 1]),
            "chunks_with_reference": float((np.asarray(arrays["heldout_ref_ids"]) >= 0).mean())}


def print_report(result: dict) -> None:
    print(f"held-out loss over {result['tokens']:,} tokens ({result['chunks_with_reference']:.0%} of chunks retrieved a "
          "reference):")
    print(f"  stage 1 (warmup) weights:    {result['stage1_without_memory']:.4f} without memory, "
          f"{result['stage1_with_memory']:.4f} with memory from the bank")
    print(f"  stage 2 (continual) weights: {result['stage2_without_memory']:.4f} without memory, "
          f"{result['stage2_with_memory']:.4f} with memory")
