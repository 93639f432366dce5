"""The sharded stage-2 train step on several GPUs of one host vs one GPU, and tokens/s per GPU.

    python benchmarks/multi_gpu_step.py [--config small] [--batch 8] [--steps 20]

Each mesh runs in its own process: one GPU (CUDA_VISIBLE_DEVICES=0, mesh (1,1,1)), then all GPUs as
data parallel (n,1,1) and as FSDP (1,n,1). Same seed, same batch of random tokens and references;
after two steps the loss, gradient norm and parameter updates are compared with the one-GPU run (bf16
compute, so agreement is to bf16 rounding), then `--steps` more steps are timed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def child(args, mesh, out_path) -> None:
    import jax

    from m3jax import config as config_lib
    from m3jax.train.loop import _init_state, _setup

    cfg = config_lib.load(args.config, {"train.batch_size": args.batch, "train.stage": 2, "train.warmup_steps": 1,
                                        "train.mesh": mesh, "model.dtype": "bfloat16"})
    _, tx, step_fn, state_sh, batch_sh, _ = _setup(cfg)
    state = _init_state(cfg, tx, state_sh)
    rng = np.random.default_rng(0)
    t, length = cfg.data.seq_len, cfg.memory.reference_len
    chunks = t // cfg.memory.chunk_len
    data = jax.device_put({
        "tokens": rng.integers(5, cfg.model.vocab_size, (args.batch, t)).astype(np.int32),
        "ref_tokens": rng.integers(5, cfg.model.vocab_size, (args.batch, chunks, length)).astype(np.int32),
        "ref_lengths": rng.integers(1, length + 1, (args.batch, chunks)).astype(np.int32)}, batch_sh)
    initial = [np.asarray(p, np.float32) for p in jax.tree.leaves(jax.device_get(state["params"]))]
    for _ in range(2):  # the first step's learning rate is 0 (warmup starts there): compare after two
        state, metrics = step_fn(state, data)
    params = jax.tree.leaves(jax.device_get(state["params"]))
    np.savez(out_path, loss=float(metrics["loss"]), grad_norm=float(metrics["grad_norm"]),
             **{f"p{i}": np.asarray(p, np.float32) - p0 for i, (p, p0) in enumerate(zip(params, initial))})
    for _ in range(2):
        state, metrics = step_fn(state, data)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step_fn(state, data)
    jax.block_until_ready(state)
    seconds = (time.perf_counter() - start) / args.steps
    print(json.dumps({"mesh": mesh, "devices": jax.device_count(), "device": jax.devices()[0].device_kind,
                      "ms_per_step": seconds * 1e3, "tokens_per_s": args.batch * t / seconds,
                      "tokens_per_s_per_gpu": args.batch * t / seconds / jax.device_count()}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.child:
        child(args, tuple(json.loads(args.child)), args.out)
        return
    import jax

    n = jax.device_count()
    one = {"CUDA_VISIBLE_DEVICES": "0",  # (and one host device when this runs on the CPU, as a dry run)
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "").replace(f"device_count={n}", "device_count=1")}
    runs = {"1 GPU": ((1, 1, 1), one), f"{n} GPUs, data": ((n, 1, 1), {}),
            f"{n} GPUs, fsdp": ((1, n, 1), {})}
    tmp = tempfile.mkdtemp()
    results = {}
    for name, (mesh, env) in runs.items():
        path = os.path.join(tmp, f"{len(results)}.npz")
        cmd = [sys.executable, __file__, "--config", args.config, "--batch", str(args.batch), "--steps",
               str(args.steps), "--child", json.dumps(mesh), "--out", path]
        out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=False)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if not lines:
            print(name, "failed:", out.stderr[-3000:])
            continue
        results[name] = (json.loads(lines[-1]), dict(np.load(path)))
    ref = results["1 GPU"][1]
    keys = [k for k in ref if k.startswith("p")]
    for name, (timing, arrays) in results.items():
        # How much of the parameter update differs from the one-GPU update (relative L2 over all params).
        diff = np.sqrt(sum(float(np.sum((arrays[k] - ref[k]) ** 2)) for k in keys) /
                       sum(float(np.sum(ref[k] ** 2)) for k in keys))
        print(json.dumps({"run": name, **timing, "loss": float(arrays["loss"]), "grad_norm": float(arrays["grad_norm"]),
                          "loss_vs_1gpu": float(arrays["loss"] - ref["loss"]),
                          "grad_norm_rel_vs_1gpu": float(arrays["grad_norm"] / ref["grad_norm"] - 1),
                          "update_rel_diff_vs_1gpu": float(diff)}))


if __name__ == "__main__":
    main()
