"""Inner-product (cosine) nearest-neighbour search over unit-norm float32 vectors, on FAISS.

Kinds, and what `kind="auto"` picks by the number n of vectors at build time:

    flat    IndexFlatIP: exact, brute force.            auto: n < 100_000
    ivf     IVF{nlist},Flat: exact scores, approximate  auto: 100_000 <= n <= 10_000_000
            recall (only `nprobe` of `nlist` lists are scanned); same memory as flat.
    ivfpq   IVF{nlist},PQ{m}x8: m bytes per vector      auto: n > 10_000_000
            (default m = dim/8); approximate scores and recall.

nlist defaults to ~4*sqrt(n) (the usual FAISS rule of thumb) and k-means trains on a random sample of
at most 256*nlist vectors (FAISS' own per-centroid cap, which it would otherwise enforce with a warning).
Results follow one convention everywhere: scores (n, k) float32 and ids (n, k) int64, best first,
with id -1 and score -inf in the slots beyond the number of stored vectors.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

try:
    import faiss
except ImportError:  # BM25 retrieval works without FAISS (some accelerator images lack it)
    faiss = None

FLAT_MAX = 100_000  # below this, exact brute force costs only milliseconds per query: no training, no misses
IVF_MAX = 10_000_000  # above this, full float32 vectors no longer fit comfortably in RAM: compress (PQ)
DEFAULT_NPROBE = 16  # lists scanned per query; raise for recall, lower for speed
NORM_TOL = 1e-3
KINDS = ("flat", "ivf", "ivfpq")


def require_faiss():
    if faiss is None:
        raise ImportError("dense retrieval needs FAISS: pip install faiss-cpu (BM25 retrieval does not)")
    return faiss


def check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def empty_results(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) results with nothing found: scores -inf, ids -1."""
    return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)


def check_vectors(x, dim: int | None = None, what: str = "vectors") -> np.ndarray:
    """C-contiguous float32 (n, dim) array of finite unit-norm rows, or a ValueError saying what is wrong."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (n, dim), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what} have dim {x.shape[1]}, but the index has dim {dim}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"{what} contain NaN/inf in {int(bad.sum())} row(s), first row {int(np.argmax(bad))}")
    norms = np.linalg.norm(x, axis=1)
    off = np.abs(norms - 1.0) > NORM_TOL
    if off.any():
        i = int(np.argmax(off))
        raise ValueError(f"{what} must have unit L2 norm for cosine search (row {i} has norm {norms[i]:.4g}); "
                         "normalise your vectors, e.g. x / np.linalg.norm(x, axis=1, keepdims=True)")
    return x


def default_nlist(n: int) -> int:
    return max(1, min(n, int(round(4 * math.sqrt(n)))))


def default_pq_m(dim: int) -> int:
    """Largest divisor of dim that is <= dim/8: sub-vectors of >= 8 dims, one byte each (48 bytes at
    dim 384, 32x smaller than float32). Finer (dim/4) recalls better but doubles memory and
    trains far slower (FAISS k-means is inefficient on 4-d sub-vectors)."""
    return next(m for m in range(max(1, dim // 8), 0, -1) if dim % m == 0)


class VectorIndex:
    """A FAISS index over unit-norm vectors, searched by inner product (= cosine similarity)."""

    def __init__(self, index: faiss.Index, kind: str, embedder: str | None = None, nprobe: int = DEFAULT_NPROBE):
        self.index, self.kind, self.embedder = index, kind, embedder
        if kind != "flat":
            self.nprobe = nprobe

    @classmethod
    def build(cls, vectors, kind: str = "auto", nlist: int | None = None, pq_m: int | None = None, seed: int = 0,
              *, nprobe: int = DEFAULT_NPROBE, embedder: str | None = None,
              train_size: int | None = None) -> "VectorIndex":
        """Builds an index of `vectors` (n, dim); ids are row numbers. `embedder` names the model that
        made the vectors (checked on load); `train_size` caps the k-means sample (default 256*nlist)."""
        require_faiss()
        x = check_vectors(vectors)
        n, dim = x.shape
        if kind == "auto":
            kind = "flat" if n < FLAT_MAX else "ivf" if n <= IVF_MAX else "ivfpq"
        if kind not in KINDS:
            raise ValueError(f"kind must be 'auto' or one of {KINDS}, got {kind!r}")
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        else:
            nlist = default_nlist(n) if nlist is None else int(nlist)
            pq_m = default_pq_m(dim) if pq_m is None else int(pq_m)
            if nlist < 1 or pq_m < 1:
                raise ValueError(f"nlist and pq_m must be >= 1, got nlist={nlist}, pq_m={pq_m}")
            if kind == "ivfpq" and dim % pq_m:
                raise ValueError(f"pq_m={pq_m} must divide dim={dim}")
            # k-means needs >= nlist points; 8-bit PQ codebooks need >= 256.
            need = max(nlist, 256 if kind == "ivfpq" else 1)
            if n < need:
                raise ValueError(f"kind={kind!r} with nlist={nlist} needs at least {need} vectors to train, got {n}")
            spec = f"IVF{nlist},Flat" if kind == "ivf" else f"IVF{nlist},PQ{pq_m}x8"
            index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.seed = seed
            if kind == "ivfpq":  # the factory turns on polysemous training: slow, and only for Hamming filtering
                faiss.downcast_index(ivf).do_polysemous_training = False
            cap = max(need, train_size if train_size is not None else 256 * nlist)
            sample = x if n <= cap else x[np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))]
            index.train(sample)
        if n:
            index.add(x)  # x is already checked: skip add()'s second pass over it
        return cls(index, kind, embedder, nprobe)

    @property
    def dim(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def nprobe(self) -> int | None:
        """IVF lists scanned per query (None for flat); clamped to [1, nlist] when set."""
        return None if self.kind == "flat" else faiss.extract_index_ivf(self.index).nprobe

    @nprobe.setter
    def nprobe(self, value: int):
        if self.kind == "flat":
            raise ValueError("a flat index has no nprobe (it always scans every vector)")
        ivf = faiss.extract_index_ivf(self.index)
        ivf.nprobe = max(1, min(int(value), ivf.nlist))

    def add(self, vectors) -> np.ndarray:
        """Appends vectors; returns their ids, which continue after the existing ones."""
        x = check_vectors(vectors, self.dim)
        start = len(self)
        if len(x):
            self.index.add(x)
        return np.arange(start, start + len(x), dtype=np.int64)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine: scores (n, k) float32 and ids (n, k) int64, best first; -inf / -1 where
        fewer than k vectors are found."""
        k = check_k(k)
        q = check_vectors(queries, self.dim, "queries")
        if len(q) == 0 or len(self) == 0:
            return empty_results(len(q), k)
        scores, ids = self.index.search(q, k)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)  # FAISS pads with -FLT_MAX
        return scores, ids.astype(np.int64)

    def save(self, path: str | Path) -> None:
        """Writes the FAISS index to `path` and its metadata to `path` + '.json'."""
        path = Path(path)
        faiss.write_index(self.index, str(path))
        meta = {"format": 1, "kind": self.kind, "dim": self.dim, "count": len(self),
                "embedder": self.embedder, "nprobe": self.nprobe}
        _sidecar(path).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: str | Path, expect_embedder: str | None = None) -> "VectorIndex":
        """Reads an index written by `save`. With `expect_embedder` (a name or an Embedder), refuses an
        index whose vectors came from another embedder: their similarities would be meaningless."""
        require_faiss()
        path = Path(path)
        if not _sidecar(path).is_file():
            raise FileNotFoundError(f"{_sidecar(path)} is missing; was {path} written by VectorIndex.save?")
        meta = json.loads(_sidecar(path).read_text())
        index = faiss.read_index(str(path))
        if (index.d, index.ntotal) != (meta["dim"], meta["count"]):
            raise ValueError(f"{path} holds {index.ntotal} vectors of dim {index.d}, but its sidecar says "
                             f"{meta['count']} of dim {meta['dim']}: the two files do not belong together")
        if expect_embedder is not None:
            want = getattr(expect_embedder, "name", expect_embedder)
            if meta["embedder"] != want:
                raise ValueError(f"{path} was built with embedder {meta['embedder']!r}, not {want!r}; "
                                 "re-embed the references with the query embedder and rebuild the index")
            want_dim = getattr(expect_embedder, "dim", None)
            if want_dim and want_dim != index.d:
                raise ValueError(f"{path} has dim {index.d}, but embedder {want!r} has dim {want_dim}")
        return cls(index, meta["kind"], meta["embedder"], meta["nprobe"] or DEFAULT_NPROBE)

    def __repr__(self) -> str:
        return f"VectorIndex(kind={self.kind!r}, dim={self.dim}, count={len(self)}, nprobe={self.nprobe})"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")
