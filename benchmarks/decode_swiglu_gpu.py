"""Microseconds per SwiGLU gate of decoding, silu(x @ gate) * (x @ up), at `m3_2p4b`'s shape (batch 32,
dim 3200, hidden 3200): the split-K product then XLA's SiLU product (before decode_swiglu) against the
`m3jax/model/decode_swiglu.py` kernel at several tilings.

    python benchmarks/decode_swiglu_gpu.py [--rows 32] [--layers 44] [--json FILE]

One jitted call chains `--layers` gates over distinct weights (each reads the previous one's output, as
a decoding step's layers do; 44 x 41 MB, more than the L2 cache holds); median wall time of 5 calls over
`--layers`, and the TB/s of weights that makes.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from m3jax.model import decode_matmul as dm
from m3jax.model import decode_swiglu as ds
from timing import median_seconds  # benchmarks/, beside this script

TILINGS = [ds.Tiling(bn, bk, w, st) for bn in (16, 32, 64) for bk in (64, 128) for w in (4, 8) for st in (3, 5)]


def split_k_then_xla(x, w):
    gate_up = dm.decode_matmul(x, w, "pallas", out_dtype=jnp.float32)
    return ds._silu_product(gate_up[:, 0], gate_up[:, 1], x.dtype)


def chained(gate, x, ws):
    for w in ws:
        x = gate(x, w)  # the next layer reads this one's output (hidden = dim here)
    return x


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--dim", type=int, default=3200)
    parser.add_argument("--layers", type=int, default=44)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    key = jax.random.key(0)
    x = jax.random.normal(key, (args.rows, args.dim), jnp.bfloat16)
    ws = [(jax.random.normal(jax.random.fold_in(key, i), (args.dim, 2, args.dim)) * args.dim ** -0.5)
          .astype(jnp.bfloat16) for i in range(args.layers)]
    weight_bytes = sum(w.nbytes for w in ws)
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": args.rows, "results": []}

    def run(name, gate):
        try:
            seconds = median_seconds(jax.jit(lambda x, ws: chained(gate, x, ws)), x, ws, reps=5)
        except Exception as e:  # a tiling Triton cannot compile: report it, go on
            row = {"variant": name, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        else:
            row = {"variant": name, "us_per_gate": round(seconds / args.layers * 1e6, 2),
                   "tb_s": round(weight_bytes / seconds / 1e12, 3)}
        out["results"].append(row)
        print(json.dumps(row), flush=True)

    run("split-K product + XLA SiLU product", split_k_then_xla)
    want = split_k_then_xla(x, ws[0]).astype(jnp.float32)
    for t in TILINGS:
        run(str(t), lambda x, w, t=t: ds.swiglu_gate(x, w, "pallas", t))
    got = ds.swiglu_gate(x, ws[0], "pallas").astype(jnp.float32)
    out["default_max_abs_diff"] = float(jnp.abs(got - want).max())
    out["default"] = str(ds.Tiling())
    print("default", out["default"], "max |diff| vs split-K + XLA:", out["default_max_abs_diff"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
