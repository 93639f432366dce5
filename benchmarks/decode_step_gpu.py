"""Milliseconds per decoding step of `m3jax_2p4b`-shaped random weights, batch 32, for decode variants.

    python benchmarks/decode_step_gpu.py [--config m3_2p4b]

Each variant runs in its own process (XLA flags are read once per process): layers scanned, or
unrolled over per-layer weights and caches, with XLA's GEMMs (Triton) or cuBLAS.
Steps = 127 (128 new tokens, no memory); the weight bytes read per step give the bandwidth bound.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = {
    "scan": ({"unroll": False}, ""),
    "unrolled": ({"unroll": True}, ""),
    "unrolled+cublas": ({"unroll": True}, "--xla_gpu_enable_triton_gemm=false"),
}


def child(config: str, unroll: bool) -> dict:
    import jax
    import numpy as np

    from m3jax import config as config_lib
    from m3jax.checkpoint import load_model
    from m3jax.generate.generator import Generator

    cfg = config_lib.load(config, {"model.dtype": "bfloat16", "model.param_dtype": "bfloat16"})
    model = load_model(cfg, "random:0")
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(model))
    prompts = np.random.default_rng(0).integers(5, 500, (32, 128)).tolist()
    gen = Generator(model, eos_id=-1, unroll_layers=unroll)
    t0 = time.perf_counter()
    gen.generate(prompts, 128, mode="none")
    compile_s = time.perf_counter() - t0
    times = [gen.generate(prompts, 128, mode="none").seconds["decode"] for _ in range(3)]
    ms = 1e3 * sorted(times)[1] / 127
    return {"ms_per_step": ms, "tokens_per_s": 32 / ms * 1e3, "first_call_s": compile_s,
            "weight_gb": weight_bytes / 1e9, "weight_read_tb_per_s": weight_bytes / ms / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="m3_2p4b")
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.config, VARIANTS[args.child][0]["unroll"])))
        return
    for name, (_, flags) in VARIANTS.items():
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        out = subprocess.run([sys.executable, __file__, "--config", args.config, "--child", name], env=env, check=False,
                             capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        print(name, lines[-1] if lines else out.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
