"""Milliseconds per prefill of `generate` (`m3_2p4b` shape, random bf16 weights, batch 32 x 128 prompt
tokens, no memory) and, with --profile_dir, the GPU kernels that take its time.

    python benchmarks/prefill_gpu.py [--config m3_2p4b] [--batch 32] [--prompt 128] [--profile_dir DIR]

Times the generator's jitted prefill (prompt -> last-token logits and the KV cache) and its split of
the cache into per-layer arrays, as `Generator` calls them; median of 10 calls after a compiling one.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

import gpu_trace  # benchmarks/, beside this script
from m3jax import config as config_lib
from m3jax.checkpoint import load_model
from m3jax.config import sink_len
from m3jax.generate import generator as g
from timing import median_seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="m3_2p4b")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--profile_dir", default=None)
    args = parser.parse_args()
    cfg = config_lib.load(args.config, {"model.dtype": "bfloat16", "model.param_dtype": "bfloat16"})
    gen = g.Generator(load_model(cfg, "random:0"), eos_id=-1)
    tokens = jnp.asarray(np.random.default_rng(0).integers(5, 500, (args.batch, args.prompt)), jnp.int32)
    lengths = jnp.full((args.batch,), args.prompt, jnp.int32)
    cache_len = -(-(sink_len(cfg) + args.prompt + args.new) // 8) * 8

    def prefill(tokens, lengths):
        logits, cache = g._prefill(gen.graphdef, gen.state, tokens, lengths, None, cache_len=cache_len,
                                   memory_slots=0)
        return logits, g._per_layer(cache)

    seconds = median_seconds(prefill, tokens, lengths, reps=10)
    flops = 2 * sum(x.size for x in jax.tree.leaves(gen.state)) * args.batch * (sink_len(cfg) + args.prompt)
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "batch": args.batch,
           "prompt": args.prompt, "prefill_ms": round(seconds * 1e3, 2),
           "tflop_s_of_2_flops_per_parameter_and_token": round(flops / seconds / 1e12, 1)}
    if args.profile_dir:
        with jax.profiler.trace(args.profile_dir):
            jax.block_until_ready(prefill(tokens, lengths))
        kernels, _ = gpu_trace.kernel_events(args.profile_dir)
        out["profile"] = gpu_trace.busy(kernels, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
