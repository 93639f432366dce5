"""FLOPs and bytes of each stage's train step as XLA counts them (compiled for this host; no accelerator).

    JAX_PLATFORMS=cpu python benchmarks/step_flops.py [--config m3_0p92b] [--batch 2]

The step is compiled with the layers unrolled (`model.scan_layers=False`): XLA's cost analysis counts
a loop body once. The stage-2/stage-1 ratios are the floors the GPU step times are compared with.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from m3jax import config as config_lib
from m3jax.train.loop import _setup

STEPS = {"stage 1": {}, "stage 2, grads through references": {"train.stage": 2},
         "stage 2, no grads through references": {"train.stage": 2, "memory.grad_through_references": False}}


def step_cost(name: str, batch: int, overrides: dict) -> dict:
    cfg = config_lib.load(name, {"train.batch_size": batch, "model.dtype": "bfloat16", "model.scan_layers": False,
                                 **overrides})
    _, _, step_fn, _, _, abstract = _setup(cfg)
    t, chunks = cfg.data.seq_len, cfg.data.seq_len // cfg.memory.chunk_len
    data = {"tokens": jax.ShapeDtypeStruct((batch, t), jnp.int32)}
    if cfg.train.stage == 2:
        data["ref_tokens"] = jax.ShapeDtypeStruct((batch, chunks, cfg.memory.reference_len), jnp.int32)
        data["ref_lengths"] = jax.ShapeDtypeStruct((batch, chunks), jnp.int32)
    cost = step_fn.lower(abstract, data).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="m3_0p92b")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    rows = {label: step_cost(args.config, args.batch, over) for label, over in STEPS.items()}
    first = rows["stage 1"]
    print("| step | TFLOP | vs stage 1 | GB accessed | vs stage 1 |\n|---|---|---|---|---|")
    for label, row in rows.items():
        print(f"| {label} | {row['flops'] / 1e12:.1f} | {row['flops'] / first['flops']:.2f}x | {row['bytes'] / 1e9:.0f} | "
              f"{row['bytes'] / first['bytes']:.2f}x |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
