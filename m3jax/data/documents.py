"""The unit every parser yields: one document of cleaned text from one source."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    source: str  # the registry name of the source, e.g. "gcide"
    doc_id: str  # stable and unique within the source, prefixed by it: "gcide:apple"
    title: str
    text: str
