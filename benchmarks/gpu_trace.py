"""Reading a `jax.profiler.trace` of GPU work: how busy the GPU was, and where its kernel time went.

Kernel time is attributed to the model's named scopes (`jax.named_scope` in m3jax: encode_references,
sparsify, attention_kernel, stream_attention, memory_attention, mlp) through each kernel's HLO op and
that op's `op_name` metadata in the compiled HLO text; `transpose(` in the name marks the backward pass.
"""
from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re

SCOPES = ("sparsify", "memory_attention", "stream_attention", "attention_kernel", "mlp")
_METADATA = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?metadata=\{[^}]*?op_name="([^"]*)"', re.M)


def kernel_events(trace_dir: str) -> tuple[list[dict], list[str]]:
    """The GPU kernel events ("X" with a duration on a GPU process) of the newest trace under trace_dir."""
    trace = max(pathlib.Path(trace_dir).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    events = json.loads(gzip.open(trace).read())
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu_pids = {pid for pid, name in names.items() if "GPU" in name or "gpu" in name}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e]
    return kernels, sorted(names[p] for p in gpu_pids)


def kernel_us(step, state, reps: int = 10, keep=lambda name: not name.startswith("memcpy")):
    """Run `state = step(state)` `reps` times under the profiler: (GPU kernel microseconds per run, counting the
    kernels whose name `keep` accepts (default: all but memory copies), and the last state)."""
    import tempfile

    import jax

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(reps):
                state = step(state)
            jax.block_until_ready(state)
        kernels, _ = kernel_events(trace_dir)
    return sum(e["dur"] for e in kernels if keep(e["name"])) / reps, state  # trace durations are in us


def busy(kernels: list[dict], steps: int) -> dict:
    """Kernel time, the union of kernel intervals over the traced span, and the top kernels per step."""
    if not kernels:  # e.g. traced on a machine without a GPU
        return {"error": "no GPU kernel events in the trace"}
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    total_busy, end, gaps = 0.0, spans[0][0], []
    for start, stop in spans:
        if start > end:
            gaps.append(start - end)
        if stop > end:
            total_busy += stop - max(start, end)
            end = stop
    wall = spans[-1][1] - spans[0][0]
    total, count = collections.Counter(), collections.Counter()
    for e in kernels:
        total[e["name"]] += e["dur"]
        count[e["name"]] += 1
    return {"kernel_launches_per_step": len(kernels) / steps, "busy_share_of_span": total_busy / wall,
            "span_ms": wall / 1e3, "busy_ms": total_busy / 1e3, "idle_gaps_per_step": _gaps(gaps, steps),
            "top_kernels_us_per_step": [(name[:120], round(us / steps, 1), count[name] // steps)
                                        for name, us in total.most_common(25)],
            "by_kind_us_per_step": _by_kind(total, count, steps)}


def _gaps(gaps: list[float], steps: int) -> list:
    """Idle gaps between kernels by length: short ones are launch latency, long ones a waiting host."""
    bounds = (1, 3, 10, 100, float("inf"))
    out, low = [], 0
    for high in bounds:
        inside = [g for g in gaps if low <= g < high]
        out.append((f"{low}-{high} us", round(len(inside) / steps, 1), round(sum(inside) / steps, 1)))
        low = high
    return out  # (range, gaps per step, idle us per step)


def _by_kind(total, count, steps: int) -> list:
    """Kernel time per kind of kernel: names without their instance numbers (loop_add_fusion_12 -> loop_add_fusion)."""
    kind_total, kind_count = collections.Counter(), collections.Counter()
    for name, us in total.items():
        kind = re.sub(r"[_.]\d+", "", name)[:80]
        kind_total[kind] += us
        kind_count[kind] += count[name]
    return [(kind, round(us / steps, 1), kind_count[kind] // steps) for kind, us in kind_total.most_common(20)]


def _key(name: str) -> str:
    # Kernels are named after their HLO instruction with '.' and '-' turned into '_' (fusion.12 -> fusion_12).
    return re.sub(r"[.\-]", "_", name)


def op_names(hlo_text: str) -> dict[str, str]:
    """Normalised HLO instruction name -> its op_name metadata, from compiled HLO text."""
    return {_key(name): op for name, op in _METADATA.findall(hlo_text)}


def _op_of(event: dict, ops: dict[str, str]) -> str:
    args = event.get("args", {})
    for key in ("tf_op", "long_name"):
        if "/" in str(args.get(key, "")):
            return str(args[key])
    hlo = str(args.get("hlo_op", ""))
    return ops.get(_key(hlo), ops.get(_key(event["name"]), ""))


def by_scope(kernels: list[dict], hlo_text: str, steps: int) -> dict:
    """Kernel milliseconds per step by (pass, scope), and the op names taking the most time."""
    ops = op_names(hlo_text)
    table, per_op, unmatched = collections.Counter(), collections.Counter(), 0.0
    for e in kernels:
        op = _op_of(e, ops)
        if not op:
            unmatched += e["dur"]
        writing = "encode_references" in op
        scope = next((s for s in SCOPES if s in op), "other")
        direction = "backward" if "transpose(" in op else "forward"
        table[f"{'writing' if writing else 'reading'}/{direction}/{scope}"] += e["dur"]
        per_op[re.sub(r"\d+", "#", op)[-160:]] += e["dur"]
    sample = next((e.get("args", {}) for e in kernels if e.get("args")), {})
    return {"ms_per_step": {k: round(v / steps / 1e3, 2) for k, v in sorted(table.items())},
            "unattributed_ms_per_step": round(unmatched / steps / 1e3, 2),
            "top_ops_ms_per_step": [(op, round(us / steps / 1e3, 2)) for op, us in per_op.most_common(30)],
            "kernel_args_sample": {k: str(v)[:200] for k, v in sample.items()}}
