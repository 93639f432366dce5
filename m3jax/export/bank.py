"""Export a memory bank (zarr v3 via tensorstore) to safetensors shards that PyTorch reads.

The format and its reader are in bank_memory3.py (copied into every export that has a bank). Memories
of a bf16 bank are stored in bf16 (exact); int8 and vq banks are stored decoded, in float32, so a reader
gets exactly what `MemoryBank.read` returns either way.
"""
from __future__ import annotations

import hashlib
import json
import pathlib

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from m3jax.memory.bank import MemoryBank

FORMAT = "m3jax-memory-bank-safetensors"  # the same string as bank_memory3.FORMAT (that file imports torch)


def export_bank(bank_path: str, out_dir, *, fingerprint: str | None = None, shard_refs: int = 1024) -> dict:
    """Write `bank_path`'s committed references into `out_dir` (an existing empty folder); return the manifest.

    With `fingerprint`, refuse a bank written by other weights (its memories would be meaningless).
    """
    if shard_refs < 1:
        raise ValueError(f"shard_refs must be positive, got {shard_refs}")
    bank = MemoryBank.open(bank_path, fingerprint=fingerprint)
    exact_bf16 = bank.manifest["compression"] == "bf16"
    dtype = ml_dtypes.bfloat16 if exact_bf16 else np.float32
    out_dir = pathlib.Path(out_dir)
    shards = []
    for i, start in enumerate(range(0, bank.count, shard_refs)):
        stop = min(start + shard_refs, bank.count)
        memories, valid = bank.read(np.arange(start, stop))
        name = f"memories-{i:05d}.safetensors"
        save_file({"memories": np.ascontiguousarray(memories.astype(dtype)), "valid": valid.astype(np.uint8)},
                  str(out_dir / name))
        shards.append({"file": name, "start": start, "stop": stop,
                       "sha256": hashlib.sha256((out_dir / name).read_bytes()).hexdigest()})
    manifest = {"format": FORMAT, "version": 1, "count": bank.count, "memory_shape": list(bank.memory_shape),
                "dtype": "bfloat16" if exact_bf16 else "float32", "source_compression": bank.manifest["compression"],
                "fingerprint": bank.manifest["fingerprint"], "tokenizer": bank.manifest.get("tokenizer"),
                "shards": shards}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
