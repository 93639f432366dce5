"""Greedy decoding's next-token choice after the LM head, `m3_2p4b` shape (32 rows, 60416 padded vocabulary):
GPU kernel time of `next_token` over the head's f32 partial sums, one pass against two (ARGMAX_CHUNK), and
the compiled HLO of the slowest kernel's fusion.

    python benchmarks/argmax_gpu.py [--chunks 0,128,512]
"""
from __future__ import annotations

import argparse
import collections
import tempfile

import jax
import jax.numpy as jnp

import gpu_trace  # benchmarks/, beside this script

from m3jax.generate import sampling

ROWS, WIDTH, VOCAB, REPS = 32, 60416, 60299, 20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", default="0,128,512")
    args = parser.parse_args()
    partials = jax.random.normal(jax.random.key(0), (1, ROWS, WIDTH), jnp.float32)
    for chunk in map(int, args.chunks.split(",")):
        sampling.ARGMAX_CHUNK = chunk
        step = jax.jit(lambda p: sampling.next_token(p.sum(axis=0)[:ROWS], None, VOCAB, 0.0, 1.0))
        want = jnp.argmax(partials[0, :, :VOCAB], axis=-1)
        assert (step(partials) == want).all()
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir):
                for _ in range(REPS):
                    out = step(partials)
                out.block_until_ready()
            kernels, _ = gpu_trace.kernel_events(trace_dir)
        per = collections.Counter()
        for e in kernels:
            per[e["name"]] += e["dur"] / REPS
        print(f"chunk {chunk}: {sum(per.values()):.1f} us per call", {k: round(v, 1) for k, v in per.items()}, flush=True)
        hlo = step.lower(partials).compile().as_text()
        slowest = max(per, key=per.get)
        for block in hlo.split("\n\n"):
            if slowest.replace("_", ".") in block.replace("_", "."):
                print(block[:1500])
                break


if __name__ == "__main__":
    main()
