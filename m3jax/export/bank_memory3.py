"""Read a memory bank exported by `m3jax export --bank` (safetensors shards + manifest.json) into torch.

Layout of the bank directory:
    manifest.json                  format, count, memory_shape (layers, 2, kv_heads, k, head_dim), dtype,
                                   shard list [{file, start, stop, sha256}], the weights fingerprint
    memories-00000.safetensors     `memories` (n, *memory_shape) and `valid` (n, k) uint8 for references
                                   [start, stop) of that shard

`MemoryBankReader.read(ids)` returns what m3jax's `MemoryBank.read(ids)` returns: memories float32 and
slot validity bool, here as torch tensors. Memories are only valid for the weights that wrote them:
pass `fingerprint=model.config.m3jax_weights_fingerprint` to refuse a bank written by other weights.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import pathlib

import torch
from safetensors import safe_open

FORMAT = "m3jax-memory-bank-safetensors"


class MemoryBankReader:
    def __init__(self, path, fingerprint: str | None = None, verify: bool = False):
        self.path = pathlib.Path(path)
        manifest_file = self.path / "manifest.json"
        if not manifest_file.is_file():
            raise ValueError(f"no exported memory bank at {path} (manifest.json missing)")
        self.manifest = json.loads(manifest_file.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_file} is not an exported m3jax memory bank "
                             f"(format {self.manifest.get('format')!r})")
        if fingerprint is not None and self.manifest.get("fingerprint") != fingerprint:
            raise ValueError(f"the memories in {path} were written by other weights: memories are only valid for "
                             "the weights that wrote them")
        self.shards = self.manifest["shards"]
        self._starts = [s["start"] for s in self.shards]
        if verify:
            for shard in self.shards:
                digest = hashlib.sha256((self.path / shard["file"]).read_bytes()).hexdigest()
                if digest != shard["sha256"]:
                    raise ValueError(f"{self.path / shard['file']} is corrupted (sha256 mismatch)")

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    def read(self, ids):
        """ids: 1-D ints -> (memories (n, *memory_shape) float32, valid (n, k) bool)."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.count):
            raise IndexError(f"reference ids must be in [0, {self.count}), got {ids.min().item()}..{ids.max().item()}")
        shape = tuple(self.manifest["memory_shape"])
        memories = torch.empty((len(ids), *shape), dtype=torch.float32)
        valid = torch.empty((len(ids), shape[3]), dtype=torch.bool)
        shard_of = torch.tensor([bisect.bisect_right(self._starts, int(i)) - 1 for i in ids], dtype=torch.long)
        for s in shard_of.unique().tolist():
            shard, rows = self.shards[s], (shard_of == s).nonzero().flatten()
            local = ids[rows] - shard["start"]
            lo, hi = int(local.min()), int(local.max()) + 1
            with safe_open(str(self.path / shard["file"]), framework="pt") as f:
                memories[rows] = f.get_slice("memories")[lo:hi][local - lo].float()
                valid[rows] = f.get_slice("valid")[lo:hi][local - lo].bool()
        return memories, valid

    def memory_inputs(self, retrieved):
        """retrieved: (B, C, R) reference ids -> (memory_kv, memory_valid) for `Memory3ForCausalLM.forward`."""
        retrieved = torch.as_tensor(retrieved, dtype=torch.long)
        memories, valid = self.read(retrieved.reshape(-1))
        return memories.reshape(*retrieved.shape, *memories.shape[1:]), valid.reshape(*retrieved.shape, -1)


def load_memory_bank(path, fingerprint: str | None = None, verify: bool = False) -> MemoryBankReader:
    return MemoryBankReader(path, fingerprint, verify)
