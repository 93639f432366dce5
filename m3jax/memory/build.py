"""`m3jax memory build`: encode a knowledge base into a memory bank; resumable and incremental.

References are rows of a token array. The bank's committed `count` says how many are done: a rerun
(after a crash, or with more references appended to the knowledge base) encodes rows [count, N). The
per-reference token hashes of the rows already in the bank are compared with the input first, so a
changed knowledge base is refused instead of silently mixed.
"""
from __future__ import annotations

import os
import signal
import time

import numpy as np
from tqdm.auto import tqdm

from m3jax.memory.bank import BankError, MemoryBank, reference_hashes
from m3jax.memory.compression import VQCodec, make_codec, relative_error
from m3jax.memory.fingerprint import weights_fingerprint
from m3jax.memory.write import MemoryWriter, check_references


def _crash_point(name: str, step: int) -> None:
    """Fault injection for the resume tests: M3JAX_CRASH_AT=<name>:<step> kills the process there."""
    if os.environ.get("M3JAX_CRASH_AT") == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def load_references(path: str):
    """A knowledge base as arrays: a prepared data folder (`m3jax data prepare`), or an .npz with `tokens`
    (N, L) and `lengths` (N,)."""
    if os.path.isdir(path):
        from m3jax.data.prepare import open_prepared

        _, arrays = open_prepared(path)
        return np.asarray(arrays["ref_tokens"]), np.asarray(arrays["ref_lengths"])
    try:
        with np.load(path) as data:
            return data["tokens"], data["lengths"]
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read references from {path}: {e}") from None
    except KeyError as e:
        raise ValueError(f"{path} must hold arrays 'tokens' and 'lengths' (missing {e})") from None


def _check_same_input(bank: MemoryBank, tokens, lengths, sample: int = 1024) -> None:
    """The rows already in the bank must be these references: check the last one and a sample."""
    done = bank.count
    if done > len(tokens):
        raise BankError(f"the bank holds {done} references but the knowledge base has only {len(tokens)}")
    if done == 0:
        return
    rows = np.unique(np.concatenate([[done - 1], np.random.default_rng(0).integers(0, done, min(sample, done))]))
    stored = np.stack([bank.token_hashes(int(r), int(r) + 1)[0] for r in rows])
    changed = rows[(stored != reference_hashes(tokens[rows], lengths[rows])).any(axis=1)]
    if len(changed):
        raise BankError(f"reference {int(changed[0])} differs from the one the bank holds: the knowledge base "
                        "changed; rebuild the bank into a new path (append only adds rows at the end)")


def _batches(start: int, stop: int, batch: int, shard: int):
    """Ranges of at most `batch` rows that never straddle a shard, so each write fills one shard."""
    lo = start
    while lo < stop:
        hi = min(stop, lo + batch, (lo // shard + 1) * shard)
        yield lo, hi
        lo = hi


def build_bank(model, tokens, lengths, path: str, *, compression: str = "bf16", batch_size: int = 64,
               shard_refs: int | None = None, tokenizer: str | None = None, vq_train_refs: int = 4096,
               progress: bool = True):
    """Encode references [bank count, N) into the bank at `path` (created if absent). Returns (bank, stats).

    Encoding of batch i+1 on the devices overlaps fetching and storing batch i. A new bank gets
    shards of one batch (`shard_refs` overrides), so a write fills a shard instead of rewriting one.
    """
    began = time.perf_counter()
    cfg = model.cfg
    tokens, lengths = check_references(cfg, tokens, lengths)
    fingerprint = weights_fingerprint(model)
    writer = MemoryWriter(model, batch_size)
    try:
        bank = MemoryBank.open(path, fingerprint=fingerprint, cfg=cfg)
    except BankError as e:
        if "no memory bank" not in str(e):
            raise
        codec = None
        if compression == "vq":  # train the quantizers on written memories before the first row is stored
            shape = (cfg.memory.num_layers, 2, cfg.model.num_kv_heads, cfg.memory.tokens_per_head, cfg.model.head_dim)
            codec = make_codec("vq", shape, cfg.memory.vq_factory)
            sample, _ = writer(tokens[:vq_train_refs], lengths[:vq_train_refs])
            codec.train(sample)
        bank = MemoryBank.create(path, cfg, fingerprint=fingerprint, compression=compression, tokenizer=tokenizer,
                                 shard_refs=shard_refs or writer.batch_size, codec=codec)
    if bank.manifest["compression"] != compression:
        raise BankError(f"{path} stores {bank.manifest['compression']} memories; --compression={compression} "
                        "would mix formats")
    _check_same_input(bank, tokens, lengths)
    start = bank.count
    bar = tqdm(total=len(tokens), initial=start, unit="ref", disable=not progress, desc="writing memories")
    pending, first_done = None, None

    def finish(pending, step):
        pending.wait()
        _crash_point("written", step)
        pending.commit()
        _crash_point("committed", step)
        bar.update(pending.count - bar.n)

    # Two batches in flight: the devices encode batch i+1 while the host fetches and stores batch i.
    ranges = list(_batches(start, len(tokens), writer.batch_size, bank.manifest["shard_refs"]))
    dispatch = lambda r: writer.dispatch(tokens[r[0]:r[1]], lengths[r[0]:r[1]])  # noqa: E731
    ahead = dispatch(ranges[0]) if ranges else None
    for step, (lo, hi) in enumerate(ranges):
        current, ahead = ahead, (dispatch(ranges[step + 1]) if step + 1 < len(ranges) else None)
        memories, valid = writer.fetch(current)
        _crash_point("encoded", step)
        if pending is not None:
            finish(pending, step - 1)
        pending = bank.write(lo, memories, valid.sum(axis=1), reference_hashes(tokens[lo:hi], lengths[lo:hi]))
        if first_done is None:
            first_done = (time.perf_counter(), hi - lo)
    if pending is not None:
        finish(pending, step)
    bar.close()
    end = time.perf_counter()
    written = len(tokens) - start
    stats = {"written": written, "seconds": end - began, "count": bank.count}
    if first_done and written > first_done[1]:  # after the first batch: no compilation, no setup
        stats["steady_refs_per_s"] = (written - first_done[1]) / (end - first_done[0])
    return bank, stats


def compression_report(model, tokens, lengths, modes=("bf16", "int8", "vq"), sample: int = 512) -> dict:
    """Bytes per reference and reconstruction error (relative L2 over valid slots) of each codec.

    The vector quantizer trains on the first half of the sample and is measured on the second half.
    """
    memories, valid = MemoryWriter(model, 64)(tokens[:sample], lengths[:sample])
    memories = memories.astype(np.float32)
    half = len(memories) // 2
    test, keep = memories[half:], valid[half:, None, None, None, :, None]  # padding slots hold nothing
    report = {}
    for mode in modes:
        codec = make_codec(mode, memories.shape[1:], model.cfg.memory.vq_factory)
        if isinstance(codec, VQCodec):
            codec.train(memories[:half])
        decoded = codec.decode(codec.encode(test))
        report[mode] = {"bytes_per_reference": codec.bytes_per_reference(),
                        "relative_error": relative_error(np.where(keep, test, 0), np.where(keep, decoded, 0))}
    return report
