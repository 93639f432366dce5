"""Search latency of VectorIndex (FAISS, CPU) on random unit vectors of MiniLM's dim 384.

    python benchmarks/retrieval_latency.py [--sizes 10000 1000000] [--k 5] [--train-per-list 64]

For each size n and kind (flat, ivf; ivfpq from 10^6 vectors), reports the median milliseconds per
query for single-query searches (batch 1, the latency of one chunk) and for batches of 64 queries
(throughput; a 2048-token Memory3 context has 32 chunks). Random vectors have no cluster structure,
so IVF recall here is a worst case; latency depends on nlist/nprobe, not on the data. Training uses
`--train-per-list` vectors per IVF list (VectorIndex's default is 256, which at 10^6 vectors means
k-means over all of them: minutes on a small machine, with no effect on search latency).
Prints a markdown table and the machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import faiss
import numpy as np

from m3jax.retrieval.index import DEFAULT_NPROBE, VectorIndex, default_nlist


def random_unit(rng, n: int, dim: int, chunk: int = 100_000) -> np.ndarray:
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):  # in chunks: no float64 temporaries of the full array
        part = rng.standard_normal((min(chunk, n - s), dim), dtype=np.float32)
        x[s:s + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return x


def median_ms_per_query(index: VectorIndex, queries: np.ndarray, batch: int, k: int,
                        budget_s: float = 3.0, max_reps: int = 50) -> tuple[float, int]:
    """Median over repeated searches of `batch` queries, divided by `batch`; stops after `budget_s`."""
    index.search(queries[:batch], k)  # warm-up (thread pool, caches)
    times, start = [], time.perf_counter()
    for r in range(max_reps):
        q = queries[(r * batch) % len(queries):][:batch]
        t = time.perf_counter()
        index.search(q, k)
        times.append(time.perf_counter() - t)
        if len(times) >= 3 and time.perf_counter() - start > budget_s:
            break
    return 1e3 * statistics.median(times) / batch, len(times)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--nprobe", type=int, default=DEFAULT_NPROBE)
    ap.add_argument("--train-per-list", type=int, default=64)
    ap.add_argument("--pq-min", type=int, default=1_000_000, help="run ivfpq from this many vectors")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    queries = random_unit(rng, 64 * 8, args.dim)
    rows = []
    for n in args.sizes:
        x = random_unit(rng, n, args.dim)
        kinds = ["flat", "ivf"] + (["ivfpq"] if n >= args.pq_min else [])
        for kind in kinds:
            t = time.perf_counter()
            index = VectorIndex.build(x, kind, nprobe=args.nprobe, train_size=args.train_per_list * default_nlist(n))
            build_s = time.perf_counter() - t
            b1, r1 = median_ms_per_query(index, queries, 1, args.k)
            b64, r64 = median_ms_per_query(index, queries, 64, args.k)
            params = "-" if kind == "flat" else f"nlist={faiss.extract_index_ivf(index.index).nlist}, nprobe={index.nprobe}"
            if kind == "ivfpq":
                params += f", PQ{faiss.downcast_index(index.index).pq.M}"
            rows.append((n, kind, params, build_s, b1, r1, b64, r64))
            print(f"# done n={n} {kind}: build {build_s:.1f}s, {b1:.3f} / {b64:.3f} ms per query", flush=True)
            del index
        del x

    print(f"\nMachine: {cpu_model()}, os.cpu_count()={os.cpu_count()}, faiss {faiss.__version__} "
          f"({faiss.get_compile_options().strip()}), OpenMP threads {faiss.omp_get_max_threads()}, "
          f"numpy {np.__version__}. dim={args.dim}, k={args.k}, random unit vectors and queries.\n")
    print("| vectors | kind | params | build (s) | batch 1: ms/query (reps) | batch 64: ms/query (reps) |")
    print("|---:|---|---|---:|---:|---:|")
    for n, kind, params, build_s, b1, r1, b64, r64 in rows:
        print(f"| {n:,} | {kind} | {params} | {build_s:.1f} | {b1:.3f} ({r1}) | {b64:.4f} ({r64}) |")


if __name__ == "__main__":
    main()
