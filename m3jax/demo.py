"""What runs end to end today on the default data, with random weights (training lands with the
training issue): prepared data -> memory bank of the knowledge base -> held-out loss with and without
the memories each chunk retrieved. With random weights the two losses are close to log(vocab); the
point is that every piece runs on real data."""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3jax.checkpoint import load_model
from m3jax.data.prepare import open_prepared
from m3jax.memory.build import build_bank
from m3jax.memory.cache import NO_REFERENCE, CachedBankReader
from m3jax.train.loss import lm_loss


def _loss(graphdef, state, tokens, memory):
    total, count = lm_loss(nnx.merge(graphdef, state)(tokens, memory=memory), tokens)
    return total / count


_loss_jit = jax.jit(_loss)


def run_demo(cfg, data_dir, bank_path, checkpoint: str = "random", sequences: int = 8) -> dict:
    meta, arrays = open_prepared(data_dir)
    if meta["seq_len"] != cfg.data.seq_len or meta["chunk_len"] != cfg.memory.chunk_len:
        raise ValueError(f"{data_dir} was prepared for sequences of {meta['seq_len']} / chunks of {meta['chunk_len']}, "
                         f"config {cfg.name} has {cfg.data.seq_len} / {cfg.memory.chunk_len}")
    print(f"m3jax demo: {checkpoint} weights on the prepared data in {data_dir} (training: not yet)")
    model = load_model(cfg, checkpoint)
    bank, stats = build_bank(model, np.asarray(arrays["ref_tokens"]), np.asarray(arrays["ref_lengths"]),
                             str(bank_path), batch_size=256)
    print(f"memory bank {bank_path}: {bank.count:,} references ({stats['written']:,} written now)")
    n = min(sequences, len(arrays["heldout_tokens"]))
    tokens = jnp.asarray(np.asarray(arrays["heldout_tokens"][:n]).astype(np.int32))
    ids = np.asarray(arrays["heldout_ref_ids"][:n])[..., None]  # (B, C, 1): stage-2 layout, one per chunk
    memory = CachedBankReader(bank).memory_inputs(ids, window=cfg.memory.train_window)
    graphdef, state = nnx.split(model)
    with_memory = float(_loss_jit(graphdef, state, tokens, jax.device_put(memory)))
    without = float(_loss_jit(graphdef, state, tokens, None))
    found = float((ids != NO_REFERENCE).mean())
    print(f"held-out loss over {n} sequences of {tokens.shape[1]} tokens: {without:.4f} without memory, "
          f"{with_memory:.4f} with memory ({found:.0%} of chunks retrieved a reference); log(vocab) = "
          f"{np.log(meta['vocab_size']):.4f}")
    return {"loss_without_memory": without, "loss_with_memory": with_memory,
            "bank": str(pathlib.Path(bank_path)), "references": bank.count}
