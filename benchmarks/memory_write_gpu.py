"""Memory-writing throughput (references/s) with random weights, on whatever accelerator JAX sees.

    python benchmarks/memory_write_gpu.py --configs small m3_2p4b --batch 512 --build 4096

For each config: encoding alone (full 128-token references, jit-compiled, batches split over local
devices, dispatched back to back), then `build_bank` end to end into a local bf16 bank (encoding + host transfer + zarr writes), its
steady rate after the first batch (compilation and the weight fingerprint excluded).
FLOPs per reference are counted from the model shape (2 x parameters x tokens through the memory
layers, plus attention), to compare with the paper's 0.308 TFLOP and the chip's bf16 peak.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import jax
import numpy as np

from m3jax import config as config_lib
from m3jax.checkpoint import load_model
from m3jax.memory.build import build_bank
from m3jax.memory.write import MemoryWriter
from m3jax.sizes import parameter_counts


def flops_per_reference(cfg) -> float:
    m, mem = cfg.model, cfg.memory
    tokens = len(mem.reference_prefix_ids) + mem.reference_len
    per_layer = parameter_counts(cfg)["non_embedding"] / m.num_layers
    layers = mem.layer_start + mem.num_layers
    attention = 2 * 2 * tokens * tokens * m.num_heads * m.head_dim  # QK^T and PV, full (no causal saving)
    return layers * (2 * per_layer * tokens + attention)


def measure(name: str, batch: int, build: int, peak_tflops: float) -> dict:
    cfg = config_lib.load(name, {"model.dtype": "bfloat16"})
    model = load_model(cfg, "random:0")
    rng = np.random.default_rng(0)
    n = max(batch * 4, build)
    tokens = rng.integers(4, cfg.model.vocab_size, (n, cfg.memory.reference_len))
    lengths = np.full(n, cfg.memory.reference_len)
    writer = MemoryWriter(model, batch)
    writer(tokens[:batch], lengths[:batch])  # compile
    reps = 4
    start = time.perf_counter()  # batches back to back on the device, nothing brought back
    jax.block_until_ready([writer.dispatch(tokens[i * batch:(i + 1) * batch].astype(np.int32),
                                           lengths[i * batch:(i + 1) * batch].astype(np.int32)) for i in range(reps)])
    encode_rate = reps * batch / (time.perf_counter() - start)
    tflops = encode_rate * flops_per_reference(cfg) / 1e12
    out = {"config": name, "batch": batch, "encode_refs_per_s": encode_rate, "tflop_per_ref": flops_per_reference(cfg) / 1e12,
           "achieved_tflops": tflops, "fraction_of_peak": tflops / peak_tflops}
    if build:
        path = tempfile.mkdtemp(prefix="bank_")
        try:
            _, stats = build_bank(model, tokens[:build], lengths[:build], path, batch_size=batch, progress=False)
            out["build_refs_per_s"] = stats["steady_refs_per_s"]
            out["build_seconds"] = stats["seconds"]
        finally:
            shutil.rmtree(path, ignore_errors=True)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", default=["small", "m3_2p4b"])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--build", type=int, default=4096, help="references for the end-to-end build (0: skip)")
    parser.add_argument("--peak_tflops", type=float, default=790.0, help="bf16 peak measured on the device")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, devices {jax.devices()}")
    rows = [measure(name, args.batch, args.build, args.peak_tflops) for name in args.configs]
    print("\n| config | batch | encode refs/s | TFLOP/ref | TFLOP/s | of peak | build refs/s (bf16 bank, steady) | build wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['batch']} | {r['encode_refs_per_s']:,.0f} | {r['tflop_per_ref']:.3f} | "
              f"{r['achieved_tflops']:.0f} | {r['fraction_of_peak']:.0%} | {r.get('build_refs_per_s', 0):,.0f} | "
              f"{r.get('build_seconds', 0):.1f} |")


if __name__ == "__main__":
    main()
