"""Train-step throughput and MFU of both stages on whatever accelerator JAX sees.

    python benchmarks/train_step_gpu.py --config m3_0p92b --batch 8 --remat nothing_saveable

Stage 1 (plain LM), stage 2 with gradients through the reference encoding, and stage 2 without, at
equal batch and sequence length; random weights and tokens. MFU counts, per token, 6 x (non-embedding
parameters + LM head) plus causal attention 6 x layers x T x heads x head_dim (MaxText's convention),
over the bf16 peak; the reference encoding of stage 2 is extra work that MFU does not credit.

--attention takes a comma-separated list (e.g. auto,cudnn_split): each stage with memory is timed under
each; stage 1 reads no memory, so it runs once. With --profile_dir, each timed step is traced over two
more steps and its kernel time split by named scope (writing/reading, forward/backward, attention,
sparsification, MLP; benchmarks/gpu_trace.py), written to DIR/profile.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

import gpu_trace  # benchmarks/, beside this script

from m3jax import config as config_lib
from m3jax.sizes import parameter_counts
from m3jax.train.loop import _init_state, _setup


def model_flops_per_token(cfg) -> float:
    m = cfg.model
    dense = parameter_counts(cfg)["non_embedding"] + m.hidden_size * config_lib.padded_vocab_size(m)
    attention = 6 * m.num_layers * cfg.data.seq_len * m.num_heads * m.head_dim  # causal: half of 12 L T d
    return 6 * dense + attention


def time_stage(name, overrides, batch, reps, profile_dir=None):
    cfg = config_lib.load(name, {"train.batch_size": batch, "train.warmup_steps": 1, **overrides})
    graphdef, tx, step_fn, state_sh, batch_sh, _ = _setup(cfg)
    state = _init_state(cfg, tx, state_sh)
    rng = np.random.default_rng(0)
    t, chunks, length = cfg.data.seq_len, cfg.data.seq_len // cfg.memory.chunk_len, cfg.memory.reference_len
    data = {"tokens": rng.integers(0, cfg.model.vocab_size, (batch, t)).astype(np.int32)}
    if cfg.train.stage == 2:
        data["ref_tokens"] = rng.integers(5, cfg.model.vocab_size, (batch, chunks, length)).astype(np.int32)
        data["ref_lengths"] = np.full((batch, chunks), length, np.int32)
    data = jax.device_put(data, batch_sh)
    step_fn = step_fn.lower(state, data).compile()  # compiled once; its HLO text names the profile's kernels
    for _ in range(2):  # warm up
        state, metrics = step_fn(state, data)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(reps):
        state, metrics = step_fn(state, data)
    jax.block_until_ready(state)
    seconds = (time.perf_counter() - start) / reps
    loss = float(metrics["loss"])
    profile = None
    if profile_dir:
        with jax.profiler.trace(profile_dir):
            for _ in range(2):
                state, metrics = step_fn(state, data)
            jax.block_until_ready(state)
        hlo = step_fn.as_text()
        kernels, _ = gpu_trace.kernel_events(profile_dir)
        profile = ({**gpu_trace.by_scope(kernels, hlo, 2), **gpu_trace.busy(kernels, 2)} if kernels else
                   {"ms_per_step": {}, "error": "no GPU kernels in the trace"})
    return cfg, seconds, loss, profile


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="m3_0p92b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--remat", default="nothing_saveable")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--peak_tflops", type=float, default=790.0)
    parser.add_argument("--attention", default="auto", help="model.attention values, comma-separated")
    parser.add_argument("--stages", default="stage1,stage2,stage2_no_grads", help="which steps to time")
    parser.add_argument("--profile_dir", default=None, help="trace each step here, and summarize the traces")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, devices {jax.devices()}")
    base = {"model.remat": args.remat}
    steps = {"stage1": ("stage 1", {}), "stage2": ("stage 2, grads through references", {"train.stage": 2}),
             "stage2_no_grads": ("stage 2, no grads through references",
                                 {"train.stage": 2, "memory.grad_through_references": False})}
    rows, profiles = [], {}
    for attention in args.attention.split(","):
        for name in args.stages.split(","):
            if name == "stage1" and attention != args.attention.split(",")[0]:
                continue  # no memory: the attention choice for memory does not apply
            label, extra = steps[name]
            label = f"{label} ({attention})"
            trace = os.path.join(args.profile_dir, f"{name}_{attention}") if args.profile_dir else None
            overrides = {**base, "model.attention": attention, **extra}
            cfg, seconds, loss, profile = time_stage(args.config, overrides, args.batch, args.reps, trace)
            tokens = args.batch * cfg.data.seq_len
            mfu = tokens * model_flops_per_token(cfg) / seconds / (args.peak_tflops * 1e12)
            rows.append((label, seconds, tokens / seconds, mfu, loss))
            print(f"{label}: {seconds * 1e3:.0f} ms, loss {loss:.4f}", flush=True)
            if profile:
                profiles[label] = profile
                print(json.dumps(profile["ms_per_step"], indent=1), flush=True)
    print(f"\n{args.config}, batch {args.batch} x {cfg.data.seq_len}, remat {args.remat}\n")
    print("| step | ms | tokens/s | MFU | vs stage 1 |\n|---|---|---|---|---|")
    for label, seconds, rate, mfu, loss in rows:
        print(f"| {label} | {seconds * 1e3:.0f} | {rate:,.0f} | {mfu:.1%} | {seconds / rows[0][1]:.2f}x |")
    if profiles:
        with open(os.path.join(args.profile_dir, "profile.json"), "w") as f:
            json.dump(profiles, f, indent=1)

if __name__ == "__main__":
    main()
