"""WordNet 3.0 synsets (wordnet-base): one synset, one document: "its words: its gloss".

A line of data.POS is `offset lex_filenum ss_type w_cnt word lex_id ... p_cnt pointers... | gloss`, with
w_cnt in hexadecimal and underscores for spaces in words. The license header's lines start with two
spaces and are skipped. Adjectives may carry a syntactic marker, "(a)", "(p)" or "(ip)", dropped here.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from m3jax.data.documents import Document
from m3jax.data.parsers.common import has_letters

POS = ("noun", "verb", "adj", "adv")
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


def parse_line(line: str) -> tuple[str, list[str], str]:
    """(offset, words, gloss) of one data line."""
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    count = int(fields[3], 16)
    words = [_ADJ_MARKER.sub("", w).replace("_", " ") for w in fields[4:4 + 2 * count:2]]
    return fields[0], words, " ".join(gloss.split())


def wordnet(root, source: str = "wordnet") -> Iterator[Document]:
    for pos in POS:
        paths = sorted(Path(root).rglob(f"data.{pos}"))
        if not paths:
            raise FileNotFoundError(f"no WordNet data.{pos} under {root}")
        with open(paths[0], encoding="utf-8") as f:
            for line in f:
                if line.startswith("  ") or not line.strip():
                    continue
                offset, words, gloss = parse_line(line)
                if has_letters(gloss):
                    yield Document(source, f"{source}:{pos}:{offset}", words[0], f"{', '.join(words)}: {gloss}")
