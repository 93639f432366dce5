"""Questions -> token rows: one row per (question, choice), context tokens then continuation tokens.

Context and continuation are encoded separately: with the SentencePiece vocabulary the continuation's
leading space becomes the word-start mark of its first piece, so the pair reads as the joined text,
and the continuation's tokens do not depend on how its context happens to end. No `<s>` is added:
the model puts its own sink (which ends in `<s>`) in front of every row. The first row token has no
prediction (logits[:, t] predicts token t+1), so a context needs at least one token. Rows longer
than `max_len` lose context tokens from the left.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from m3jax.eval.records import MultipleChoice


@dataclasses.dataclass(frozen=True)
class Row:
    question: int  # index into the question list
    choice: int
    tokens: np.ndarray  # (length,) int32: context then continuation
    start: int  # first continuation token
    chars: int  # characters of the continuation (for per-character normalisation)

    @property
    def length(self) -> int:
        return len(self.tokens)


def encode_questions(questions: Sequence[MultipleChoice], encode: Callable[[str], list[int]], max_len: int
                     ) -> tuple[list[Row], list[np.ndarray]]:
    """(rows, leak_texts): leak_texts[q] holds the tokens of question q's contexts and all its choices,
    the text a retrieved reference must not give away."""
    rows, leak_texts = [], []
    for q, question in enumerate(questions):
        contexts = question.contexts()
        context_ids = {c: encode(c) for c in dict.fromkeys(contexts)}  # Winogrande: two contexts; others: one
        choice_ids = [encode(c) for c in question.continuations]
        for c, (context, cont) in enumerate(zip(contexts, choice_ids)):
            ctx = context_ids[context]
            if not ctx:
                raise ValueError(f"question {question.id}: the context encodes to no tokens")
            if not cont:
                raise ValueError(f"question {question.id}: choice {c} encodes to no tokens")
            if len(cont) >= max_len:
                raise ValueError(f"question {question.id}: choice {c} has {len(cont)} tokens, too long for rows "
                                 f"of {max_len} tokens with at least one context token")
            ctx = ctx[max(0, len(ctx) + len(cont) - max_len):]
            rows.append(Row(q, c, np.array(ctx + cont, np.int32), len(ctx), len(question.continuations[c])))
        leak_texts.append(np.array([t for ids in (*context_ids.values(), *choice_ids) for t in ids], np.int32))
    return rows, leak_texts
