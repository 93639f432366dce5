"""Evaluation results for people (a table) and for machines (JSON)."""
from __future__ import annotations

import json
import pathlib


def _pct(x) -> str:
    return f"{100 * x:6.2f}"


def format_table(results: dict) -> str:
    lines = []
    tasks = results.get("tasks", {})
    if tasks:
        memory = any("with_memory" in r for r in tasks.values())
        lines.append("accuracy in %" + (": without memory | with memory | with minus without" if memory else
                                         ", without memory"))
        head = f"{'task':16s} {'n':>6s} {'acc':>6s} {'acc_norm':>8s}"
        if memory:
            head += f" | {'acc':>6s} {'acc_norm':>8s} | {'acc':>6s} {'acc_norm':>8s}"
        lines += [head, "-" * len(head)]
        for name, r in tasks.items():
            w = r["without_memory"]
            line = f"{name:16s} {r['n']:6d} {_pct(w['acc'])} {_pct(w['acc_norm']):>8s}"
            if "with_memory" in r:
                m, d = r["with_memory"], r["delta"]
                line += f" | {_pct(m['acc'])} {_pct(m['acc_norm']):>8s} | {_pct(d['acc'])} {_pct(d['acc_norm']):>8s}"
            lines.append(line)
    if "heldout" in results:
        h = results["heldout"]
        line = (f"held-out loss over {h['without_memory']['tokens']:,} tokens: "
                f"{h['without_memory']['loss']:.4f} without memory")
        if "with_memory" in h:
            line += f", {h['with_memory']['loss']:.4f} with memory ({h['delta']['loss']:+.4f})"
        lines.append(line)
    return "\n".join(lines)


def write_json(results: dict, path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)  # a reader never sees half a file
    return path
