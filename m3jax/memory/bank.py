"""The memory bank: written memories on a zarr v3 array store (tensorstore), local disk or a bucket.

Layout under the bank path:
    manifest.json           model config, weights fingerprint, tokenizer, compression, committed count
    <field>/                one zarr array per stored field (`memories`, or `codes` + `scales`), row i =
                            reference i; shards of `shard_refs` references, one inner chunk per reference
                            with a crc32c checksum, so any single reference is read alone and a flipped
                            byte is detected on read
    slots/                  valid memory slots per reference (>= 1 for every written reference)
    token_hashes/           8-byte hash of each reference's tokens: resuming checks the input is the same
    vq_keys.faiss, vq_values.faiss   trained quantizers (vq mode)

Writes commit in order: data first, then the manifest's `count` (an atomic replace). A build killed
at any point leaves rows past `count` uncommitted; the next run overwrites them. Opening checks the
manifest's own checksum and that every shard below `count` exists; reads check crc32c and refuse rows
whose slot count is missing.
"""
from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import tensorstore as ts

from m3jax.memory.compression import VQCodec, make_codec

FORMAT, VERSION = "m3jax-memory-bank", 1
MAX_REFS = 2 ** 40  # zarr shape; unwritten shards cost nothing


class BankError(RuntimeError):
    """A bank that cannot be used as asked; the message says why."""


class BankCorruptError(BankError):
    pass


class BankMismatchError(BankError):
    pass


def _kvstore_spec(path: str) -> dict:
    if path.startswith("gs://"):
        bucket, _, prefix = path[5:].partition("/")
        return {"driver": "gcs", "bucket": bucket, "path": prefix.rstrip("/") + "/"}
    return {"driver": "file", "path": path.rstrip("/") + "/"}


def _array_spec(kv: dict, name: str, shape, dtype, shard_refs: int, create: bool) -> dict:
    spec = {"driver": "zarr3", "kvstore": {**kv, "path": kv["path"] + name + "/"}}
    if not create:
        return spec
    rest = [int(s) for s in shape]
    inner = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    fill = float("nan") if np.issubdtype(dtype, np.floating) or dtype.__name__ == "bfloat16" else 0
    spec["metadata"] = {
        "shape": [MAX_REFS, *rest], "data_type": np.dtype(dtype).name, "fill_value": fill,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_refs, *rest]}},
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [1, *rest], "codecs": inner, "index_codecs": inner}}]}
    spec["create"] = True
    return spec


def reference_hashes(tokens, lengths) -> np.ndarray:
    """(N, 8) uint8: the first 8 bytes of sha256 of each reference's real tokens (int32 little endian)."""
    out = np.empty((len(tokens), 8), np.uint8)
    for i, (row, n) in enumerate(zip(np.asarray(tokens), np.asarray(lengths))):
        out[i] = np.frombuffer(hashlib.sha256(row[:n].astype("<i4").tobytes()).digest()[:8], np.uint8)
    return out


def _seal(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    text = json.dumps(body, sort_keys=True)
    return json.dumps({**body, "sha256": hashlib.sha256(text.encode()).hexdigest()}, sort_keys=True, indent=1).encode()


class MemoryBank:
    def __init__(self, path: str, manifest: dict, codec, kv: dict):
        self.path, self.manifest, self.codec, self._kv = path, manifest, codec, kv
        self._store = ts.KvStore.open(kv).result()
        shard = manifest["shard_refs"]
        fields = {**codec.fields(), "slots": ((), np.uint8), "token_hashes": ((8,), np.uint8)}
        self._arrays = {name: ts.open(_array_spec(kv, name, shape, dtype, shard, False)).result()
                        for name, (shape, dtype) in fields.items()}

    # ---- opening ------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str, cfg, *, fingerprint: str, compression: str = "bf16", tokenizer: str | None = None,
               shard_refs: int = 1024, codec=None) -> "MemoryBank":
        kv = _kvstore_spec(path)
        store = ts.KvStore.open(kv).result()
        if store.read("manifest.json").result().state == "value":
            raise BankError(f"{path} already holds a memory bank; open it to append, or choose a new path")
        m, mem = cfg.model, cfg.memory
        shape = (mem.num_layers, 2, m.num_kv_heads, mem.tokens_per_head, m.head_dim)
        codec = codec or make_codec(compression, shape, mem.vq_factory)
        if isinstance(codec, VQCodec):
            for name, blob in zip(("vq_keys.faiss", "vq_values.faiss"), codec.serialize()):
                store.write(name, blob).result()
        fields = {**codec.fields(), "slots": ((), np.uint8), "token_hashes": ((8,), np.uint8)}
        for name, (shp, dtype) in fields.items():
            ts.open(_array_spec(kv, name, shp, dtype, shard_refs, True)).result()
        manifest = {
            "format": FORMAT, "version": VERSION, "count": 0, "shard_refs": shard_refs,
            "memory_shape": list(shape), "compression": codec.mode, "vq_factory": mem.vq_factory,
            "bytes_per_reference": codec.bytes_per_reference(), "fingerprint": fingerprint,
            "tokenizer": tokenizer, "model": cfg.model.to_dict(), "memory": cfg.memory.to_dict(),
            "checksums": "crc32c per reference (zarr codec); sha256 of this manifest",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if isinstance(codec, VQCodec):
            manifest["vq_sha256"] = [hashlib.sha256(b).hexdigest() for b in codec.serialize()]
        store.write("manifest.json", _seal(manifest)).result()
        return cls(path, manifest, codec, kv)

    @classmethod
    def open(cls, path: str, *, fingerprint: str | None = None, cfg=None) -> "MemoryBank":
        """Open a bank; with `fingerprint`, refuse it unless those weights wrote it."""
        kv = _kvstore_spec(path)
        store = ts.KvStore.open(kv).result()
        raw = store.read("manifest.json").result()
        if raw.state != "value":
            raise BankError(f"no memory bank at {path} (manifest.json missing)")
        try:
            manifest = json.loads(bytes(raw.value))
            body = {k: v for k, v in manifest.items() if k != "sha256"}
            sealed = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        except (ValueError, UnicodeDecodeError) as e:
            raise BankCorruptError(f"{path}/manifest.json is not valid JSON: {e}") from None
        if manifest.get("format") != FORMAT or manifest.get("sha256") != sealed:
            raise BankCorruptError(f"{path}/manifest.json is corrupted (checksum mismatch)")
        if fingerprint is not None and manifest["fingerprint"] != fingerprint:
            raise BankMismatchError(
                f"the memories in {path} were written by other weights (bank {manifest['fingerprint'][:19]}..., "
                f"model {fingerprint[:19]}...): memories are only valid for the weights that wrote them; "
                "rebuild the bank with these weights")
        shape = tuple(manifest["memory_shape"])
        if cfg is not None:
            want = (cfg.memory.num_layers, 2, cfg.model.num_kv_heads, cfg.memory.tokens_per_head, cfg.model.head_dim)
            if shape != want:
                raise BankMismatchError(f"bank memories have shape {shape}, this config writes {want}")
        if manifest["compression"] == "vq":
            blobs = [bytes(store.read(n).result().value) for n in ("vq_keys.faiss", "vq_values.faiss")]
            if [hashlib.sha256(b).hexdigest() for b in blobs] != manifest["vq_sha256"]:
                raise BankCorruptError(f"the vector quantizers in {path} do not match the manifest")
            codec = VQCodec.deserialize(shape, manifest["vq_factory"], blobs)
        else:
            codec = make_codec(manifest["compression"], shape)
        bank = cls(path, manifest, codec, kv)
        bank._check_shards()
        return bank

    def _check_shards(self) -> None:
        """Every shard of every field below `count` must exist: a missing one would read as fill values."""
        shards = -(-self.count // self.manifest["shard_refs"])
        for name, array in self._arrays.items():
            present = {k.decode() for k in self._store.list(ts.KvStore.KeyRange(f"{name}/c/", f"{name}/c0")).result()}
            for i in range(shards):
                key = f"{name}/c/" + "/".join([str(i)] + ["0"] * (array.rank - 1))
                if key not in present:
                    raise BankCorruptError(f"{self.path}: shard {i} of '{name}' is missing (references "
                                           f"{i * self.manifest['shard_refs']}.. are lost); the bank is truncated")

    # ---- state --------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def memory_shape(self) -> tuple:
        return tuple(self.manifest["memory_shape"])

    # ---- writing ------------------------------------------------------------------------------
    def append(self, start: int, memories, slots, token_hashes) -> None:
        """Write references [start, start + n) and commit them. `start` must be the current count."""
        pending = self.write(start, memories, slots, token_hashes)
        pending.wait()
        pending.commit()

    def write(self, start: int, memories, slots, token_hashes) -> "PendingAppend":
        """Start writing references [start, start + n); they count once the returned append commits."""
        n = len(memories)
        if start != self.count:
            raise BankError(f"append at {start}, but the bank holds {self.count} references: rows must be "
                            "written in order, without holes")
        if memories.shape[1:] != self.memory_shape or len(slots) != n or len(token_hashes) != n:
            raise BankError(f"memories {memories.shape}, slots {np.shape(slots)}, hashes {np.shape(token_hashes)} do "
                            f"not fit the bank's (n, {self.memory_shape}) rows")
        if np.min(slots, initial=1) < 1:
            raise BankError("every reference needs at least one valid memory slot")
        encoded = {**self.codec.encode(memories), "slots": np.asarray(slots, np.uint8),
                   "token_hashes": np.asarray(token_hashes, np.uint8)}
        rows = slice(start, start + n)
        return PendingAppend(self, start + n, [self._arrays[k][rows].write(v) for k, v in encoded.items()])

    def _commit(self, count: int) -> None:
        self.manifest["count"] = count
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._store.write("manifest.json", _seal(self.manifest)).result()  # the commit point

    # ---- reading ------------------------------------------------------------------------------
    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"reference ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        bad = ids[(ids < 0) | (ids >= self.count)]
        if len(bad):
            raise IndexError(f"reference id {int(bad[0])} is outside the bank (it holds ids 0..{self.count - 1})")
        return ids.astype(np.int64)

    def read(self, ids, dtype=np.float32):
        """Decoded memories (n, *memory_shape) in `dtype` and slot validity (n, tokens_per_head) bool."""
        ids = self._check_ids(ids)
        names = list(self.codec.fields()) + ["slots"]
        try:
            futures = {name: self._arrays[name].oindex[ids].read() for name in names}
            raw = {name: np.asarray(f.result()) for name, f in futures.items()}
        except ValueError as e:
            if "DATA_LOSS" in str(e) or "checksum" in str(e).lower() or "digest" in str(e).lower():
                raise BankCorruptError(f"{self.path}: corrupted data while reading references: {e}") from None
            raise
        missing = ids[raw["slots"] == 0]
        if len(missing):
            raise BankCorruptError(f"{self.path}: reference {int(missing[0])} has no data although the manifest "
                                   "counts it: the bank is truncated")
        slots = raw.pop("slots")
        k = self.memory_shape[3]
        return self.codec.decode(raw, dtype), np.arange(k)[None, :] < slots[:, None]

    def token_hashes(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._arrays["token_hashes"][start:stop].read().result())

    def verify(self, batch: int = 256) -> int:
        """Read every committed reference (checksums, truncation); return the count."""
        for start in range(0, self.count, batch):
            self.read(np.arange(start, min(start + batch, self.count)))
        return self.count


class PendingAppend:
    """Writes in flight; `commit()` waits for them, then moves the manifest's count (data before manifest)."""

    def __init__(self, bank: MemoryBank, count: int, futures):
        self.bank, self.count, self._futures = bank, count, futures

    def wait(self) -> None:
        for f in self._futures:
            f.result()

    def commit(self) -> None:
        self.wait()
        self.bank._commit(self.count)
