"""How memory vectors are stored: bf16, int8 with a scale per vector, or FAISS vector quantization.

A memory is (memory layers, K/V, KV heads, tokens, head dim): `memory layers x 2 x kv heads x tokens`
vectors of `head dim` numbers. Each codec turns a batch of memories into named arrays (one row per
reference) and back; decoding runs on the host.

- bf16: 2 bytes per number (440 KiB per reference at 2.4B).
- int8: one byte per number plus a float16 scale per vector (absmax / 127): ~1.95x smaller.
- vq: the paper's composite quantizer, default `OPQ20x80-Residual2x14-PQ8x10` (14 bytes per 80-dim
  vector, ~11.4x smaller than bf16). Keys and values get a quantizer each (free choice: their
  distributions differ), trained on a sample of written memories.
"""
from __future__ import annotations

import re

import ml_dtypes
import numpy as np

MODES = ("bf16", "int8", "vq")


def faiss_factory(factory: str) -> str:
    """The paper writes `OPQ20x80-Residual2x14-PQ8x10`; FAISS wants `OPQ20_80,Residual2x14,PQ8x10`."""
    return re.sub(r"^OPQ(\d+)x(\d+)", r"OPQ\1_\2", factory).replace("-", ",")


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is in requirements.txt
        raise ImportError("vector-quantized banks need FAISS: pip install faiss-cpu") from e
    return faiss


class Codec:
    """Encode (N, L, 2, H, k, D) float memories into named per-reference arrays and back."""

    mode: str

    def __init__(self, shape):
        self.shape = tuple(shape)  # (L, 2, H, k, D) of one reference

    @property
    def vectors(self) -> int:
        return int(np.prod(self.shape[:-1]))

    def fields(self) -> dict:
        """name -> (per-reference shape, numpy dtype) of the stored arrays."""
        raise NotImplementedError

    def encode(self, memories) -> dict:
        raise NotImplementedError

    def decode(self, arrays, dtype=np.float32) -> np.ndarray:
        """Stored arrays -> (N, *shape) memories in `dtype` (bf16 banks read as bf16 are not copied)."""
        raise NotImplementedError

    def bytes_per_reference(self) -> int:
        return sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in self.fields().values())


class Bf16Codec(Codec):
    mode = "bf16"

    def fields(self):
        return {"memories": (self.shape, ml_dtypes.bfloat16)}

    def encode(self, memories):
        return {"memories": np.asarray(memories).astype(ml_dtypes.bfloat16, copy=False)}

    def decode(self, arrays, dtype=np.float32):
        return arrays["memories"].astype(dtype, copy=False)


class Int8Codec(Codec):
    mode = "int8"

    def fields(self):
        return {"codes": (self.shape, np.int8), "scales": (self.shape[:-1], np.float16)}

    def encode(self, memories):
        x = np.asarray(memories, np.float32)
        scale = np.abs(x).max(axis=-1) / 127.0
        scale = np.maximum(scale, np.finfo(np.float16).tiny).astype(np.float16)  # no division by zero
        codes = np.clip(np.rint(x / scale.astype(np.float32)[..., None]), -127, 127).astype(np.int8)
        return {"codes": codes, "scales": scale}

    def decode(self, arrays, dtype=np.float32):
        out = arrays["codes"].astype(np.float32) * arrays["scales"].astype(np.float32)[..., None]
        return out.astype(dtype, copy=False)


class VQCodec(Codec):
    """One trained FAISS quantizer for keys and one for values; codes are `sa_encode` bytes."""

    mode = "vq"

    def __init__(self, shape, factory: str, quantizers=None):
        super().__init__(shape)
        self.factory = factory
        self.quantizers = quantizers  # (keys, values) FAISS indexes, or None until trained
        faiss = _faiss()
        self.code_size = faiss.index_factory(shape[-1], faiss_factory(factory)).sa_code_size()

    def fields(self):
        return {"codes": (self.shape[:-1] + (self.code_size,), np.uint8)}

    def train(self, sample, seed: int = 0) -> None:
        """sample: (N, L, 2, H, k, D) written memories; keys and values train their own quantizer."""
        faiss = _faiss()
        x = np.asarray(sample, np.float32)
        self.quantizers = []
        for kv in (0, 1):
            vectors = np.ascontiguousarray(x[:, :, kv].reshape(-1, self.shape[-1]))
            index = faiss.index_factory(self.shape[-1], faiss_factory(self.factory))
            faiss.ParameterSpace().set_index_parameter(index, "verbose", 0)
            np.random.default_rng(seed + kv).shuffle(vectors)
            index.train(vectors)
            self.quantizers.append(index)

    def _need_training(self):
        if self.quantizers is None:
            raise RuntimeError("the vector quantizer is not trained yet: call train() on a sample of memories")

    def encode(self, memories):
        self._need_training()
        x = np.asarray(memories, np.float32)
        n, (l, _, h, k, d) = x.shape[0], self.shape
        codes = np.empty((n, l, 2, h, k, self.code_size), np.uint8)
        for kv, index in enumerate(self.quantizers):
            flat = np.ascontiguousarray(x[:, :, kv].reshape(-1, d))
            codes[:, :, kv] = index.sa_encode(flat).reshape(n, l, h, k, self.code_size)
        return {"codes": codes}

    def decode(self, arrays, dtype=np.float32):
        self._need_training()
        codes = arrays["codes"]
        n, (l, _, h, k, d) = codes.shape[0], self.shape
        out = np.empty((n, l, 2, h, k, d), np.float32)
        for kv, index in enumerate(self.quantizers):
            flat = np.ascontiguousarray(codes[:, :, kv].reshape(-1, self.code_size))
            out[:, :, kv] = index.sa_decode(flat).reshape(n, l, h, k, d)
        return out.astype(dtype, copy=False)

    def serialize(self) -> list[bytes]:
        self._need_training()
        return [_faiss().serialize_index(q).tobytes() for q in self.quantizers]

    @classmethod
    def deserialize(cls, shape, factory, blobs):
        faiss = _faiss()
        return cls(shape, factory, [faiss.deserialize_index(np.frombuffer(b, np.uint8)) for b in blobs])


def make_codec(mode: str, shape, factory: str | None = None) -> Codec:
    if mode == "bf16":
        return Bf16Codec(shape)
    if mode == "int8":
        return Int8Codec(shape)
    if mode == "vq":
        return VQCodec(shape, factory)
    raise ValueError(f"unknown compression {mode!r}; expected one of {', '.join(MODES)}")


def relative_error(original, decoded) -> float:
    """||decoded - original|| / ||original|| over valid vectors."""
    a, b = np.asarray(original, np.float64), np.asarray(decoded, np.float64)
    return float(np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-30))
