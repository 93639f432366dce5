"""Weight bandwidth of decoding's matrix products: XLA's dot vs the split-K Pallas kernel, per shape.

    python benchmarks/decode_matmul_gpu.py [--rows 32] [--sweep] [--json FILE]

Shapes are one decoding step of `m3_2p4b` (q/k/v fused, o, gate/up fused, down, the LM head). Each
timing multiplies the activations by `--weight_mb` of distinct weight matrices in one jitted call (more
bytes than the L2 cache holds, as in a step through 44 layers) ten times in one jitted loop, median of
5 calls, and reports TB/s of weights read ("read_all": a column sum of the weights, the copy bound). `--sweep` also times other tilings and prints the best for each shape (what
`pick_tiling` should choose).
"""
from __future__ import annotations

import argparse
import itertools
import json

import jax
import jax.numpy as jnp

from m3jax.model.decode_matmul import Tiling, decode_matmul, pallas_matmul, pick_tiling
from timing import median_seconds  # benchmarks/, beside this script

SHAPES = {"qkv": (3200, 4480), "o": (3200, 3200), "gate_up": (3200, 6400), "down": (3200, 3200),
          "lm_head": (3200, 60416)}


def bandwidth(matmul, x, ws, loops: int = 10) -> float:
    """TB/s of weights read: `loops` passes over all of `ws` in one call, so host overhead is negligible."""
    def passes(x, ws):
        def one(_, total):
            return total + sum(matmul(x, w).astype(jnp.float32).sum() for w in ws)
        return jax.lax.fori_loop(0, loops, one, jnp.zeros((), jnp.float32))
    seconds = median_seconds(jax.jit(passes), x, ws, reps=5)
    return loops * sum(w.nbytes for w in ws) / seconds / 1e12


def candidates(m, k, n):
    for bn, bk, warps, stages in itertools.product((32, 64, 128), (64, 128), (4, 8), (3, 5)):
        if n % bn or k % bk:
            continue
        steps = k // bk
        for s in (s for s in range(1, steps + 1) if steps % s == 0):
            if 60 <= (n // bn) * s <= 1000:
                yield Tiling(bn, bk, s, warps, stages)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--weight_mb", type=float, default=400, help="distinct weights per pass (L2: 50 MB)")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": args.rows, "shapes": {}}
    key = jax.random.key(0)
    for name, (k, n) in SHAPES.items():
        copies = max(2, int(args.weight_mb * 1e6 // (k * n * 2)))
        x = jax.random.normal(key, (args.rows, k), jnp.bfloat16)
        ws = [jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.bfloat16) * 0.02 for i in range(copies)]
        row = {"copies": copies,
               "read_all_tb_s": bandwidth(lambda x, w: w.sum(axis=0, dtype=jnp.float32), x, ws),
               "xla_tb_s": bandwidth(lambda x, w: decode_matmul(x, w, "xla"), x, ws),
               "pallas_default": str(pick_tiling(args.rows, k, n)),
               "pallas_tb_s": bandwidth(lambda x, w: decode_matmul(x, w, "pallas"), x, ws)}
        ref = jnp.dot(x, ws[0], preferred_element_type=jnp.float32)
        row["pallas_rel_err"] = float(jnp.abs(decode_matmul(x, ws[0], "pallas").astype(jnp.float32) - ref).max()
                                      / jnp.abs(ref).max())
        if args.sweep and name != "down":
            best = []
            for t in candidates(args.rows, k, n):
                try:
                    best.append((bandwidth(lambda x, w, t=t: pallas_matmul(x, w, t), x, ws), str(t)))
                except Exception as e:  # a tiling Triton cannot compile (shared memory): skip it
                    best.append((0.0, f"{t}: {type(e).__name__}"))
            row["sweep_top"] = sorted(best, reverse=True)[:8]
        out["shapes"][name] = row
        print(name, json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
