"""Milliseconds per decoding step of `m3_2p4b`-shaped random weights, batch 32, under XLA flag variants,
and how busy the GPU is during a step.

    python benchmarks/decode_step_gpu.py [--config m3_2p4b] [--variants a,b] [--batch 32] [--profile_dir DIR]

Variants: XLA flags, model config fields (decode kernels on or off), or decode-matmul tilings (TILINGS).

Each variant runs in its own process (XLA flags are read once per process). Steps = 127 (128 new
tokens, no memory); the weight bytes read per step give the bandwidth bound. With --profile_dir, each
variant is traced once more: the share of the decode wall time in which a GPU kernel runs, and the
kernels taking the most time per step.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time

import gpu_trace  # benchmarks/, beside this script

CMD_ALL = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
VARIANTS = {  # name: XLA flags, or (XLA flags, model config overrides)
    "default": "",
    "xla_matmul": ("", {"decode_matmul": "xla"}),
    "pallas_matmul": ("", {"decode_matmul": "pallas"}),
    "xla_attention": ("", {"decode_attention": "xla"}),
    "xla_both": ("", {"decode_matmul": "xla", "decode_attention": "xla"}),
    "no_command_buffers": "--xla_gpu_enable_command_buffer=",
    "command_buffers_with_loops": f"--xla_gpu_enable_command_buffer={CMD_ALL} --xla_gpu_graph_min_graph_size=1",
    "cublas": "--xla_gpu_enable_triton_gemm=false",
    # CUDA graphs for shorter runs of kernels: the Pallas kernels split a layer's fusions into runs of 1-2.
    "graphs_min_1": "--xla_gpu_graph_min_graph_size=1",
    "graphs_min_2": "--xla_gpu_graph_min_graph_size=2",
    # Programmatic Dependent Launch: a kernel's blocks start while the previous kernel drains (Hopper)
    "pdl_on": "--xla_gpu_enable_pdl=true",
    "pdl_off": "--xla_gpu_enable_pdl=false",
    # the decode kernels without their early griddepcontrol.launch_dependents (decode_matmul.EARLY_LAUNCH)
    "no_early_launch": ("", {"_set": {"decode_matmul.EARLY_LAUNCH": False}}),
    # without (or with other amounts of) the L2 prefetch of later products' first rows, or with one site of it
    "no_l2_prefetch": ("", {"_set": {"l2_prefetch.ROWS": 0}}),
    "l2_prefetch_64": ("", {"_set": {"l2_prefetch.ROWS": 64}}),
    "l2_prefetch_256": ("", {"_set": {"l2_prefetch.ROWS": 256}}),
    "l2_prefetch_192": ("", {"_set": {"l2_prefetch.ROWS": 192}}),
    "l2_prefetch_norm_only": ("", {"_set": {"l2_prefetch.SITES": ["norm"]}}),
    "l2_prefetch_product_only": ("", {"_set": {"l2_prefetch.SITES": ["product"]}}),
}
# Decode-matmul tilings tried inside the step (the kernel's own sweep, decode_matmul_gpu.py, times one
# product alone): "KxN" -> Tiling fields for that weight shape, "all" -> fields replaced in every pick,
# "blocks_wanted" -> pick_tiling's target of programs per product, "tuned" -> its argument.
TILINGS = {
    "qkv_n64": {"3200x4480": [64, 64, 5]},
    "qkv_n64_s2": {"3200x4480": [64, 64, 2]},
    "qkv_n64_s10": {"3200x4480": [64, 64, 10]},
    "qkv_n32": {"3200x4480": [32, 64, 5]},
    "qkv_n64_w2": {"3200x4480": [64, 64, 5, 2]},
    "qkv_n64_w8": {"3200x4480": [64, 64, 5, 8]},
    "qkv_n64_st4": {"3200x4480": [64, 64, 5, 4, 4]},
    "qkv_n64_w2_st4": {"3200x4480": [64, 64, 5, 2, 4]},
    "qkv_n64_k32": {"3200x4480": [64, 32, 5]},
    "head_n64": {"3200x60416": [64, 64, 1]},
    "head_s2": {"3200x60416": [128, 64, 2]},
    "square_n64_s2": {"3200x3200": [64, 64, 2]},
    "square_s10": {"3200x3200": [128, 64, 10]},
    "gate_up_n64_s2": {"3200x6400": [64, 64, 2]},
    "square_w2_st4": {"3200x3200": [128, 64, 5, 2, 4]},
    "gate_up_w2_st4": {"3200x6400": [128, 64, 2, 2, 4]},
    "head_w2_st4": {"3200x60416": [128, 64, 1, 2, 4]},
    "all_w2_st4": {"all": {"num_warps": 2, "num_stages": 4}},
    # o and down without split-K (what an epilogue finishing h would need): 100 / 50 programs
    "square_n32_s1": {"3200x3200": [32, 64, 1]},
    "square_n32_s1_w2": {"3200x3200": [32, 64, 1, 2]},
    "square_n64_s1": {"3200x3200": [64, 64, 1]},
    "square_n16_s1": {"3200x3200": [16, 64, 1, 2]},
    "untuned": {"tuned": False},  # the rule alone, without decode_matmul.TUNED
    "blocks_250": {"blocks_wanted": 250},
    "blocks_350": {"blocks_wanted": 350},
    "warps_8": {"all": {"num_warps": 8}},
    "stages_3": {"all": {"num_stages": 3}},
}
for _name, _spec in TILINGS.items():
    VARIANTS[_name] = ("", {"_tiling": _spec})


def use_tilings(spec: dict) -> None:
    """Make decode_matmul.pick_tiling return the tilings of `spec` (see TILINGS) in this process."""
    from m3jax.model import decode_matmul as dm

    chosen = dm.pick_tiling

    def pick(m, k, n, blocks_wanted=100, tuned=True):
        tiling = chosen(m, k, n, spec.get("blocks_wanted", blocks_wanted), spec.get("tuned", tuned))
        if tiling is None:
            return None
        tiling = tiling._replace(**spec.get("all", {}))
        return dm.Tiling(*spec[f"{k}x{n}"]) if f"{k}x{n}" in spec else tiling

    dm.pick_tiling = pick


def gpu_busy(trace_dir: str, steps: int) -> dict:
    kernels, processes = gpu_trace.kernel_events(trace_dir)
    return {"gpu_processes": processes, **gpu_trace.busy(kernels, steps)}


def child(config: str, profile_dir: str | None, overrides: dict, batch: int = 32) -> dict:
    import jax
    import numpy as np

    from m3jax import config as config_lib
    from m3jax.checkpoint import load_model
    from m3jax.generate.generator import Generator

    overrides = dict(overrides)
    if "_tiling" in overrides:
        use_tilings(overrides.pop("_tiling"))
    for name, value in overrides.pop("_set", {}).items():  # module constants of m3jax.model, "module.NAME"
        module, attr = name.rsplit(".", 1)
        setattr(importlib.import_module(f"m3jax.model.{module}"), attr, value)
    cfg = config_lib.load(config, {"model.dtype": "bfloat16", "model.param_dtype": "bfloat16",
                                   **{f"model.{k}": v for k, v in overrides.items()}})
    model = load_model(cfg, "random:0")
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(model))
    prompts = np.random.default_rng(0).integers(5, 500, (batch, 128)).tolist()
    gen = Generator(model, eos_id=-1)
    t0 = time.perf_counter()
    gen.generate(prompts, 128, mode="none")
    compile_s = time.perf_counter() - t0
    times = [gen.generate(prompts, 128, mode="none").seconds["decode"] for _ in range(5)]
    ms = 1e3 * sorted(times)[2] / 127
    out = {"ms_per_step": ms, "batch": batch, "tokens_per_s": batch / ms * 1e3, "first_call_s": compile_s,
           "weight_gb": weight_bytes / 1e9, "weight_read_tb_per_s": weight_bytes / ms / 1e9}
    if profile_dir:
        with jax.profiler.trace(profile_dir):
            gen.generate(prompts, 128, mode="none")
        out["profile"] = gpu_busy(profile_dir, 128)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="m3_2p4b")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--profile_dir", default=None)
    parser.add_argument("--batch", type=int, default=32, help="sequences decoded together")
    parser.add_argument("--child", default=None)
    parser.add_argument("--overrides", default="{}", help="model config fields, as JSON")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.config, args.profile_dir, json.loads(args.overrides), args.batch)))
        return
    for i, name in enumerate(args.variants.split(",")):
        flags, overrides = VARIANTS[name] if isinstance(VARIANTS[name], tuple) else (VARIANTS[name], {})
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        cmd = [sys.executable, __file__, "--config", args.config, "--child", name, "--overrides", json.dumps(overrides),
               "--batch", str(args.batch)]
        if args.profile_dir:
            cmd += ["--profile_dir", os.path.join(args.profile_dir, f"{name}_{i}")]
        out = subprocess.run(cmd, env=env, check=False, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        print(name, lines[-1] if lines else out.stderr[-3000:], flush=True)


if __name__ == "__main__":
    main()
