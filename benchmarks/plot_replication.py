"""Loss curves of a replication run (`launch/replicate_gpu.sh` results folder) as a PNG.

    python benchmarks/plot_replication.py benchmarks/replication [--out curves.png]

Training loss per logged step (a running mean over 5 logs); stage 2 and the control are drawn after
stage 1's steps, so every arm sits on one axis of total steps (equal budgets end at the same x).
"""
from __future__ import annotations

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def curve(path: pathlib.Path):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = np.array([r["step"] for r in rows])
    loss = np.convolve([r["loss"] for r in rows], np.ones(5) / 5, mode="same")
    return steps[2:-2], loss[2:-2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    folder = pathlib.Path(args.folder)
    result = json.loads((folder / "replication.json").read_text())
    offset = {"stage1": 0, "two_stage": result["steps1"], "control": result["steps1"], "ablation": 0}
    labels = {"stage1": "stage 1 (warmup, no memory)", "two_stage": "stage 2 (memory)",
              "control": "control: stage 2 without memory", "ablation": "ablation: memory from scratch"}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm, label in labels.items():
        steps, loss = curve(folder / f"{arm}.metrics.jsonl")
        ax.plot(steps + offset[arm], loss, label=label, linewidth=1.2)
    ax.set_xlabel(f"step (x {result['tokens_per_step']:,} tokens)")
    ax.set_ylabel("training loss")
    ax.set_ylim(top=min(ax.get_ylim()[1], 6.0))
    ax.set_title(f"small config, {result['steps1']} + {result['steps2']} steps, {result['device']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out or folder / "loss_curves.png", dpi=110)


if __name__ == "__main__":
    main()
