"""TFDS builders and seqio tasks: the seqio output equals the prepared arrays equals what StepLoader yields."""
import collections

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from m3jax import config as config_lib  # noqa: E402
from m3jax.data import tasks, tfds_builders  # noqa: E402
from m3jax.data.loader import StepLoader  # noqa: E402
from m3jax.data.prepare import open_prepared, pack, prepare  # noqa: E402
from m3jax.data.split import is_heldout  # noqa: E402

Doc = collections.namedtuple("Doc", "source doc_id title text")
FRACTION = 0.1  # not the default 0.01: also exercises a non-default M3Corpus config
# 6 of the training rows get retrieval: m3_continual/train must pick exactly that subset
CFG = config_lib.load("tiny", {"data.heldout_fraction": FRACTION, "data.continual_sequences": 6})


def synthetic(seed=0):
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(800)]

    def text(n):
        return " ".join(" ".join(rng.choice(words, rng.integers(5, 13))).capitalize() + "." for _ in range(n))

    corpus = [Doc("book", f"book:{i}", f"B{i}", text(int(rng.integers(1, 10)))) for i in range(160)]
    knowledge = [Doc("wiki", f"wiki:{i}", f"T{i}", text(3)) for i in range(20)]
    return corpus, knowledge


def build(builder_cls, data_dir, docs, **kwargs):
    return tfds_builders.build(builder_cls(data_dir=str(data_dir), documents_fn=lambda cache_dir: docs, **kwargs))


def read(builder, split):
    return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def rows_of(task, split, *keys):
    """The task's rows of `split`, in order, stacked per feature."""
    examples = list(task.get_dataset({"targets": CFG.data.seq_len}, split=split, shuffle=False).as_numpy_iterator())
    return [np.stack([e[k] for e in examples]) for k in keys]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Prepared arrays and TFDS datasets of the same synthetic documents."""
    corpus, knowledge = synthetic()
    prepared_dir = tmp_path_factory.mktemp("prepared") / "out"
    prepare(CFG, None, prepared_dir, documents=(corpus, knowledge), progress=False)
    data_dir = tmp_path_factory.mktemp("tfds")
    corpus_builder = build(tfds_builders.M3Corpus, data_dir, corpus, heldout_fraction=FRACTION)
    knowledge_builder = build(tfds_builders.M3Knowledge, data_dir, knowledge)
    return dict(corpus=corpus, knowledge=knowledge, prepared_dir=prepared_dir, data_dir=data_dir,
                corpus_builder=corpus_builder, knowledge_builder=knowledge_builder)


@pytest.fixture
def registered(world):
    return tasks.register_tasks(world["data_dir"], world["prepared_dir"] / "tokenizer.model", CFG)


def test_builders_split_like_prepare_and_keep_document_order(world):
    corpus, knowledge = world["corpus"], world["knowledge"]
    builder = world["corpus_builder"]
    assert builder.info.full_name == "m3_corpus/heldout_0p1/1.0.0"
    for split, wanted in (("train", False), ("heldout", True)):
        expected = [d for d in corpus if is_heldout(d.doc_id, FRACTION) == wanted]
        got = read(builder, split)
        assert [g["doc_id"].decode() for g in got] == [d.doc_id for d in expected]
        assert [g["text"].decode() for g in got] == [d.text for d in expected]
    assert 5 <= builder.info.splits["heldout"].num_examples < 40
    got = read(world["knowledge_builder"], "train")
    assert [(g["source"].decode(), g["title"].decode()) for g in got] == [(d.source, d.title) for d in knowledge]
    default = tfds_builders.M3Corpus(data_dir=str(world["data_dir"]), heldout_fraction=0.01)
    assert default.builder_config.name == "heldout_0p01" and default.builder_config.heldout_fraction == 0.01
    # what seqio calls: the config name alone gives back the fraction
    assert tfds.builder("m3_corpus/heldout_0p1", data_dir=str(world["data_dir"])).info.splits["train"].num_examples \
        == len(corpus) - builder.info.splits["heldout"].num_examples


def test_pack_documents_matches_prepare_pack():
    rng = np.random.default_rng(1)
    docs = [rng.integers(3, 100, rng.integers(0, 40)).tolist() for _ in range(50)] + [[], list(range(3, 33))]
    features = {"targets": seqio.Feature(seqio.PassThroughVocabulary(100, eos_id=2), add_eos=False)}
    ds = tf.data.Dataset.from_generator(lambda: ({"targets": np.array(d, np.int32)} for d in docs),
                                        output_signature={"targets": tf.TensorSpec([None], tf.int32)})
    for seq_len in (1, 7, 16):
        got = [e["targets"] for e in tasks.pack_documents(ds, features, seq_len).as_numpy_iterator()]
        np.testing.assert_array_equal(np.array(got).reshape(-1, seq_len), pack(docs, seq_len))


def test_pretrain_task_yields_exactly_the_prepared_rows(world, registered):
    _, arrays = open_prepared(world["prepared_dir"])
    task = registered[tasks.PRETRAIN]
    for split in ("train", "heldout"):
        (rows,) = rows_of(task, split, "targets")
        assert len(rows) >= 5
        np.testing.assert_array_equal(rows, arrays[f"{split}_tokens"])
    assert seqio.get_mixture_or_task(tasks.PRETRAIN) is task


def test_continual_task_attaches_the_prepared_reference_ids(world, registered):
    _, arrays = open_prepared(world["prepared_dir"])
    task = registered[tasks.CONTINUAL]
    tokens, ref_ids = rows_of(task, "train", "targets", "ref_ids")
    assert len(tokens) == 6 < len(arrays["train_tokens"])  # the stage-2 subset, not every row
    np.testing.assert_array_equal(tokens, arrays["continual_tokens"])
    np.testing.assert_array_equal(ref_ids, arrays["continual_ref_ids"])
    tokens, ref_ids = rows_of(task, "heldout", "targets", "ref_ids")
    np.testing.assert_array_equal(tokens, arrays["heldout_tokens"])
    np.testing.assert_array_equal(ref_ids, arrays["heldout_ref_ids"])
    assert ref_ids.shape[1] == CFG.data.seq_len // CFG.memory.chunk_len

    # the loader over the exported arrays reads the very rows the task gives
    loader = StepLoader({"tokens": arrays["heldout_tokens"], "ref_ids": arrays["heldout_ref_ids"]}, 2, seed=3)
    for step in (0, 1, 5):
        batch = loader.batch(step)
        np.testing.assert_array_equal(batch["tokens"], tokens[loader.indices(step)])
        np.testing.assert_array_equal(batch["ref_ids"], ref_ids[loader.indices(step)])


def test_loader_yields_the_task_rows(world, registered):
    _, arrays = open_prepared(world["prepared_dir"])
    (rows,) = rows_of(registered[tasks.PRETRAIN], "train", "targets")
    loader = StepLoader({"tokens": arrays["train_tokens"]}, 4, seed=0)
    for step in (0, 3, 2 * len(rows)):
        np.testing.assert_array_equal(loader.batch(step)["tokens"], rows[loader.indices(step)])


def test_continual_task_refuses_a_corpus_that_does_not_match(world, tmp_path):
    corpus = world["corpus"][1:]  # one document fewer: every later row shifts
    build(tfds_builders.M3Corpus, tmp_path, corpus, heldout_fraction=FRACTION)
    try:
        registered = tasks.register_tasks(tmp_path, world["prepared_dir"] / "tokenizer.model", CFG,
                                          prepared_dir=world["prepared_dir"])
        with pytest.raises(tf.errors.OpError, match="packed row 0 of the TFDS corpus differs"):
            rows_of(registered[tasks.CONTINUAL], "train", "targets")
    finally:
        tasks.register_tasks(world["data_dir"], world["prepared_dir"] / "tokenizer.model", CFG)


@pytest.mark.parametrize("name", [tasks.C4_PRETRAIN, tasks.WIKIPEDIA_PRETRAIN])
def test_public_corpus_tasks_pack_to_seq_len(world, registered, name):
    vocab_size = open_prepared(world["prepared_dir"])[0]["vocab_size"]
    with tfds.testing.mock_data(num_examples=20):
        # try_in_mem_cache=False: seqio would ask for the split size, which mocked c4 does not record
        ds = registered[name].get_dataset({"targets": CFG.data.seq_len}, split="train", shuffle=False,
                                          try_in_mem_cache=False)
        rows = np.stack([e["targets"] for e in ds.as_numpy_iterator()])
    assert rows.shape[0] >= 1 and rows.shape[1] == CFG.data.seq_len
    assert 0 <= rows.min() and rows.max() < vocab_size
