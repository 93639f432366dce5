"""Where a decoding step's time goes: a profiler trace of `generate` (no memory, batch 32, 128 -> 128),
summarised as the GPU kernels with the most total time.

    python benchmarks/profile_decode_gpu.py --out DIR [--config m3_2p4b] [--unroll 0|1]
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib

import jax
import numpy as np

from m3jax import config as config_lib
from m3jax.checkpoint import load_model
from m3jax.generate.generator import Generator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="m3_2p4b")
    parser.add_argument("--out", required=True)
    parser.add_argument("--unroll", type=int, default=1)
    args = parser.parse_args()
    cfg = config_lib.load(args.config, {"model.dtype": "bfloat16", "model.param_dtype": "bfloat16"})
    gen = Generator(load_model(cfg, "random:0"), eos_id=-1, unroll_layers=bool(args.unroll))
    prompts = np.random.default_rng(0).integers(5, 500, (32, 128)).tolist()
    gen.generate(prompts, 128, mode="none")
    with jax.profiler.trace(args.out, create_perfetto_trace=True):
        gen.generate(prompts, 128, mode="none")
    trace = next(pathlib.Path(args.out).rglob("*.trace.json.gz"))
    events = json.loads(gzip.open(trace).read())
    events = events["traceEvents"] if isinstance(events, dict) else events
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            total[e["name"]] += e["dur"]
            count[e["name"]] += 1
    for name, us in total.most_common(40):
        print(f"{us / 1e3:10.2f} ms {count[name]:7d}x  {name[:150]}")


if __name__ == "__main__":
    main()
