"""Milliseconds per prefill of `generate` (`m3_2p4b` shape, random bf16 weights, batch 32 x 128 prompt
tokens, no memory) and, with --profile_dir, the GPU kernels that take its time.

    python benchmarks/prefill_gpu.py [--config m3_2p4b] [--batch 32] [--prompt 128] [--attention auto]
                                     [--memory] [--sink_in_stream] [--compare_sink] [--profile_dir DIR]

Times `Generator.generate(prompts, 1, mode="none")`: the prompt read into the KV cache and the first new
token (its "prefill" seconds, no decoding loop); median of 10 calls after a compiling one.
--memory: also the generator's jitted prefill alone, without and with random memories already on the
device (each chunk reads refs_per_chunk x tokens_per_head of them at every memory layer): what memory
adds to the device's prefill, with no retrieval or bank read.
--sink_in_stream: every prefill computes the sink again (`Generator(sink_apart=False)`), as before the
sink's keys and values were computed once; --compare_sink times both, alternating, on the same machine.
"""
from __future__ import annotations

import argparse
import json

import jax
import numpy as np

import gpu_trace  # benchmarks/, beside this script
from m3jax import config as config_lib
from m3jax.checkpoint import load_model
from m3jax.generate.generator import Generator


def memory_prefill_ms(cfg, gen, prompts) -> dict:
    """The generator's jitted prefill (what `generate` calls) without and with memories, ms (median of 20)."""
    import jax.numpy as jnp

    from m3jax.generate.generator import cache_len
    from m3jax.model.lm import MemoryInputs
    from timing import median_seconds  # benchmarks/, beside this script

    m, mem = cfg.model, cfg.memory
    b, t = len(prompts), len(prompts[0])
    chunks = -(-t // mem.chunk_len)
    kv = jax.random.normal(jax.random.key(0), (b, chunks, mem.refs_per_chunk, mem.num_layers, 2, m.num_kv_heads,
                                               mem.tokens_per_head, m.head_dim), jnp.dtype(m.dtype))
    memory = MemoryInputs(kv, jnp.ones(kv.shape[:3] + kv.shape[6:7], bool))
    tokens, lengths = jnp.asarray(prompts, jnp.int32), jnp.full((b,), t, jnp.int32)
    positions = cache_len(cfg, t, 128)  # as generate(prompts, 128) allocates it

    def prefill(memory, slots):
        return gen._prefill(gen._weights, tokens, lengths, memory, gen._sink_keys_values(), cache_len=positions,
                            memory_slots=slots)
    return {"jitted_prefill_ms_no_memory": round(median_seconds(prefill, None, 0) * 1e3, 2),
            "jitted_prefill_ms_memory": round(median_seconds(
                prefill, memory, mem.refs_per_chunk * mem.tokens_per_head) * 1e3, 2)}


def compare_sink(gen, prompts, cfg=None) -> dict:
    """`generate`'s prefill ms (and with cfg, the jitted prefills') with the sink apart and in the stream,
    alternating."""
    out, default = {}, gen.sink_apart
    try:
        for variant in ("in_stream", "apart") * 2:
            gen.sink_apart = variant == "apart" and default
            gen.generate(prompts, 1, mode="none")  # compiles
            times = [gen.generate(prompts, 1, mode="none").seconds["prefill"] for _ in range(10)]
            out.setdefault(variant, []).append(round(float(np.median(times)) * 1e3, 2))
            if cfg:
                out.setdefault(f"{variant}_jitted", []).append(memory_prefill_ms(cfg, gen, prompts))
    finally:
        gen.sink_apart = default
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="m3_2p4b")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--attention", default="auto", help="model.attention: the prompt's attention kernel")
    parser.add_argument("--memory", action="store_true", help="also time the jitted prefill with random memories")
    parser.add_argument("--sink_in_stream", action="store_true", help="compute the sink with every prompt")
    parser.add_argument("--compare_sink", action="store_true", help="time the prefill both ways")
    parser.add_argument("--profile_dir", default=None)
    args = parser.parse_args()
    cfg = config_lib.load(args.config, {"model.dtype": "bfloat16", "model.param_dtype": "bfloat16",
                                        "model.attention": args.attention})
    gen = Generator(load_model(cfg, "random:0"), eos_id=-1, sink_apart=not args.sink_in_stream)
    prompts = np.random.default_rng(0).integers(5, 500, (args.batch, args.prompt)).tolist()
    gen.generate(prompts, 1, mode="none")  # compiles
    seconds = float(np.median([gen.generate(prompts, 1, mode="none").seconds["prefill"] for _ in range(10)]))
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "batch": args.batch,
           "prompt": args.prompt, "attention": args.attention, "sink_apart": gen.sink_apart,
           "prefill_ms": round(seconds * 1e3, 2)}
    if args.memory:
        out.update(memory_prefill_ms(cfg, gen, prompts))
    if args.compare_sink:
        out["prefill_ms_by_sink"] = compare_sink(gen, prompts, cfg if args.memory else None)
    if args.profile_dir:
        with jax.profiler.trace(args.profile_dir):
            gen.generate(prompts, 1, mode="none")
        kernels, _ = gpu_trace.kernel_events(args.profile_dir)
        out["profile"] = gpu_trace.busy(kernels, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
