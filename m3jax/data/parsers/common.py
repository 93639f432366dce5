"""Helpers shared by the parsers."""
from __future__ import annotations

import re

_LETTER = re.compile(r"[^\W\d_]")
_BLANK_RUNS = re.compile(r"\n{3,}")


def has_letters(text: str) -> bool:
    return _LETTER.search(text) is not None


def unwrap(text: str) -> str:
    """Join wrapped lines within paragraphs and collapse whitespace; one paragraph per output line."""
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n[ \t]*\n", text))
    return "\n".join(p for p in paragraphs if p)


def tidy_lines(text: str) -> str:
    """Keep the line structure (code, lists) but drop trailing spaces and runs of blank lines."""
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return _BLANK_RUNS.sub("\n\n", text).strip("\n")
