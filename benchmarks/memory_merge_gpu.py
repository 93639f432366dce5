"""Microseconds per memory layer of the prefill's memory-merge kernel (m3jax/model/memory_merge.py) for
Triton warps x pipeline stages, at generation's shape: batch 32 x 128 prompt tokens of `m3_2p4b` (40 / 8
heads of dim 80), each 64-token chunk reading 5 references x 8 tokens.

    python benchmarks/memory_merge_gpu.py [--warps 1,2,4,8] [--stages 1,2,3] [--json FILE]

GPU kernel time from a profiler trace of `--layers` merges per call (each layer its own donated
arrays, as the in-place update needs), and the largest difference from the default setting's output.
"""
from __future__ import annotations

import argparse
import itertools
import json

import jax
import jax.numpy as jnp

import gpu_trace  # benchmarks/, beside this script
from m3jax import config as config_lib
from m3jax.model import memory_merge


def inputs(cfg, layers: int, batch: int, prompt: int):
    m, mem = cfg.model, cfg.memory
    sink = config_lib.sink_len(cfg)
    n, chunks = sink + prompt, -(-prompt // mem.chunk_len)
    slots = mem.refs_per_chunk * mem.tokens_per_head
    ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(ks[0], (batch, n, m.num_heads, m.head_dim), jnp.bfloat16)
    keys, values = (jax.random.normal(k, (batch, chunks, slots, m.num_kv_heads, m.head_dim), jnp.bfloat16)
                    for k in ks[1:3])
    valid = jax.random.bernoulli(ks[3], 0.9, (batch, chunks, slots))
    streams = [(jax.random.normal(jax.random.fold_in(ks[4], i), q.shape, jnp.bfloat16),
                jax.random.normal(jax.random.fold_in(ks[4], layers + i), q.shape[:3], jnp.float32))
               for i in range(layers)]
    return q, keys, values, valid, streams, sink, mem.chunk_len


def us_per_layer(args, warps: int, stages: int, reps: int = 10):
    memory_merge.NUM_WARPS, memory_merge.NUM_STAGES = warps, stages
    q, keys, values, valid, streams, sink, chunk_len = args
    streams = [(o.copy(), lse.copy()) for o, lse in streams]  # donated below: keep the originals for the next

    def merge(out_s, lse_s):
        return memory_merge.merge_memory(q, out_s, lse_s, keys, values, valid, sink=sink, chunk_len=chunk_len)

    first = jax.jit(merge)(*streams[0])[0]  # not donated: the timed calls below take these arrays
    run = jax.jit(lambda streams: [merge(*layer) for layer in streams], donate_argnums=0)
    streams = run(streams)
    jax.block_until_ready(streams)
    us, streams = gpu_trace.kernel_us(run, streams, reps, keep=lambda name: "memory_merge" in name)
    return us / len(streams), first


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="m3_2p4b")
    parser.add_argument("--warps", default="1,2,4,8")
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cfg = config_lib.load(args.config)
    default = (memory_merge.NUM_WARPS, memory_merge.NUM_STAGES)
    data = inputs(cfg, args.layers, args.batch, args.prompt)
    base_us, base_out = us_per_layer(data, *default)
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "default": default,
           "us_per_layer": {"default": round(base_us, 2)}, "max_diff_from_default": {}}
    for warps, stages in itertools.product(*(map(int, a.split(",")) for a in (args.warps, args.stages))):
        name = f"{warps}w{stages}s"
        try:
            us, first = us_per_layer(data, warps, stages)
        except Exception as e:  # a setting Triton cannot compile
            out["us_per_layer"][name] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        out["us_per_layer"][name] = round(us, 2)
        out["max_diff_from_default"][name] = float(jnp.abs(first.astype(jnp.float32)
                                                           - base_out.astype(jnp.float32)).max())
        print(name, out["us_per_layer"][name], out["max_diff_from_default"][name], flush=True)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
