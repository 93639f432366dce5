"""Milliseconds per prefill of `generate` (`m3_2p4b` shape, random bf16 weights, batch 32 x 128 prompt
tokens, no memory) and, with --profile_dir, the GPU kernels that take its time.

    python benchmarks/prefill_gpu.py [--config m3_2p4b] [--batch 32] [--prompt 128] [--attention auto]
                                     [--profile_dir DIR]

Times `Generator.generate(prompts, 1, mode="none")`: the prompt read into the KV cache and the first new
token (its "prefill" seconds, no decoding loop); median of 10 calls after a compiling one.
"""
from __future__ import annotations

import argparse
import json

import jax
import numpy as np

import gpu_trace  # benchmarks/, beside this script
from m3jax import config as config_lib
from m3jax.checkpoint import load_model
from m3jax.generate.generator import Generator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="m3_2p4b")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--attention", default="auto", help="model.attention: the prompt's attention kernel")
    parser.add_argument("--profile_dir", default=None)
    args = parser.parse_args()
    cfg = config_lib.load(args.config, {"model.dtype": "bfloat16", "model.param_dtype": "bfloat16",
                                        "model.attention": args.attention})
    gen = Generator(load_model(cfg, "random:0"), eos_id=-1)
    prompts = np.random.default_rng(0).integers(5, 500, (args.batch, args.prompt)).tolist()
    gen.generate(prompts, 1, mode="none")  # compiles
    seconds = float(np.median([gen.generate(prompts, 1, mode="none").seconds["prefill"] for _ in range(10)]))
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "batch": args.batch,
           "prompt": args.prompt, "attention": args.attention, "prefill_ms": round(seconds * 1e3, 2)}
    if args.profile_dir:
        with jax.profiler.trace(args.profile_dir):
            gen.generate(prompts, 1, mode="none")
        kernels, _ = gpu_trace.kernel_events(args.profile_dir)
        out["profile"] = gpu_trace.busy(kernels, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
