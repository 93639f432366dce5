"""Lexical retrieval with BM25 (the `bm25s` package): a baseline and an embedder-free alternative.

Texts are tokenised by bm25s' own tokenizer (lower-cased words of >= 2 word characters, optional
English stopword removal) for both references and queries, and scored with Lucene's BM25 variant,
whose idf is always positive: a reference scores > 0 exactly when it shares a word with the query.
Only such references are returned; the remaining slots hold id -1 and score -inf, as for
`VectorIndex`. So a query with no known words gets all -1 ids (bm25s itself would return arbitrary
documents with score 0).

Queries are scored as one sparse product, (queries x words) counts @ bm25s' (words x references) index,
then one top-k, where bm25s' own `retrieve` scores query by query in Python: 64 queries over 4,096
references take 18.3 instead of 38.5 ms on a 2-core CPU. Same scores up to summation order.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import bm25s
import numpy as np
import scipy.sparse

from m3jax.retrieval.index import check_k, empty_results
from m3jax.retrieval.retriever import Retriever

META_FILE = "m3jax_bm25.json"
QUERY_BLOCK = 256  # queries scored at once: a dense (block, references) f32 array (170k references: 174 MB)


def _host_cpu():
    """JAX's host CPU device, or None where JAX has none (e.g. JAX_PLATFORMS=cuda)."""
    import jax

    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return None


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, indices) of each row's k best, ties to the lower index: jax.lax.top_k on the host CPU (5x
    NumPy's speed over 170k references; on JAX's default device it would run on a GPU, queued behind the
    model's work there, which generation waited on), else NumPy."""
    cpu = _host_cpu()
    if cpu is None:
        docs = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, docs, axis=1), docs
    import jax

    with jax.default_device(cpu):
        return tuple(np.asarray(x) for x in jax.lax.top_k(scores, k))


def _check_texts(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of str, not a single str")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{what}[{i}] is {type(t).__name__}, expected str")
    return texts


class BM25Retriever(Retriever):
    """BM25 over a fixed list of reference texts; ids are their positions in that list."""

    def __init__(self, model: bm25s.BM25, stopwords: str | list[str] | None, count: int):
        self.model, self.stopwords, self.count = model, stopwords, count
        if model.nonoccurrence_array is not None:  # variants that score absent words (not lucene's)
            raise ValueError(f"BM25Retriever needs bm25s' lucene method, got {model.method!r}")
        index = model.scores
        self._index = scipy.sparse.csr_matrix((index["data"], index["indices"], index["indptr"]),
                                              shape=(len(index["indptr"]) - 1, index["num_docs"]))

    @classmethod
    def build(cls, texts: Sequence[str], stopwords: str | list[str] | None = "en",
              k1: float = 1.5, b: float = 0.75) -> "BM25Retriever":
        """Indexes `texts`. `stopwords`: "en" (bm25s' English list), a list of words, or None to keep all."""
        texts = _check_texts(texts, "texts")
        if not texts:
            raise ValueError("BM25Retriever.build needs at least one reference text, got an empty list")
        tokens = cls._tokenize(texts, stopwords)
        if not any(tokens):
            raise ValueError("no reference text contains an indexable word (all empty, punctuation or stopwords)")
        model = bm25s.BM25(k1=k1, b=b, method="lucene")  # lucene: idf > 0, so score 0 <=> no shared word
        model.index(tokens, show_progress=False)
        return cls(model, stopwords, len(texts))

    @staticmethod
    def _tokenize(texts: list[str], stopwords) -> list[list[str]]:
        return bm25s.tokenize(texts, stopwords=stopwords, return_ids=False, show_progress=False)

    def retrieve(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        k = check_k(k)
        texts = _check_texts(texts, "queries")
        scores, ids = empty_results(len(texts), k)
        vocab = self.model.vocab_dict
        # Unknown words score nothing anyway; dropping them lets us skip queries left empty.
        tokens = [[t for t in q if t in vocab] for q in self._tokenize(texts, self.stopwords)] if texts else []
        rows = [i for i, q in enumerate(tokens) if q]
        kk = min(k, self.count)  # at most every reference
        for start in range(0, len(rows), QUERY_BLOCK):
            block = rows[start:start + QUERY_BLOCK]
            s, docs = _top_k(self._scores([[vocab[t] for t in tokens[i]] for i in block]), kk)
            hit = s > 0
            scores[block, :kk] = np.where(hit, s, -np.inf)
            ids[block, :kk] = np.where(hit, docs, -1)
        return scores, ids

    def _scores(self, queries: list[list[int]]) -> np.ndarray:
        """(queries, references) BM25 scores of word-id queries, each occurrence of a word counted (as bm25s'
        `get_scores_from_ids`): word counts per query times the index."""
        rows = np.repeat(np.arange(len(queries)), [len(q) for q in queries])
        counts = scipy.sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, np.concatenate(queries))),
                                         shape=(len(queries), self._index.shape[0]))  # duplicates summed
        return (counts @ self._index).toarray()

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save(str(path), show_progress=False)
        meta = {"format": 1, "stopwords": self.stopwords, "count": self.count}
        (path / META_FILE).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "BM25Retriever":
        path = Path(path)
        if not (path / META_FILE).is_file():
            raise FileNotFoundError(f"{path / META_FILE} is missing; was {path} written by BM25Retriever.save?")
        meta = json.loads((path / META_FILE).read_text())
        model = bm25s.BM25.load(str(path), show_progress=False)
        return cls(model, meta["stopwords"], meta["count"])

    def __len__(self) -> int:
        return self.count
