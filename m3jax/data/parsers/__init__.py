"""Parsers: an extracted package root (what `fetch` returns) -> cleaned `Document`s.

One function per format, each `parser(root, source=NAME) -> Iterator[Document]`; the registry in
m3jax.data.sources names the parser of every source and its roles, and `corpus_documents` /
`knowledge_documents` chain them by role.
"""
from __future__ import annotations

from typing import Iterator, Mapping

from m3jax.data.documents import Document
from m3jax.data.parsers.dictd import b64_number, dictd, foldoc, gcide
from m3jax.data.parsers.kjv import kjv
from m3jax.data.parsers.pod import perl_pod
from m3jax.data.parsers.rest import linux_doc, python_doc
from m3jax.data.parsers.wiki import wiki_summaries
from m3jax.data.parsers.wordnet import wordnet
from m3jax.data.sources import CORPUS, KNOWLEDGE, SOURCES

PARSERS = {"dictd": dictd, "gcide": gcide, "foldoc": foldoc, "wordnet": wordnet, "linux_doc": linux_doc,
           "python_doc": python_doc, "perl_pod": perl_pod, "kjv": kjv, "wiki_summaries": wiki_summaries}


def documents(name: str, root) -> Iterator[Document]:
    """The documents of one registered source, read from its extracted root."""
    source = SOURCES[name]
    return PARSERS[source.parser](root, source=name)


def _by_role(roots: Mapping[str, object], role: str) -> Iterator[Document]:
    """Sources interleaved one document at a time, in registry order, so the stream is the same on every
    run and any prefix of it (a size-limited slice) draws from every source."""
    streams = [documents(name, roots[name]) for name, source in SOURCES.items()
               if role in source.roles and name in roots]
    while streams:
        for stream in list(streams):
            doc = next(stream, None)
            if doc is None:
                streams.remove(stream)
            else:
                yield doc


def corpus_documents(roots: Mapping[str, object]) -> Iterator[Document]:
    """Pretraining text of the fetched sources ({name: root}); never the knowledge-only ones."""
    return _by_role(roots, CORPUS)


def knowledge_documents(roots: Mapping[str, object]) -> Iterator[Document]:
    """Knowledge-base documents (one dictionary entry or one summary = one reference source)."""
    return _by_role(roots, KNOWLEDGE)


__all__ = ["PARSERS", "Document", "b64_number", "corpus_documents", "dictd", "documents", "foldoc", "gcide",
           "kjv", "knowledge_documents", "linux_doc", "perl_pod", "python_doc", "wiki_summaries", "wordnet"]
