"""Memories for text the model reads: retrieve references per chunk, drop leaking ones, read the bank.

Used by generation (prompt chunks, then every `chunk_len` decoded tokens) and by evaluation. A chunk's
query is its own text (SPEC 4). In evaluation each row also has a leakage text (the question and all
its choices): a retrieved reference whose overlap with it exceeds the threshold (SPEC 5: 2/3) is
skipped for the next candidate. Generation filters nothing: a prompt may quote the knowledge base.
"""
from __future__ import annotations

import json
import pathlib
import threading
from collections.abc import Callable, Sequence

import numpy as np

from m3jax.memory.cache import NO_REFERENCE, CachedBankReader
from m3jax.model.lm import MemoryInputs
from m3jax.retrieval.leakage import leaking_references


class MemorySource:
    def __init__(self, cfg, retriever, reader: CachedBankReader, ref_tokens, ref_lengths,
                 decode: Callable[[Sequence[int]], str], *, refs_per_chunk: int | None = None,
                 leak_threshold: float | None = None, candidates: int | None = None):
        self.cfg, self.retriever, self.reader, self.decode = cfg, retriever, reader, decode
        self.ref_tokens, self.ref_lengths = ref_tokens, np.asarray(ref_lengths)
        if reader is not None and len(self.ref_lengths) != reader.bank.count:
            raise ValueError(f"the bank holds {reader.bank.count:,} references, the knowledge base "
                             f"{len(self.ref_lengths):,}: they were not built from the same references")
        self.refs_per_chunk = refs_per_chunk or cfg.memory.refs_per_chunk
        self.leak_threshold = cfg.memory.leak_threshold_eval if leak_threshold is None else leak_threshold
        self.candidates = candidates or 2 * self.refs_per_chunk  # spares for references the filter drops
        self._lock = threading.Lock()  # retrievers are not promised to be thread-safe; generation uses threads

    @classmethod
    def open(cls, cfg, data_dir, bank_path, model, *, cache_capacity: int = 4096, **kwargs) -> MemorySource:
        """BM25 over a prepared knowledge base (`m3jax data prepare`), and its bank written by `model`'s
        weights (`m3jax memory build`); a bank written by other weights is refused. Without a bank
        (bank_path None) it retrieves references but reads no memories: enough for RAG."""
        from m3jax.data.prepare import open_prepared
        from m3jax.data.tokenizer import Tokenizer
        from m3jax.memory.bank import MemoryBank
        from m3jax.memory.fingerprint import weights_fingerprint
        from m3jax.retrieval.bm25 import BM25Retriever

        data_dir = pathlib.Path(data_dir)
        _, arrays = open_prepared(data_dir)
        texts = json.loads((data_dir / "ref_texts.json").read_text())["texts"]
        reader = None
        if bank_path is not None:
            bank = MemoryBank.open(str(bank_path), fingerprint=weights_fingerprint(model), cfg=cfg)
            reader = CachedBankReader(bank, cache_capacity)
        tokenizer = Tokenizer(data_dir / "tokenizer.model")
        return cls(cfg, BM25Retriever.build(texts), reader, arrays["ref_tokens"],
                   arrays["ref_lengths"], tokenizer.decode, **kwargs)

    def reference(self, i: int) -> np.ndarray:
        return np.asarray(self.ref_tokens[i, :self.ref_lengths[i]])

    def retrieve(self, queries: Sequence[Sequence[int]], leak_texts: Sequence[Sequence[int]] | None = None):
        """Token-id queries -> (n, refs_per_chunk) int64 reference ids, best first, NO_REFERENCE where
        fewer were found. With leak_texts, a reference leaking into leak_texts[i] is skipped."""
        out = np.full((len(queries), self.refs_per_chunk), NO_REFERENCE, np.int64)
        live = [i for i, q in enumerate(queries) if len(q)]
        if not live:
            return out
        texts = [self.decode(list(map(int, queries[i]))) for i in live]
        with self._lock:
            _, ids = self.retriever.retrieve(texts, self.candidates)
        for row, i in enumerate(live):
            found = [int(j) for j in ids[row] if j >= 0]
            if found and leak_texts is not None and len(leak_texts[i]):
                leaking = leaking_references(np.asarray(leak_texts[i]), [self.reference(j) for j in found],
                                             self.leak_threshold)
                found = [j for j, bad in zip(found, leaking) if not bad]
            found = found[:self.refs_per_chunk]
            out[i, :len(found)] = found
        return out

    def chunk_ids(self, tokens, lengths, leak_texts=None) -> np.ndarray:
        """(B, T) rows with `lengths` real tokens -> (B, C, refs_per_chunk) ids, C = ceil(T / chunk_len);
        chunks past a row's end retrieve nothing."""
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        b, t = tokens.shape
        size = self.cfg.memory.chunk_len
        chunks = -(-t // size)
        queries, leaks = [], []
        for i in range(b):
            row = tokens[i, :lengths[i]]
            for c in range(chunks):
                queries.append(row[c * size:(c + 1) * size])
                leaks.append(None if leak_texts is None else np.asarray(leak_texts[i]))
        return self.retrieve(queries, None if leak_texts is None else leaks).reshape(b, chunks, self.refs_per_chunk)

    def memory_inputs(self, tokens, lengths, leak_texts=None) -> MemoryInputs:
        """Memories for each chunk of each row (host arrays): kv (B, C, R, ...), valid (B, C, R, k)."""
        if self.reader is None:
            raise ValueError("this memory source has no memory bank (only retrieval, for RAG)")
        return self.reader.memory_inputs(self.chunk_ids(tokens, lengths, leak_texts))
