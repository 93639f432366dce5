"""Training observability: TensorBoard scalars, metrics.jsonl, and a one-line summary every N steps.

MFU counts, per token, 6 x (non-embedding parameters + LM head) plus causal attention
6 x layers x T x heads x head_dim, over the chip's bf16 peak (a table by device kind; unknown chips,
the CPU among them, get no MFU unless `train.peak_tflops` says it).
"""
from __future__ import annotations

import json
import pathlib
import time

import jax
from tqdm.auto import tqdm

from m3jax.config import padded_vocab_size

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
                    "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0}


def flops_per_token(cfg) -> float:
    from m3jax.sizes import parameter_counts

    m = cfg.model
    dense = parameter_counts(cfg)["non_embedding"] + m.hidden_size * padded_vocab_size(m)
    return 6 * dense + 6 * m.num_layers * cfg.data.seq_len * m.num_heads * m.head_dim


def peak_flops(cfg) -> float | None:
    if cfg.train.get("peak_tflops"):
        return cfg.train.peak_tflops * 1e12 * jax.device_count()
    kind = jax.devices()[0].device_kind
    match = next((v for k, v in PEAK_BF16_TFLOPS.items() if k.lower() in kind.lower()), None)
    return None if match is None else match * 1e12 * jax.device_count()


class MetricsLogger:
    def __init__(self, workdir, cfg, every: int):
        self.every, self.total = every, cfg.train.steps
        self.flops, self.peak = flops_per_token(cfg), peak_flops(cfg)
        self.main = jax.process_index() == 0
        self.jsonl = open(pathlib.Path(workdir) / "metrics.jsonl", "a") if self.main else None
        self.tb = None
        if self.main:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboardX is in requirements.txt
                tqdm.write("tensorboardX is not installed: no TensorBoard scalars (metrics.jsonl still written)")
        self._since, self._tokens = time.perf_counter(), 0

    def step(self, step: int, metrics: dict) -> None:
        self._tokens += int(metrics["tokens"])
        if step % self.every and step != self.total:
            return
        seconds = time.perf_counter() - self._since
        record = {"step": step, "loss": float(metrics["loss"]), "lr": float(metrics["lr"]),
                  "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": self._tokens / seconds}
        if self.peak:
            record["mfu"] = record["tokens_per_s"] * self.flops / self.peak
        self._since, self._tokens = time.perf_counter(), 0
        if not self.main:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step":
                    self.tb.add_scalar(f"train/{key}", value, step)
        mfu = f" | MFU {record['mfu']:.1%}" if "mfu" in record else ""
        tqdm.write(f"step {step}/{self.total} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | grad "
                   f"{record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tokens/s{mfu}")

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
