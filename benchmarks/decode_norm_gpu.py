"""Microseconds per residual add + RMSNorm of decoding (`m3jax/model/decode_norm.py`): the Pallas kernel
at several warp counts against XLA's fusions, at `m3_2p4b`'s shape (batch 32, dim 3200, 5 partial sums).

    python benchmarks/decode_norm_gpu.py [--calls 88] [--splits 5]

One jitted call chains `--calls` add-and-norms (each reads the previous one's output and its own
partials, as a decoding step's 88 do); the figure is the median wall time of 20 calls over `--calls`.
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3jax.model import decode_norm
from m3jax.model.layers import RMSNorm


def chain(partials, h, norm, add):
    for p in partials:
        new_h, x = add(h, p, norm)
        h = x  # the next call reads this one's output, so the calls run one after another
    return new_h, x


def timed(fn, *args) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[10]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=88)
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--dim", type=int, default=3200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    partials = [jnp.asarray(rng.normal(size=(args.splits, args.rows, args.dim)), jnp.float32) for _ in range(args.calls)]
    h = jnp.asarray(rng.normal(size=(args.rows, 1, args.dim)), jnp.bfloat16)
    norm = RMSNorm(args.dim, eps=1e-5, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))

    def xla(h, p, norm):
        return decode_norm.add_and_norm(h, p, norm, "xla")

    def pallas(h, p, norm, warps):
        new_h, x = decode_norm.pallas_add_and_norm(p, h.reshape(-1, args.dim), norm.weight[...], eps=norm.eps,
                                                    out_dtype=jnp.dtype(norm.dtype), interpret=False, num_warps=warps)
        return new_h.reshape(h.shape), x.reshape(h.shape)

    variants = {"xla": xla, **{f"pallas_{w}_warps": functools.partial(pallas, warps=w) for w in (1, 2, 4, 8, 16)}}
    out = {"device": jax.devices()[0].device_kind, "calls": args.calls, "shape": [args.splits, args.rows, args.dim]}
    for name, add in variants.items():
        fn = jax.jit(lambda partials, h, add=add: chain(partials, h, norm, add))
        out[name + "_us"] = round(1e6 * timed(fn, partials, h) / args.calls, 2)
        print(name, out[name + "_us"], flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
