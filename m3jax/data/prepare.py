"""`m3jax data prepare`: fetched packages -> the arrays training reads, once, offline.

Steps: parse the corpus and the knowledge base; hold out ~1% of corpus documents by a stable hash;
train the SentencePiece vocabulary on the training corpus; tokenize and pack the corpus into
sequences of `seq_len` tokens (documents joined with `</s>`); split knowledge-base text into
references of <= reference_len tokens; retrieve one reference per 64-token chunk (BM25 over the
references), dropping any whose overlap with the sequence exceeds the leakage threshold. Retrieval
runs for every held-out sequence and for `data.continual_sequences` training sequences (a fixed
random subset; all when None): stage 2 sees far fewer tokens than stage 1 (120B vs 3.1T in the paper).

Everything is written into a temporary folder that is renamed into place at the end, so an
interrupted run never leaves outputs that look complete.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import time

import numpy as np
from tqdm.auto import tqdm

from m3jax.data import tokenizer as tok
from m3jax.data.atomic import commit_dir, partial_dir
from m3jax.data.references import split_references
from m3jax.data.split import is_heldout
from m3jax.retrieval.leakage import leaking_references

FORMAT = "m3jax-prepared-data-1"
ARRAYS = ("train_tokens", "heldout_tokens", "continual_tokens", "continual_ref_ids", "heldout_ref_ids", "ref_tokens",
          "ref_lengths")


def pack(docs_tokens, seq_len: int, eos: int = tok.EOS) -> np.ndarray:
    """Concatenate documents (each followed by `</s>`) and cut into rows of seq_len; the tail is dropped."""
    stream = np.fromiter((t for doc in docs_tokens for t in (*doc, eos)), dtype=np.int64)
    rows = len(stream) // seq_len
    return stream[: rows * seq_len].reshape(rows, seq_len)


def retrieve_for_chunks(sequences, chunk_len, retriever, decode, ref_tokens, ref_lengths, threshold, candidates=5,
                        progress=True) -> np.ndarray:
    """(N, C) int32: per chunk, the best reference that does not leak into its sequence; -1 if none."""
    n, t = sequences.shape
    chunks = t // chunk_len
    out = np.full((n, chunks), -1, np.int32)
    for i in tqdm(range(n), desc="retrieving", unit="seq", disable=not progress):
        texts = [decode(sequences[i, c * chunk_len:(c + 1) * chunk_len]) for c in range(chunks)]
        _, ids = retriever.retrieve(texts, candidates)
        unique = np.unique(ids[ids >= 0])
        leaks = dict(zip(unique.tolist(), leaking_references(
            sequences[i], [ref_tokens[j, :ref_lengths[j]] for j in unique], threshold))) if len(unique) else {}
        for c in range(chunks):
            for j in ids[c]:
                if j >= 0 and not leaks[int(j)]:
                    out[i, c] = j
                    break
    return out


def prepare(cfg, cache_dir, out_dir, *, fetch_fn=None, documents=None, progress=True) -> dict:
    """Run the whole preparation; returns the metadata written to out_dir/meta.json.

    documents: optionally (corpus, knowledge) iterables of Documents instead of fetching (tests).
    """
    from m3jax.retrieval.bm25 import BM25Retriever

    out_dir = pathlib.Path(out_dir)
    if (out_dir / "meta.json").exists():
        raise FileExistsError(f"{out_dir} already holds prepared data; remove it to prepare again")
    began = time.time()
    if documents is None:
        from m3jax.data.fetch import fetch
        from m3jax.data.parsers import corpus_documents, knowledge_documents

        roots = (fetch_fn or fetch)(cache_dir, progress=progress)
        documents = (corpus_documents(roots), knowledge_documents(roots))
    corpus, knowledge = documents
    train_docs, heldout_docs = [], []
    for doc in tqdm(corpus, desc="reading corpus", unit="doc", disable=not progress):
        (heldout_docs if is_heldout(doc.doc_id, cfg.data.heldout_fraction) else train_docs).append(doc)
        if cfg.data.max_corpus_documents and len(train_docs) + len(heldout_docs) >= cfg.data.max_corpus_documents:
            break
    if not train_docs or not heldout_docs:
        raise ValueError(f"the corpus gave {len(train_docs)} training and {len(heldout_docs)} held-out documents; "
                         "both must be non-empty")
    # the encyclopedic summaries first: a limit on the knowledge base cuts dictionary entries
    knowledge = sorted(knowledge, key=lambda d: d.source != "wiki")[:cfg.data.max_knowledge_documents]
    if not knowledge:
        raise ValueError("the knowledge base is empty")

    tmp = partial_dir(out_dir)
    lines = (line for d in train_docs for line in d.text.splitlines() if line.strip())
    tokenizer = tok.Tokenizer(tok.train(lines, tmp / "tokenizer.model", cfg.model.vocab_size,
                                        max_sentences=cfg.data.tokenizer_sentences))
    if tokenizer.vocab_size > np.iinfo(np.uint16).max:
        raise ValueError("vocabularies over 65535 tokens do not fit the uint16 token arrays")

    def encode_all(docs, what):
        return [tokenizer.encode(d.text) for d in tqdm(docs, desc=f"tokenizing {what}", disable=not progress)]

    seq_len, chunk_len = cfg.data.seq_len, cfg.memory.chunk_len
    arrays = {"train_tokens": pack(encode_all(train_docs, "training corpus"), seq_len),
              "heldout_tokens": pack(encode_all(heldout_docs, "held-out corpus"), seq_len)}
    refs, ref_texts, ref_docs = [], [], []
    for doc in tqdm(knowledge, desc="splitting references", disable=not progress):
        for ids in split_references(doc.text, tokenizer.encode, cfg.memory.reference_len):
            refs.append(ids)
            ref_texts.append(tokenizer.decode(ids))
            ref_docs.append(doc.doc_id)
    ref_tokens = np.zeros((len(refs), cfg.memory.reference_len), np.uint16)
    for i, ids in enumerate(refs):
        ref_tokens[i, :len(ids)] = ids
    ref_lengths = np.array([len(r) for r in refs], np.int32)
    arrays.update(ref_tokens=ref_tokens, ref_lengths=ref_lengths)

    retriever = BM25Retriever.build(ref_texts)
    n_train, wanted = len(arrays["train_tokens"]), cfg.data.continual_sequences
    subset = np.arange(n_train) if wanted is None or wanted >= n_train else np.sort(
        np.random.default_rng(cfg.data.seed).choice(n_train, wanted, replace=False))
    arrays["continual_tokens"] = arrays["train_tokens"][subset]
    for split in ("continual", "heldout"):
        arrays[f"{split}_ref_ids"] = retrieve_for_chunks(
            arrays[f"{split}_tokens"], chunk_len, retriever, tokenizer.decode, ref_tokens, ref_lengths,
            cfg.memory.leak_threshold_train, progress=progress)
    for name in ("train_tokens", "heldout_tokens", "continual_tokens"):
        arrays[name] = arrays[name].astype(np.uint16)
    checksums = {}
    for name, array in arrays.items():
        np.save(tmp / f"{name}.npy", array)
        checksums[name] = hashlib.sha256((tmp / f"{name}.npy").read_bytes()).hexdigest()
    (tmp / "ref_texts.json").write_text(json.dumps({"texts": ref_texts, "doc_ids": ref_docs}))
    meta = {
        "format": FORMAT, "seq_len": seq_len, "chunk_len": chunk_len, "reference_len": cfg.memory.reference_len,
        "vocab_size": tokenizer.vocab_size, "reference_prefix_ids": list(tok.REFERENCE_PREFIX),
        "bos_id": tok.BOS, "eos_id": tok.EOS, "pad_id": tok.PAD, "tokenizer": tokenizer.fingerprint(),
        "heldout_fraction": cfg.data.heldout_fraction, "leak_threshold": cfg.memory.leak_threshold_train,
        "retriever": "bm25", "limits": {k: cfg.data[k] for k in ("max_corpus_documents", "max_knowledge_documents",
                                                                 "continual_sequences")}, "documents": {"train": len(train_docs), "heldout": len(heldout_docs),
                                           "knowledge": len(knowledge)},
        "shapes": {k: list(v.shape) for k, v in arrays.items()}, "sha256": checksums,
        "seconds": round(time.time() - began, 1),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    commit_dir(tmp, out_dir)  # a complete folder appears at once
    return meta


def open_prepared(data_dir, verify: bool = False) -> tuple[dict, dict]:
    """(meta, arrays) with arrays memory-mapped; `verify` re-checks every checksum."""
    data_dir = pathlib.Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no prepared data in {data_dir} (run `m3jax data prepare`)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{data_dir} holds data of format {meta.get('format')!r}, expected {FORMAT}")
    arrays = {}
    for name in ARRAYS:
        path = data_dir / f"{name}.npy"
        if verify and hashlib.sha256(path.read_bytes()).hexdigest() != meta["sha256"][name]:
            raise ValueError(f"{path} does not match its checksum: the prepared data is corrupted")
        arrays[name] = np.load(path, mmap_mode="r")
        if list(arrays[name].shape) != meta["shapes"][name]:
            raise ValueError(f"{path} has shape {arrays[name].shape}, meta.json says {meta['shapes'][name]}")
    return meta, arrays
