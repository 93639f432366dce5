"""Decoding throughput with memory, without memory, and RAG, under the paper's protocol (Table 21).

    python benchmarks/decode_gpu.py [--config m3_2p4b] [--batch 32] [--refs 4096] [--json out.json] [--attention auto]
                                    [--sink_in_stream] [--compare_sink] [--profile_dir DIR]

Batch 32, 128 prompt tokens, 128 new tokens, random weights of the config's shape (bf16 parameters
and compute), greedy. With memory: 3 retrievals per sequence (the prompt's 2 chunks, then once after
64 new tokens), 5 references each, BM25 over the references' texts, memories read from a bank on disk
with the RAM cache off (capacity 0). RAG: the references the prompt's chunks retrieve (10, whole, as
text) in front of the prompt. tokens/s = batch x new tokens / wall time of `generate` (retrieval,
bank reads, prefill and decoding), the median of --reps runs after a warmup run that compiles.

With --profile_dir, one `generate` per mode (and one with a single new token: the prefill) is traced
afterwards: the GPU kernels' time per kind, to see where a mode's device time goes (what memory adds).
With --sink_in_stream, every prefill computes the sink again (`Generator(sink_apart=False)`);
--compare_sink then times the stream without memory both ways, interleaved, on the same machine.

Stream: `generate_many` over --stream_batches batches of --batch prompts, --in_flight at a time, so one
batch's host work (BM25, bank reads) overlaps another's decoding; tokens/s = all new tokens / wall time.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np

import gpu_trace  # benchmarks/, beside this script

from m3jax import config as config_lib
from m3jax.checkpoint import load_model
from m3jax.generate.generator import Generator
from m3jax.generate.memory_source import MemorySource
from m3jax.memory.bank import MemoryBank
from m3jax.memory.build import build_bank
from m3jax.memory.cache import CachedBankReader
from m3jax.retrieval.bm25 import BM25Retriever


def words(ids) -> str:
    """Token ids as text BM25 can index: one pseudo-word per id."""
    return " ".join(f"w{int(i)}" for i in ids)


def _union(intervals) -> list:
    merged = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def timeline(generations, start: float) -> dict:
    """Where a stream's wall time went: host retrieval, the device phases (prefill and decoding, as seen
    from the host), and how long retrieval ran while some batch was on the device."""
    events = [(i, phase, a - start, b - start) for i, g in enumerate(generations) for phase, a, b in g.events]
    host = _union([(a, b) for _, phase, a, b in events if phase == "retrieval"])
    device = _union([(a, b) for _, phase, a, b in events if phase != "retrieval"])
    both = sum(max(0.0, min(b, d) - max(a, c)) for a, b in host for c, d in device)
    return {"retrieval_s": _length(host), "device_s": _length(device), "overlap_s": both,
            "events": [[i, phase, round(a, 4), round(b, 4)] for i, phase, a, b in events]}


def compare_sink(generator, stream, args) -> dict:
    """Tokens/s of the stream without memory with the sink apart and in the stream, alternating (3 each)."""
    out, default = {"apart": [], "in_stream": []}, generator.sink_apart
    try:
        for variant in ("in_stream", "apart") * 3:
            generator.sink_apart = variant == "apart" and default
            generator.generate(stream[0], args.new_tokens, mode="none")  # compiles the other prefill once
            start = time.perf_counter()
            generator.generate_many(stream, args.new_tokens, mode="none", in_flight=args.in_flight)
            out[variant].append(len(stream) * args.batch * args.new_tokens / (time.perf_counter() - start))
    finally:
        generator.sink_apart = default
    print("stream without memory by sink", json.dumps(out), flush=True)
    return out


def run(args) -> dict:
    cfg = config_lib.load(args.config, {"model.dtype": "bfloat16", "model.param_dtype": "bfloat16",
                                        "model.attention": args.attention})
    model = load_model(cfg, "random:0")
    rng = np.random.default_rng(0)
    ref_len = cfg.memory.reference_len
    # A vocabulary slice shared by prompts and references, so that BM25 finds matches.
    ref_tokens = rng.integers(5, 5 + 4 * ref_len, (args.refs, ref_len))
    ref_lengths = np.full(args.refs, ref_len)
    prompts = rng.integers(5, 5 + 4 * ref_len, (args.batch, args.prompt_len)).tolist()
    stream = [rng.integers(5, 5 + 4 * ref_len, (args.batch, args.prompt_len)).tolist()
              for _ in range(args.stream_batches)]
    path = tempfile.mkdtemp(prefix="decode_bank_")
    result = {"config": args.config, "device": jax.devices()[0].device_kind, "batch": args.batch,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "references": args.refs,
              "jax": jax.__version__}
    try:
        t0 = time.perf_counter()
        build_bank(model, ref_tokens, ref_lengths, path, batch_size=256, progress=False)
        result["bank_build_s"] = time.perf_counter() - t0
        reader = CachedBankReader(MemoryBank.open(path), capacity=0)  # cache off: every read goes to the bank
        source = MemorySource(cfg, BM25Retriever.build([words(r) for r in ref_tokens], stopwords=None), reader,
                              ref_tokens, ref_lengths, words)
        # random weights: never stop early
        generator = Generator(model, source, eos_id=-1, sink_apart=not args.sink_in_stream)
        result["sink_apart"] = generator.sink_apart
        for mode in ("none", "memory", "rag"):
            generator.generate(prompts, args.new_tokens, mode=mode)  # compile
            times, parts = [], []
            for _ in range(args.reps):
                start = time.perf_counter()
                out = generator.generate(prompts, args.new_tokens, mode=mode)
                times.append(time.perf_counter() - start)
                parts.append(out.seconds)
            best = statistics.median(times)
            result[mode] = {"seconds": best, "tokens_per_s": args.batch * args.new_tokens / best,
                            "retrievals_per_sequence": sum(r.shape[1] if r.ndim == 3 else 1 for r in out.retrievals),
                            "prompt_tokens": max(len(p) for p in out.prompts),
                            "seconds_parts": {k: statistics.median(p[k] for p in parts) for k in parts[0]}}
            start = time.perf_counter()
            outs = generator.generate_many(stream, args.new_tokens, mode=mode, in_flight=args.in_flight)
            seconds = time.perf_counter() - start
            result[mode]["stream"] = {"batches": args.stream_batches, "seconds": seconds,
                                      "tokens_per_s": args.stream_batches * args.batch * args.new_tokens / seconds,
                                      **timeline(outs, start)}
            print(mode, json.dumps({k: v for k, v in result[mode].items() if k != "stream"}),
                  json.dumps({k: v for k, v in result[mode]["stream"].items() if k != "events"}), flush=True)
        if args.compare_sink:
            result["none"]["stream_by_sink"] = compare_sink(generator, stream, args)
        if args.profile_dir:
            for mode in ("none", "memory"):
                for name, new_tokens in (("profile", args.new_tokens), ("prefill_profile", 1)):
                    trace = f"{args.profile_dir}/{mode}_{name}"
                    generator.generate(prompts, new_tokens, mode=mode)  # compiles a new length outside the trace
                    with jax.profiler.trace(trace):
                        generator.generate(prompts, new_tokens, mode=mode)
                    result[mode][name] = gpu_trace.busy(gpu_trace.kernel_events(trace)[0], 1)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    result["memory_over_none"] = result["memory"]["tokens_per_s"] / result["none"]["tokens_per_s"]
    result["memory_over_rag"] = result["memory"]["tokens_per_s"] / result["rag"]["tokens_per_s"]
    speed = {mode: result[mode]["stream"]["tokens_per_s"] for mode in ("none", "memory", "rag")}
    result["stream_memory_over_none"] = speed["memory"] / speed["none"]
    result["stream_memory_over_rag"] = speed["memory"] / speed["rag"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="m3_2p4b")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--refs", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--stream_batches", type=int, default=6)
    parser.add_argument("--in_flight", type=int, default=2)
    parser.add_argument("--attention", default="auto", help="model.attention: the prompt's attention kernel")
    parser.add_argument("--sink_in_stream", action="store_true", help="compute the sink with every prompt")
    parser.add_argument("--compare_sink", action="store_true", help="also time the stream without memory both ways")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile_dir", default=None, help="trace one generate per mode and report its kernels")
    args = parser.parse_args()
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k not in ("none", "memory", "rag")}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
