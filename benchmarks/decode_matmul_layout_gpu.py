"""Does the split-K decode matmul read weights faster when each program's block is contiguous in memory?

    python benchmarks/decode_matmul_layout_gpu.py [--rows 32] [--sweep] [--json FILE]

A row-major (k, n) weight gives each program (k / splits) rows of block_n columns: 128-256-byte pieces
n * 2 bytes apart. The blocked layout (n / block_n, k, block_n) makes that block one contiguous range.
Same measurement as decode_matmul_gpu.py (400 MB of distinct weights per pass, ten passes, TB/s).
"""
from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp

from decode_matmul_gpu import SHAPES, bandwidth  # benchmarks/, beside this script
from m3jax.model.decode_matmul import Tiling, _kernel, dot_rows, pallas_matmul, pick_tiling


def blocked(w, block_n: int):
    k, n = w.shape
    return w.reshape(k, n // block_n, block_n).transpose(1, 0, 2)


@functools.partial(jax.jit, static_argnames=("tiling", "interpret"))
def blocked_matmul(x, wb, tiling: Tiling, interpret: bool = False):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    m, k = x.shape
    nb, _, bn = wb.shape
    rows = dot_rows(m)
    bk, s = tiling.block_k, tiling.splits
    part = k // s
    partials = pl.pallas_call(
        functools.partial(_kernel, block_k=bk, steps=part // bk),
        grid=(nb, s),
        in_specs=[pl.BlockSpec((rows, part), lambda j, i: (0, i)),
                  pl.BlockSpec((None, part, bn), lambda j, i: (j, i, 0))],
        out_specs=pl.BlockSpec((None, rows, bn), lambda j, i: (i, 0, j)),
        out_shape=jax.ShapeDtypeStruct((s, rows, nb * bn), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name="decode_matmul_blocked",
    )(x, wb)
    return partials.sum(axis=0)[:m].astype(x.dtype)


def _transposed_kernel(x_ref, w_ref, o_ref, *, block_k: int, steps: int):
    from jax.experimental import pallas as pl

    def body(i, acc):
        ks = pl.ds(i * block_k, block_k)
        return acc + jax.lax.dot_general(x_ref[:, ks], w_ref[:, ks], (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)

    o_ref[...] = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))


@functools.partial(jax.jit, static_argnames=("tiling", "interpret"))
def transposed_matmul(x, wt, tiling: Tiling, interpret: bool = False):
    """x @ wt.T with wt: (n, k) row-major, so each program's rows of weights are contiguous along k."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    m, k = x.shape
    n = wt.shape[0]
    rows = dot_rows(m)
    bn, bk, s = tiling.block_n, tiling.block_k, tiling.splits
    part = k // s
    partials = pl.pallas_call(
        functools.partial(_transposed_kernel, block_k=bk, steps=part // bk),
        grid=(n // bn, s),
        in_specs=[pl.BlockSpec((rows, part), lambda j, i: (0, i)),
                  pl.BlockSpec((bn, part), lambda j, i: (j, i))],
        out_specs=pl.BlockSpec((None, rows, bn), lambda j, i: (i, 0, j)),
        out_shape=jax.ShapeDtypeStruct((s, rows, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name="decode_matmul_transposed",
    )(x, wt)
    return partials.sum(axis=0)[:m].astype(x.dtype)


def candidates(k, n):
    for bn in (64, 128):
        for splits in (1, 2, 5, 10):
            for warps, stages in ((4, 5), (2, 4), (8, 4)):
                if n % bn == 0 and 50 <= (n // bn) * splits <= 800 and (k // 64) % splits == 0:
                    yield Tiling(bn, 64, splits, warps, stages)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--weight_mb", type=float, default=400)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": args.rows, "shapes": {}}
    key = jax.random.key(0)
    for name, (k, n) in SHAPES.items():
        if name == "down":
            continue  # the same shape as o
        copies = max(2, int(args.weight_mb * 1e6 // (k * n * 2)))
        x = jax.random.normal(key, (args.rows, k), jnp.bfloat16)
        ws = [jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.bfloat16) * 0.02 for i in range(copies)]
        t = pick_tiling(args.rows, k, n)
        wbs = [blocked(w, t.block_n) for w in ws]
        ref = jnp.dot(x, ws[0], preferred_element_type=jnp.float32)
        err = jnp.abs(blocked_matmul(x, wbs[0], t).astype(jnp.float32) - ref).max() / jnp.abs(ref).max()
        row = {"tiling": str(t), "blocked_rel_err": float(err),
               "read_all_tb_s": bandwidth(lambda x, w: w.sum(axis=0, dtype=jnp.float32), x, ws),
               "row_major_tb_s": bandwidth(lambda x, w: pallas_matmul(x, w, t), x, ws),
               "blocked_tb_s": bandwidth(lambda x, w: blocked_matmul(x, w, t), x, wbs)}
        del wbs
        wts = [w.T.copy() for w in ws]
        err = jnp.abs(transposed_matmul(x, wts[0], t).astype(jnp.float32) - ref).max() / jnp.abs(ref).max()
        row["transposed_rel_err"] = float(err)
        row["transposed_tb_s"] = bandwidth(lambda x, w: transposed_matmul(x, w, t), x, wts)
        if args.sweep:
            best = []
            for c in candidates(k, n):
                try:
                    best.append((bandwidth(lambda x, w, c=c: transposed_matmul(x, w, c), x, wts), str(c)))
                except Exception as e:  # a tiling Triton cannot compile: skip it
                    best.append((0.0, f"{c}: {type(e).__name__}"))
            row["transposed_sweep_top"] = sorted(best, reverse=True)[:6]
        del wts
        print(name, json.dumps(row), flush=True)
        if args.sweep:
            best = []
            for c in candidates(k, n):
                cw = [blocked(w, c.block_n) for w in ws]
                try:
                    best.append((bandwidth(lambda x, w, c=c: blocked_matmul(x, w, c), x, cw), str(c)))
                except Exception as e:  # a tiling Triton cannot compile: skip it
                    best.append((0.0, f"{c}: {type(e).__name__}"))
                del cw
            row["blocked_sweep_top"] = sorted(best, reverse=True)[:6]
            print(name, "sweep", json.dumps(row["blocked_sweep_top"]), flush=True)
        out["shapes"][name] = row
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
