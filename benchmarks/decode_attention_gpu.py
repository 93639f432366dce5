"""Decoding's cache attention, `m3_2p4b` shape (batch 32, 40/8 heads of dim 80, 264 stream positions,
+ 40 memory slots with memory: 5 references x 8 tokens, as generation reads them): the Pallas kernel's
tilings against XLA's path (einsums, softmax and the two scatters writing the new key and value).

    python benchmarks/decode_attention_gpu.py [--layers 8] [--json FILE] [--skip_sweep]
                                              [--compare 128,1,2,3;...]

One jitted call runs `--layers` layers, each with its own cache, donated and updated in place as in a
decoding step. Microseconds per layer are GPU kernel time from a profiler trace (all kernels of the
call: the Pallas kernel and, with splits, the merge; XLA's einsums, softmax and scatters); wall time of
calls this short measures the host's dispatch more than the GPU. Errors are against float32.
--compare: more tilings (keys per block, splits, warps, stages) timed in every case beside the default.
"""
from __future__ import annotations

import argparse
import itertools
import json

import jax
import jax.numpy as jnp

import gpu_trace  # benchmarks/, beside this script

from m3jax.model import decode_attention as da
from m3jax.model import decode_matmul as dm
from m3jax.model.attention import Attention

B, HQ, HKV, D, STREAM, MEMORY = 32, 40, 8, 80, 264, 40


def xla_path(q, k_new, v_new, cache_k, cache_v, write_at, memory_valid):
    out = Attention._decode_attention_xla(q[:, None], k_new[:, None], v_new[:, None], cache_k, cache_v, write_at,
                                          memory_valid)
    rows = jnp.arange(q.shape[0])
    return out[:, 0], cache_k.at[rows, write_at].set(k_new), cache_v.at[rows, write_at].set(v_new)


def pallas_path(tiling):
    return lambda *args: da.decode_attention(*args, tiling=tiling)


def inputs(length: int, memory: bool, layers: int):
    s = STREAM + (MEMORY if memory else 0)
    ks = jax.random.split(jax.random.key(length), 6)
    q = jax.random.normal(ks[0], (B, HQ, D), jnp.bfloat16)
    k_new, v_new = (jax.random.normal(k, (B, HKV, D), jnp.bfloat16) for k in ks[1:3])
    caches = [tuple(jax.random.normal(jax.random.fold_in(k, i), (B, s, HKV, D), jnp.bfloat16) for k in ks[3:5])
              for i in range(layers)]
    memory_valid = jax.random.bernoulli(ks[5], 0.8, (B, MEMORY)) if memory else None
    return q, k_new, v_new, caches, jnp.full((B,), length, jnp.int32), memory_valid


def us_per_layer(attend, length, memory, layers, reps=10) -> float:
    q, k_new, v_new, caches, write_at, memory_valid = inputs(length, memory, layers)

    def run(caches, q):
        outs = []
        for k, v in caches:  # like a step: each layer's output feeds the next layer's query
            out, k, v = attend(q, k_new, v_new, k, v, write_at, memory_valid)
            q = out
            outs.append((k, v))
        return outs, q

    run = jax.jit(run, donate_argnums=0)
    for _ in range(2):
        caches, q = run(caches, q)
    jax.block_until_ready(q)
    us, _ = gpu_trace.kernel_us(lambda state: run(*state), (caches, q), reps)
    return us / layers


def errors(length: int, memory: bool, tiling) -> dict:
    q, k_new, v_new, caches, write_at, memory_valid = inputs(length, memory, 1)
    args = (q, k_new, v_new, *caches[0], write_at, memory_valid)
    f32 = [None if x is None else x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x for x in args]
    want = jax.jit(xla_path)(*f32)[0]
    got, xla = jax.jit(pallas_path(tiling))(*args), jax.jit(xla_path)(*args)
    err = lambda out: float(jnp.abs(out.astype(jnp.float32) - want).max())
    same_cache = bool(all((a == b).all() for a, b in zip(got[1:], xla[1:])))
    return {"pallas_max_err": err(got[0]), "xla_max_err": err(xla[0]), "caches_equal": same_cache}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--json", default=None)
    parser.add_argument("--skip_sweep", action="store_true", help="only the default tiling against XLA's path")
    parser.add_argument("--compare", default="", help="tilings timed in every case, e.g. '128,1,2,3;64,1,4,3'")
    parser.add_argument("--early_launch", action="store_true",
                        help="let kernels signal their dependents early (as in a step); off by default, since a "
                             "kernel's span in the trace then includes its wait for the layer before")
    args = parser.parse_args()
    dm.EARLY_LAUNCH = args.early_launch
    compare = [da.Tiling(*map(int, t.split(","))) for t in args.compare.split(";") if t]
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    report = {"sweep": [], "cases": []}
    tilings = [] if args.skip_sweep else itertools.product((32, 64, 128), (1, 2, 4), (2, 4), (2, 3))
    for block, splits, warps, stages in tilings:
        tiling = da.Tiling(block, splits, warps, stages)
        us = us_per_layer(pallas_path(tiling), 200, False, args.layers)
        report["sweep"].append({"tiling": tiling._asdict(), "us_per_layer": us})
        print(json.dumps(report["sweep"][-1]), flush=True)
    best = sorted(report["sweep"], key=lambda r: r["us_per_layer"])[:3] + [{"tiling": t._asdict()} for t in compare]
    for length, memory in itertools.product((136, 200, 263), (False, True)):  # prompt only, halfway, last
        row = {"stream_length": length, "memory": memory,
               "xla_us": us_per_layer(xla_path, length, memory, args.layers),
               "default_us": us_per_layer(pallas_path(da.Tiling()), length, memory, args.layers),
               **errors(length, memory, da.Tiling())}
        for r in best:
            tiling = da.Tiling(**r["tiling"])
            row[str(tuple(tiling))] = us_per_layer(pallas_path(tiling), length, memory, args.layers)
        report["cases"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
