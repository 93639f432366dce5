"""Retrievers: for each query text (in Memory3, a 64-token chunk), the ids of the k best references.

Two implementations share the `Retriever.retrieve(texts, k) -> (scores, ids)` API, with the result
conventions of `m3jax.retrieval.index` (float32 scores and int64 ids of shape (n, k), best first,
-inf / -1 where nothing more was found):

- `DenseRetriever`: any dense `Embedder` + a `VectorIndex` (cosine similarity). The paper embeds with
  BGE-M3 and searches with FAISS; BGE-M3 plugs in as another `Embedder` subclass (name, dim 1024,
  unit-norm `embed`), with no change here. This package ships `MiniLMEmbedder` (dim 384) instead,
  since BGE-M3 is not available offline.
- `BM25Retriever` (m3jax.retrieval.bm25): lexical BM25 scores, no embedder.

`make_retriever("bm25" | "minilm", texts)` builds either one.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Sequence

import numpy as np

from m3jax.retrieval.embedder import Embedder
from m3jax.retrieval.index import VectorIndex, check_k

INDEX_FILE = "index.faiss"


class Retriever(abc.ABC):
    """Maps query texts to the ids (row numbers of the reference texts) of their k best references."""

    @abc.abstractmethod
    def retrieve(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores (n, k) float32 and ids (n, k) int64, best first; -inf / -1 where fewer than k match."""

    @abc.abstractmethod
    def save(self, path: str | Path) -> None:
        """Writes the retriever into the directory `path` (created if needed)."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of indexed references."""


class DenseRetriever(Retriever):
    """Embeds queries with `embedder` and searches `index`, which holds the same embedder's vectors."""

    def __init__(self, embedder: Embedder, index: VectorIndex):
        if embedder.dim != index.dim:
            raise ValueError(f"embedder {embedder.name!r} has dim {embedder.dim}, the index has dim {index.dim}")
        if index.embedder not in (None, embedder.name):
            raise ValueError(f"the index holds {index.embedder!r} vectors, not {embedder.name!r} ones")
        self.embedder, self.index = embedder, index

    @classmethod
    def build(cls, embedder: Embedder, texts: Sequence[str], kind: str = "auto", batch_size: int = 64,
              **index_kwargs) -> "DenseRetriever":
        """Embeds the reference `texts` and indexes them (see `VectorIndex.build` for kind and options)."""
        vectors = _embed(embedder, texts, batch_size)
        return cls(embedder, VectorIndex.build(vectors, kind, embedder=embedder.name, **index_kwargs))

    def add(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Indexes more references; returns their ids (continuing after the existing ones)."""
        return self.index.add(_embed(self.embedder, texts, batch_size))

    def retrieve(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        k = check_k(k)  # before embedding: fail fast
        return self.index.search(_embed(self.embedder, texts, 64), k)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.index.save(path / INDEX_FILE)

    @classmethod
    def load(cls, path: str | Path, embedder: Embedder) -> "DenseRetriever":
        """Reads a retriever saved by `save`; `embedder` must be the one it was built with."""
        return cls(embedder, VectorIndex.load(Path(path) / INDEX_FILE, expect_embedder=embedder))

    def __len__(self) -> int:
        return len(self.index)


def _embed(embedder: Embedder, texts: Sequence[str], batch_size: int) -> np.ndarray:
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of str, not a single str")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    # Batches bound the embedder's peak memory; an empty corpus still yields a (0, dim) array.
    parts = [embedder.embed(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, embedder.dim), np.float32)


def make_retriever(kind: str, texts: Sequence[str], **kwargs) -> Retriever:
    """Builds a retriever over the reference `texts`: kind "bm25" (kwargs go to `BM25Retriever.build`)
    or "minilm" (MiniLM embeddings; kwargs go to `DenseRetriever.build`, e.g. kind of index via
    `index_kind=`). For BGE-M3, write its `Embedder` and call `DenseRetriever.build` directly."""
    if kind == "bm25":
        from m3jax.retrieval.bm25 import BM25Retriever  # lazy: bm25.py imports this module
        return BM25Retriever.build(texts, **kwargs)
    if kind == "minilm":
        from m3jax.retrieval.minilm import MiniLMEmbedder  # lazy: loads JAX and the model weights
        index_kind = kwargs.pop("index_kind", "auto")
        return DenseRetriever.build(MiniLMEmbedder(), texts, index_kind, **kwargs)
    raise ValueError(f"unknown retriever kind {kind!r}; expected 'bm25' or 'minilm'")
