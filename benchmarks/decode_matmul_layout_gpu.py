"""Does the split-K decode matmul read weights faster when each program's block is contiguous in memory?

    python benchmarks/decode_matmul_layout_gpu.py [--rows 32] [--sweep] [--json FILE]

A row-major (k, n) weight gives each program (k / splits) rows of block_n columns: 128-256-byte pieces
n * 2 bytes apart. The blocked layout (n / block_n, k, block_n) makes that block one contiguous range;
the transposed one (n, k) makes each of its rows contiguous along the reduction.
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


LAYOUTS = ("blocked", "transposed")


def laid_out(w, layout: str, block_n: int):
    """w (k, n) as "blocked" (n / block_n, k, block_n) or "transposed" (n, k)."""
    k, n = w.shape
    if layout == "blocked":
        return w.reshape(k, n // block_n, block_n).transpose(1, 0, 2)
    return w.T.copy()


def _transposed_kernel(x_ref, w_ref, o_ref, *, block_k: int, steps: int):
    """decode_matmul's kernel over a (block_n, k-part) block of transposed weights."""
    from jax.experimental import pallas as pl

    def body(i, acc):
        ks = pl.ds(i * block_k, block_k)
        return acc + jax.lax.dot_general(x_ref[:, ks], w_ref[:, ks], (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)

    o_ref[...] = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))


@functools.partial(jax.jit, static_argnames=("tiling", "layout", "interpret"))
def layout_matmul(x, w, tiling: Tiling, layout: str, interpret: bool = False):
    """x @ the (k, n) weight that `laid_out(., layout, tiling.block_n)` gave as w: the split-K kernel, each
    program reading its block in that layout."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    m, k = x.shape
    rows = dot_rows(m)
    bn, bk, s = tiling.block_n, tiling.block_k, tiling.splits
    part = k // s
    if layout == "blocked":
        n, kernel, w_spec = w.shape[0] * bn, _kernel, pl.BlockSpec((None, part, bn), lambda j, i: (j, i, 0))
    else:
        n, kernel, w_spec = w.shape[0], _transposed_kernel, pl.BlockSpec((bn, part), lambda j, i: (j, i))
    partials = pl.pallas_call(
        functools.partial(kernel, block_k=bk, steps=part // bk),
        grid=(n // bn, s),
        in_specs=[pl.BlockSpec((rows, part), lambda j, i: (0, i)), w_spec],
        out_specs=pl.BlockSpec((None, rows, bn), lambda j, i: (i, 0, j)),
        out_shape=jax.ShapeDtypeStruct((s, rows, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name=f"decode_matmul_{layout}",
    )(x, w)
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
        ref = jnp.dot(x, ws[0], preferred_element_type=jnp.float32)
        row = {"tiling": str(t), "read_all_tb_s": bandwidth(lambda x, w: w.sum(axis=0, dtype=jnp.float32), x, ws),
               "row_major_tb_s": bandwidth(lambda x, w: pallas_matmul(x, w, t), x, ws)}
        for layout in LAYOUTS:
            cache = {}  # one copy of the weights per layout that differs (blocked: per block_n)

            def weights(block_n, layout=layout, cache=cache):
                key = block_n if layout == "blocked" else None
                if key not in cache:
                    cache[key] = [laid_out(w, layout, block_n) for w in ws]
                return cache[key]
            got = layout_matmul(x, weights(t.block_n)[0], t, layout).astype(jnp.float32)
            row[f"{layout}_rel_err"] = float(jnp.abs(got - ref).max() / jnp.abs(ref).max())
            row[f"{layout}_tb_s"] = bandwidth(lambda x, w: layout_matmul(x, w, t, layout), x, weights(t.block_n))
            if args.sweep:
                best = []
                for c in candidates(k, n):
                    try:
                        best.append((bandwidth(lambda x, w, c=c: layout_matmul(x, w, c, layout), x,
                                               weights(c.block_n)), str(c)))
                    except Exception as e:  # a tiling Triton cannot compile: skip it
                        best.append((0.0, f"{c}: {type(e).__name__}"))
                row[f"{layout}_sweep_top"] = sorted(best, reverse=True)[:6]
            cache.clear()
        print(name, json.dumps(row), flush=True)
        out["shapes"][name] = row
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
