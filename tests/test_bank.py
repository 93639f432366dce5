"""Memory bank: round trips per compression, resume after a kill, append, refusals, corruption, cache."""
import os
import pathlib
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from m3jax import config as config_lib
from m3jax.memory import cache as cache_lib
from m3jax.memory.bank import BankCorruptError, BankError, BankMismatchError, MemoryBank, reference_hashes
from m3jax.memory.build import build_bank, compression_report
from m3jax.memory.cache import NO_REFERENCE, CachedBankReader, Prefetcher, take_on_device
from m3jax.memory.fingerprint import weights_fingerprint
from m3jax.memory.write import write_memories
from m3jax.model.lm import Memory3, MemoryInputs

N_REFS = 96


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = config_lib.load("tiny")
    model = Memory3(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 512, (N_REFS, 32))
    lengths = rng.integers(1, 33, N_REFS)
    memories, valid = write_memories(model, tokens, lengths)
    kb = tmp_path_factory.mktemp("kb") / "kb.npz"
    np.savez(kb, tokens=tokens, lengths=lengths)
    return cfg, model, tokens, lengths, memories.astype(np.float32), valid, kb


def build(setup, path, n=N_REFS, **kw):
    cfg, model, tokens, lengths, *_ = setup
    return build_bank(model, tokens[:n], lengths[:n], str(path), batch_size=16, shard_refs=32, progress=False, **kw)[0]


def relative(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("mode, bound", [("bf16", 1e-2), ("int8", 2e-2), ("vq", 0.9)])
def test_round_trip_per_compression(setup, tmp_path, mode, bound):
    *_, memories, valid, _ = setup
    bank = build(setup, tmp_path / mode, compression=mode)
    reopened = MemoryBank.open(str(tmp_path / mode), fingerprint=weights_fingerprint(setup[1]), cfg=setup[0])
    ids = np.array([5, 0, 95, 5, 40])
    got, got_valid = reopened.read(ids)
    np.testing.assert_array_equal(got_valid, valid[ids])
    keep = valid[ids][:, None, None, None, :, None]
    err = relative(np.where(keep, got, 0), np.where(keep, memories[ids], 0))
    assert err < bound, (mode, err)
    if mode == "bf16":  # bf16 storage is exact up to the bf16 rounding of f32 memories
        np.testing.assert_array_equal(got, memories[ids].astype("bfloat16").astype(np.float32))
    assert reopened.count == N_REFS and bank.manifest["bytes_per_reference"] == reopened.codec.bytes_per_reference()


def test_compression_report_orders_sizes(setup):
    cfg, model, tokens, lengths, *_ = setup
    report = compression_report(model, tokens, lengths, sample=96)
    sizes = [report[m]["bytes_per_reference"] for m in ("bf16", "int8", "vq")]
    assert sizes[0] == 16 * 16 * 4 and sizes[1] < sizes[0] and sizes[2] < sizes[1]
    assert report["bf16"]["relative_error"] < report["int8"]["relative_error"] < report["vq"]["relative_error"] < 1


def read_all(path):
    bank = MemoryBank.open(str(path))
    return bank.read(np.arange(bank.count))


@pytest.mark.parametrize("crash", ["encoded:2", "written:1", "committed:1"])
def test_resume_after_sigkill_equals_uninterrupted_build(setup, tmp_path, crash):
    kb = setup[-1]
    cmd = [sys.executable, "-m", "m3jax.cli", "memory", "build", "--config=tiny", "--checkpoint=random:0",
           f"--references={kb}", f"--bank={tmp_path / 'resumed'}", "--batch_size=16"]
    killed = subprocess.run(cmd, env={**os.environ, "M3JAX_CRASH_AT": crash}, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    partial = MemoryBank.open(str(tmp_path / "resumed")).count
    assert 0 < partial < N_REFS
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    build(setup, tmp_path / "straight")
    for a, b in zip(read_all(tmp_path / "resumed"), read_all(tmp_path / "straight")):
        np.testing.assert_array_equal(a, b)


def test_append_new_references(setup, tmp_path):
    build(setup, tmp_path / "grown", n=40)
    grown = build(setup, tmp_path / "grown")  # the knowledge base gained 56 references at the end
    assert grown.count == N_REFS
    build(setup, tmp_path / "full")
    for a, b in zip(read_all(tmp_path / "grown"), read_all(tmp_path / "full")):
        np.testing.assert_array_equal(a, b)


def test_refusals(setup, tmp_path):
    cfg, model, tokens, lengths, *_ = setup
    build(setup, tmp_path / "bank", n=40)
    other = Memory3(cfg, rngs=nnx.Rngs(1))
    with pytest.raises(BankMismatchError, match="written by other weights"):
        build_bank(other, tokens, lengths, str(tmp_path / "bank"), batch_size=16, progress=False)
    with pytest.raises(BankMismatchError, match="written by other weights"):
        MemoryBank.open(str(tmp_path / "bank"), fingerprint=weights_fingerprint(other))
    changed = tokens.copy()
    changed[39, 0] += 1
    with pytest.raises(BankError, match="reference 39 differs"):
        build_bank(model, changed, lengths, str(tmp_path / "bank"), batch_size=16, progress=False)
    with pytest.raises(BankError, match="stores bf16 memories; --compression=int8"):
        build_bank(model, tokens, lengths, str(tmp_path / "bank"), compression="int8", batch_size=16, progress=False)
    bank = MemoryBank.open(str(tmp_path / "bank"))
    with pytest.raises(IndexError, match="reference id 40 is outside the bank"):
        bank.read(np.array([3, 40]))
    with pytest.raises(ValueError, match="1-D integer array"):
        bank.read(np.array([1.0]))
    with pytest.raises(BankError, match="append at 50, but the bank holds 40"):
        bank.append(50, np.zeros((1, *bank.memory_shape)), [1], reference_hashes(tokens[:1], lengths[:1]))
    with pytest.raises(BankError, match="already holds a memory bank"):
        MemoryBank.create(str(tmp_path / "bank"), cfg, fingerprint="x")
    with pytest.raises(BankError, match="no memory bank"):
        MemoryBank.open(str(tmp_path / "nothing"))
    assert MemoryBank.open(str(tmp_path / "bank")).count == 40  # nothing above damaged the bank


def test_corruption_is_detected(setup, tmp_path):
    path = tmp_path / "bank"
    build(setup, path)  # 96 references in shards of 32
    shard = path / "memories" / "c" / "1" / "0" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF
    shard.write_bytes(bytes(data))
    bank = MemoryBank.open(str(path))
    bank.read(np.arange(0, 32))  # other shards still read
    with pytest.raises(BankCorruptError, match="corrupted data"):
        bank.read(np.arange(32, 64))
    with pytest.raises(BankCorruptError):
        bank.verify()
    (path / "memories" / "c" / "2" / "0" / "0" / "0" / "0" / "0").unlink()
    with pytest.raises(BankCorruptError, match="shard 2 of 'memories' is missing"):
        MemoryBank.open(str(path))
    manifest = path / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"count": 96', '"count": 97'))
    with pytest.raises(BankCorruptError, match="manifest.json is corrupted"):
        MemoryBank.open(str(path))


def test_truncated_shard_file_is_detected(setup, tmp_path):
    path = tmp_path / "bank"
    build(setup, path)
    shard = next(pathlib.Path(path / "slots" / "c").iterdir())
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(BankCorruptError):
        MemoryBank.open(str(path)).verify()


def test_cache_and_prefetch(setup, tmp_path):
    memories, valid = setup[4], setup[5]
    bank = build(setup, tmp_path / "bank")
    reader = CachedBankReader(bank, capacity=3)
    ids = np.array([[[4, 7, NO_REFERENCE], [7, 4, 9]]])
    got, got_valid = reader.gather(ids)
    assert (reader.hits, reader.misses) == (0, 3)
    np.testing.assert_array_equal(got[0, 1, 0].astype(np.float32), memories[7].astype("bfloat16").astype(np.float32))
    assert not got_valid[0, 0, 2].any() and not got[0, 0, 2].astype(np.float32).any()
    np.testing.assert_array_equal(got_valid[0, 1], valid[[7, 4, 9]])
    reader.gather(np.array([9, 1]))  # 9 hits; 1 misses and evicts the least recently used (4)
    assert (reader.hits, reader.misses) == (1, 4)
    reader.gather(np.array([4]))
    assert (reader.hits, reader.misses) == (1, 5)
    uncached = CachedBankReader(bank, capacity=0)  # every id read from the bank, in the reader's dtype
    again, again_valid = uncached.gather(ids)
    np.testing.assert_array_equal(again.astype(np.float32), got.astype(np.float32))
    np.testing.assert_array_equal(again_valid, got_valid)
    assert uncached.misses == 3 and not uncached._cache
    repeats = np.array([[9, 2, 9], [40, 2, 5]])  # no NO_REFERENCE, nothing cached: the bank read is the table
    cold, cold_valid = uncached.gather(repeats)
    want, want_valid = bank.read(repeats.reshape(-1), ml_dtypes.bfloat16)
    assert cold.shape == (2, 3, *bank.memory_shape) and cold.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(cold.reshape(want.shape).view(np.uint16), want.view(np.uint16))
    np.testing.assert_array_equal(cold_valid.reshape(want_valid.shape), want_valid)
    as_f32, _ = bank.read(np.array([7, 4]))
    as_bf16, _ = bank.read(np.array([7, 4]), ml_dtypes.bfloat16)
    assert as_f32.dtype == np.float32 and as_bf16.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(as_bf16.astype(np.float32), as_f32)
    batches = [np.array([[[1, 2]]]), np.array([[[3, 3]]])]
    out = list(Prefetcher(reader, batches, depth=1))
    assert len(out) == 2
    np.testing.assert_array_equal(np.asarray(out[1].kv), reader.gather(batches[1])[0])
    with pytest.raises(IndexError, match="outside the bank"):
        list(Prefetcher(reader, [np.array([[[1000]]])]))


def test_take_on_device_equals_indexing_on_the_host():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((13, 3, 5)).astype(ml_dtypes.bfloat16)
    valid = rng.random((13, 3)) < 0.5
    inverse = rng.integers(0, 13, (2, 4, 3))  # repeats, and rows in no order
    inverse[0, 0, 0], inverse[1, 3, 2] = 12, 0  # the table's last and first rows
    for parts, min_bytes in ((3, 0), (8, 0), (3, table.nbytes + 1)):  # pieces of 8 (padded), of 8, one piece
        kv, got_valid = take_on_device(table, valid, inverse, parts=parts, min_bytes=min_bytes)
        assert isinstance(kv, jax.Array) and kv.shape == (2, 4, 3, 3, 5) and kv.dtype == table.dtype
        np.testing.assert_array_equal(np.asarray(kv).view(np.uint16), table[inverse].view(np.uint16))
        np.testing.assert_array_equal(np.asarray(got_valid), valid[inverse])
    # Small tables are padded to a power of two: 17, 25 and 30 distinct rows share one compiled shape.
    big = rng.standard_normal((30, 3, 5)).astype(ml_dtypes.bfloat16)
    compiled = cache_lib._joined_take._cache_size()
    for n in (17, 25, 30):
        kv, _ = take_on_device(big[:n], np.ones((n, 3), bool), inverse % n)
        np.testing.assert_array_equal(np.asarray(kv).view(np.uint16), big[:n][inverse % n].view(np.uint16))
    assert cache_lib._joined_take._cache_size() - compiled == 1


def test_reader_on_device_matches_the_host_gather(setup, tmp_path):
    bank = build(setup, tmp_path / "bank")
    ids = np.array([[[4, 7, NO_REFERENCE], [7, 4, 9]], [[2, 2, 2], [NO_REFERENCE] * 3]])
    for capacity in (0, 3):  # cold reads; then a cache holding some of the ids
        reader = CachedBankReader(bank, capacity=capacity)
        reader.gather(np.array([7, 2]))
        want, want_valid = reader.gather(ids)
        inputs = reader.memory_inputs(ids, 2, on_device=True)
        assert isinstance(inputs.kv, jax.Array) and inputs.window == 2
        np.testing.assert_array_equal(np.asarray(inputs.kv).view(np.uint16), want.view(np.uint16))
        np.testing.assert_array_equal(np.asarray(inputs.valid), want_valid)
