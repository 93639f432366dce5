"""Held-out split by a stable hash of the document id (never Python's salted `hash()`)."""
from __future__ import annotations

import hashlib


def heldout_fraction_of(doc_id: str) -> float:
    """A number in [0, 1) fixed by the id alone: the same on every machine, run and Python version."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def is_heldout(doc_id: str, fraction: float = 0.01) -> bool:
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    return heldout_fraction_of(doc_id) < fraction
