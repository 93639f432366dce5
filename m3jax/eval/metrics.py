"""Accuracy from continuation log-likelihoods, as lm-eval-harness reports it.

acc: the choice with the highest total log-likelihood; acc_norm: highest log-likelihood per character
of the continuation (lm-eval's acc_norm); acc_per_token: per continuation token. Ties go to the first
choice.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from m3jax.eval.encode import Row
from m3jax.eval.records import MultipleChoice


def choice_metrics(questions: Sequence[MultipleChoice], rows: Sequence[Row], logprobs: np.ndarray) -> dict:
    """{n, acc, acc_norm, acc_per_token} over the questions; `logprobs[i]` belongs to rows[i]."""
    scores = {name: [np.full(len(q.continuations), -np.inf) for q in questions]
              for name in ("acc", "acc_norm", "acc_per_token")}
    for row, lp in zip(rows, logprobs):
        scores["acc"][row.question][row.choice] = lp
        scores["acc_norm"][row.question][row.choice] = lp / row.chars
        scores["acc_per_token"][row.question][row.choice] = lp / (row.length - row.start)
    out = {"n": len(questions)}
    for name, per_question in scores.items():
        right = [int(np.argmax(s)) == q.gold for s, q in zip(per_question, questions)]
        out[name] = float(np.mean(right)) if right else float("nan")
    return out
