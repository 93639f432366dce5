"""The prompt's attention kernel alone, `m3_2p4b` shape (batch 32, 40/8 heads of dim 80), over stream lengths
around the decoding benchmark's 132 positions (4 sink + 128 prompt tokens): does cuDNN's fused kernel pay
for a length that is not a multiple of its tiles, and would padding the stream for it pay?

    python benchmarks/prefill_attention_gpu.py [--lengths 128,132,136,192,256] [--layers 8]

One jitted call runs `--layers` attention calls, each with its own q, k, v (as a prefill's layers have),
in the causal mode with per-row key lengths that `attention.attend` uses. Microseconds per call are GPU
kernel time from a profiler trace (the attention kernel and whatever XLA adds around it). "padded_to_N":
the 132-position stream padded with masked positions to N before the call and cut back after.
"sink_apart": 128 prompt positions in the fused kernel (with its log-sum-exp) and the 4 sink keys merged
by log-sum-exp (`split_attention.attention_after_sink`): what the 136-position stream (4 sink + 128 prompt
tokens, padded to a multiple of 8) becomes with the sink apart; "merge": by the memory merge kernel
(generation's way on a GPU) or by XLA's passes.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

import gpu_trace  # benchmarks/, beside this script
from m3jax.model import split_attention
from m3jax.model.masks import AttentionMask
from m3jax.model.split_attention import attention_after_sink

B, HQ, HKV, D = 32, 40, 8, 80


def us_per_call(length: int, layers: int, pad_to: int | None = None, reps: int = 10, sink: int = 0) -> float:
    ks = jax.random.split(jax.random.key(length), 3)
    qs = jax.random.normal(ks[0], (layers, B, length, HQ, D), jnp.bfloat16)
    kvs = jax.random.normal(ks[1], (layers, 2, B, length, HKV, D), jnp.bfloat16)
    lengths = jnp.full((B,), length, jnp.int32)
    sink_kv = jax.random.normal(ks[2], (2, sink, HKV, D), jnp.bfloat16)

    def attend(q, k, v):
        if sink:
            return attention_after_sink(q, k, v, AttentionMask(lengths), sink_kv[0], sink_kv[1], "cudnn")
        if pad_to:
            pad = [(0, 0), (0, pad_to - length), (0, 0), (0, 0)]
            q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths,
                                           implementation="cudnn")
        return out[:, :length]

    def run(qs, kvs):
        return [attend(qs[i], kvs[i, 0], kvs[i, 1]) for i in range(layers)]

    run = jax.jit(run)
    jax.block_until_ready(run(qs, kvs))
    us, _ = gpu_trace.kernel_us(lambda _: run(qs, kvs), None, reps)
    return us / layers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="128,132,136,144,192,256")
    parser.add_argument("--pad", default="136,144,192,256", help="pad the 132-position stream to these lengths")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--sink_apart", type=int, default=4, help="sink keys merged apart from 128 positions (0: skip)")
    args = parser.parse_args()
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    for length in map(int, args.lengths.split(",")):
        print(json.dumps({"length": length, "us_per_call": round(us_per_call(length, args.layers), 2)}), flush=True)
    for pad_to in map(int, filter(None, args.pad.split(","))):
        us = us_per_call(132, args.layers, pad_to)
        print(json.dumps({"length": 132, "padded_to": pad_to, "us_per_call": round(us, 2)}), flush=True)
    if args.sink_apart:
        default = split_attention.SINK_MERGE_BY_KERNEL
        for merge in ("kernel", "xla"):
            split_attention.SINK_MERGE_BY_KERNEL = merge == "kernel"
            us = us_per_call(128, args.layers, sink=args.sink_apart)
            print(json.dumps({"length": 128, "sink_apart": args.sink_apart, "merge": merge,
                              "us_per_call": round(us, 2)}), flush=True)
        split_attention.SINK_MERGE_BY_KERNEL = default


if __name__ == "__main__":
    main()
