"""Knowledge-base text -> references of at most `max_tokens` tokens, cut at sentence boundaries.

A document is split into sentences and sentences are packed greedily into references. A single
sentence longer than the limit is cut at token boundaries (documented, not an error): a reference
never exceeds `max_tokens`, and no text is dropped.
"""
from __future__ import annotations

import re
from typing import Callable, Iterator, Sequence

# A sentence ends at . ! or ? (optionally closed by quotes/brackets) followed by whitespace.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def split_references(text: str, encode: Callable[[str], Sequence[int]], max_tokens: int) -> Iterator[list[int]]:
    """Token lists of the references of one document, in order."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    current: list[int] = []
    for sentence in sentences(text):
        ids = list(encode(sentence))
        if current and len(current) + len(ids) > max_tokens:
            yield current
            current = []
        while len(ids) > max_tokens:  # one over-long sentence: cut it
            yield ids[:max_tokens]
            ids = ids[max_tokens:]
        current += ids
    if current:
        yield current
