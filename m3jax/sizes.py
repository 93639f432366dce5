"""Sizes derived from a config: parameter counts, bytes of one memory, sparsity, bank sizes (SPEC 2, 3)."""
from __future__ import annotations

import math
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3jax.config import ConfigError


def parameter_counts(cfg) -> dict:
    """Counted from the model's actual (abstract) parameters, not from a formula."""
    from m3jax.model.lm import Memory3  # local: keep `m3jax.sizes` importable without building a model

    abstract = nnx.eval_shape(lambda: Memory3(cfg, rngs=nnx.Rngs(0)))
    counts = {"embedding": 0, "non_embedding": 0}
    for path, leaf in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        n = int(np.prod(leaf.shape))
        counts["embedding" if path[0] in ("embed_tokens", "lm_head") else "non_embedding"] += n
    counts["total"] = counts["embedding"] + counts["non_embedding"]
    return counts


def memory_numbers_per_reference(cfg) -> int:
    """(memory layers, K/V, KV heads, tokens per head, head dim)."""
    m, mem = cfg.model, cfg.memory
    return mem.num_layers * 2 * m.num_kv_heads * mem.tokens_per_head * m.head_dim


def memory_bytes_per_reference(cfg, dtype="bfloat16") -> int:
    return memory_numbers_per_reference(cfg) * jnp.dtype(dtype).itemsize


def dense_numbers_per_reference(cfg) -> int:
    """Full KV cache of a reference in a model without GQA: every layer, `num_heads` KV heads, every token."""
    m = cfg.model
    return m.num_layers * 2 * m.num_heads * cfg.memory.reference_len * m.head_dim


def sparsity_factor(cfg) -> float:
    return dense_numbers_per_reference(cfg) / memory_numbers_per_reference(cfg)


def vq_code_bytes(factory: str) -> int:
    """Bytes per vector of a FAISS factory string such as `OPQ20x80-Residual2x14-PQ8x10` (`,` or `-`).

    OPQ is a rotation (no bytes); each `Residual{M}x{bits}` or `PQ{M}x{bits}` stage stores M codes of
    `bits` bits, padded to whole bytes per stage, as FAISS does.
    """
    total = 0
    for part in re.split(r"[-,]", factory):
        if re.fullmatch(r"OPQ\d+(_\d+)?(x\d+)?", part):
            continue
        match = re.fullmatch(r"(Residual|PQ)(\d+)(?:x(\d+))?", part)
        if not match:
            raise ConfigError(f"memory.vq_factory {factory!r}: cannot size component {part!r} "
                              "(supported: OPQ, Residual<M>x<bits>, PQ<M>x<bits>)")
        m, bits = int(match.group(2)), int(match.group(3) or 8)
        total += math.ceil(m * bits / 8)
    if total == 0:
        raise ConfigError(f"memory.vq_factory {factory!r} stores no codes")
    return total


def vectors_per_reference(cfg) -> int:
    m, mem = cfg.model, cfg.memory
    return mem.num_layers * 2 * m.num_kv_heads * mem.tokens_per_head


def bank_bytes(cfg, references: int | None = None) -> dict:
    """Bytes of a bank of `references` (default memory.bank_references): dense bf16, sparse bf16, quantized."""
    n = cfg.memory.bank_references if references is None else references
    return {
        "dense": n * dense_numbers_per_reference(cfg) * 2,
        "sparse": n * memory_bytes_per_reference(cfg),
        "quantized": n * vectors_per_reference(cfg) * vq_code_bytes(cfg.memory.vq_factory),
    }


def human_bytes(n: float) -> str:
    """Binary units, three significant figures: 7.17 PiB, 45.9 TiB, 440 KiB."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.3g} {units[i]}"
