"""Reading a batch's memories from a bank on disk with the RAM cache off: what a prompt's retrieval
waits for in `benchmarks/decode_gpu.py` (batch 32 x 2 chunks x 5 references of `m3_2p4b`, 144 MB).

    python benchmarks/bank_read.py [--config m3_2p4b] [--refs 4096] [--ids 320] [--reps 7]

Writes a bank of random bf16 memories, then times (median of --reps, after one warm-up):
- `reader`: `CachedBankReader(capacity=0).gather`, the product's path: each distinct id read once
  (the read's array is the table), then indexed into the batch's order; `distinct`: the same without
  that indexing (what `gather_on_device` does on the host);
- `zeroed_table`: the path before it, which filled a zeroed table from the read (one more pass);
- `split_N`: the distinct ids read as N concurrent TensorStore reads, concatenated, indexed;
- on an accelerator, the whole way to the device: `device_put` (gathered on the host, copied as one
  array), `host_order_pieces_N` (gathered on the host, copied as N pieces joined there: the previous
  path) and `on_device` (`gather_on_device`, what generation does now: the distinct memories copied as
  8 pieces, put in the batch's order on the device).
Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from m3jax import config as config_lib
from m3jax.memory.bank import MemoryBank
from m3jax.memory.cache import CachedBankReader


def median_s(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="m3_2p4b")
    parser.add_argument("--refs", type=int, default=4096)
    parser.add_argument("--ids", type=int, default=320)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    cfg = config_lib.load(args.config)
    rng = np.random.default_rng(0)
    path = tempfile.mkdtemp(prefix="bank_read_")
    try:
        bank = MemoryBank.create(path, cfg, fingerprint="random")
        for start in range(0, args.refs, 256):
            n = min(256, args.refs - start)
            memories = rng.standard_normal((n, *bank.memory_shape), np.float32).astype(ml_dtypes.bfloat16)
            bank.append(start, memories, np.full(n, bank.memory_shape[3]), rng.integers(0, 256, (n, 8), np.uint8))
        ids = rng.integers(0, args.refs, args.ids)  # repeats, as neighbouring chunks' retrievals have
        reader = CachedBankReader(bank, capacity=0)

        def zeroed_table():
            unique, inverse = np.unique(ids, return_inverse=True)
            table = np.zeros((len(unique), *bank.memory_shape), ml_dtypes.bfloat16)
            valid = np.zeros((len(unique), bank.memory_shape[3]), bool)
            table[:], valid[:] = bank.read(unique, ml_dtypes.bfloat16)
            return table[inverse], valid[inverse]

        def split(n):
            unique, inverse = np.unique(ids, return_inverse=True)
            arrays = bank._arrays["memories"]
            futures = [arrays.oindex[part].read() for part in np.array_split(unique, n)]
            return np.concatenate([np.asarray(f.result()) for f in futures])[inverse]

        got = reader.gather(ids)[0]
        for other in (zeroed_table()[0], split(4)):
            assert (got.view(np.uint16) == other.view(np.uint16)).all()
        result = {"device": jax.devices()[0].device_kind, "cpus": os.cpu_count(), "ids": args.ids,
                  "distinct": len(np.unique(ids)), "mb": got.nbytes / 1e6,
                  "reader_s": median_s(lambda: reader.gather(ids), args.reps),
                  "distinct_s": median_s(lambda: reader.distinct(ids), args.reps),
                  "zeroed_table_s": median_s(zeroed_table, args.reps),
                  **{f"split_{n}_s": median_s(lambda n=n: split(n), args.reps) for n in (2, 4, 8)}}
        if jax.default_backend() != "cpu":
            def host_order_pieces(n):
                kv, valid = reader.gather(ids)
                return jnp.concatenate(jax.device_put(np.array_split(kv, n))), jax.device_put(valid)

            on_device = reader.gather_on_device(ids)[0]
            assert (np.asarray(on_device).view(np.uint16) == got.view(np.uint16)).all()
            result["device_put_s"] = median_s(lambda: jax.block_until_ready(jax.device_put(reader.gather(ids))),
                                              args.reps)
            for n in (4, 8):
                result[f"host_order_pieces_{n}_s"] = median_s(lambda n=n: jax.block_until_ready(host_order_pieces(n)),
                                                              args.reps)
            result["on_device_s"] = median_s(lambda: jax.block_until_ready(reader.gather_on_device(ids)), args.reps)
        print(json.dumps(result))
    finally:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
