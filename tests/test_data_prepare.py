"""`prepare` on synthetic documents: arrays, tokenizer, references, retrieval with the leakage filter."""
import os
import subprocess
import sys

import numpy as np
import pytest

from m3jax import config as config_lib
from m3jax.data.loader import StepLoader
from m3jax.data.prepare import open_prepared, prepare
from m3jax.data.tokenizer import Tokenizer, sample
from m3jax.retrieval.leakage import overlap
from synthetic_data import synthetic


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cfg = config_lib.load("tiny")
    out = tmp_path_factory.mktemp("data") / "prepared"
    meta = prepare(cfg, None, out, documents=synthetic(), progress=False)
    return cfg, out, meta


def test_arrays_and_metadata(prepared):
    cfg, out, meta = prepared
    meta2, arrays = open_prepared(out, verify=True)
    assert meta2 == meta
    n_train, t = arrays["train_tokens"].shape
    assert t == cfg.data.seq_len and n_train > 10 and len(arrays["heldout_tokens"]) >= 1
    assert arrays["continual_ref_ids"].shape == (len(arrays["continual_tokens"]), cfg.data.seq_len // cfg.memory.chunk_len)
    assert len(arrays["continual_tokens"]) == n_train  # tiny asks for more than there are: all of them
    assert arrays["heldout_ref_ids"].shape[0] == len(arrays["heldout_tokens"])
    assert arrays["train_tokens"].max() < meta["vocab_size"] <= cfg.model.vocab_size
    assert meta["reference_prefix_ids"] == list(cfg.memory.reference_prefix_ids)
    assert arrays["ref_lengths"].max() <= cfg.memory.reference_len and arrays["ref_lengths"].min() >= 1
    assert meta["documents"]["train"] + meta["documents"]["heldout"] == 400


def test_references_decode_to_the_knowledge_text(prepared):
    _, out, _ = prepared
    _, arrays = open_prepared(out)
    tokenizer = Tokenizer(out / "tokenizer.model")
    first = tokenizer.decode(arrays["ref_tokens"][0, :arrays["ref_lengths"][0]])
    assert first.split(".")[0] == synthetic()[1][0].text.split(".")[0]


def test_every_chunk_reference_respects_the_leakage_filter(prepared):
    cfg, out, _ = prepared
    _, arrays = open_prepared(out)
    tokens, ref_ids = arrays["continual_tokens"], arrays["continual_ref_ids"]
    assert (ref_ids >= 0).mean() > 0.5  # most chunks found something
    for i in range(len(tokens)):
        for j in set(ref_ids[i][ref_ids[i] >= 0].tolist()):
            ref = arrays["ref_tokens"][j, :arrays["ref_lengths"][j]]
            assert overlap(tokens[i], ref) <= cfg.memory.leak_threshold_train


def test_loader_reads_what_prepare_wrote(prepared):
    _, out, _ = prepared
    _, arrays = open_prepared(out)
    loader = StepLoader({"tokens": arrays["continual_tokens"], "ref_ids": arrays["continual_ref_ids"]}, 4, seed=0)
    rows = loader.indices(2)
    batch = loader.batch(2)
    np.testing.assert_array_equal(batch["tokens"], arrays["continual_tokens"][rows])
    np.testing.assert_array_equal(batch["ref_ids"], arrays["continual_ref_ids"][rows])


def test_continual_subset(tmp_path):
    cfg = config_lib.load("tiny", {"data.continual_sequences": 5})
    prepare(cfg, None, tmp_path / "p", documents=synthetic(), progress=False)
    _, arrays = open_prepared(tmp_path / "p")
    assert arrays["continual_tokens"].shape[0] == arrays["continual_ref_ids"].shape[0] == 5
    train = {row.tobytes() for row in np.asarray(arrays["train_tokens"])}
    assert all(row.tobytes() in train for row in np.asarray(arrays["continual_tokens"]))


def test_failures_leave_nothing_that_looks_complete(prepared, tmp_path):
    cfg, out, _ = prepared
    with pytest.raises(FileExistsError, match="already holds prepared data"):
        prepare(cfg, None, out, documents=synthetic(), progress=False)

    def broken():
        yield from synthetic()[0][:50]
        raise OSError("archive truncated")

    with pytest.raises(OSError, match="archive truncated"):
        prepare(cfg, None, tmp_path / "broken", documents=(broken(), synthetic()[1]), progress=False)
    assert not (tmp_path / "broken").exists()
    with pytest.raises(ValueError, match="knowledge base is empty"):
        prepare(cfg, None, tmp_path / "empty", documents=(synthetic()[0], []), progress=False)
    with pytest.raises(FileNotFoundError, match="run `m3jax data prepare`"):
        open_prepared(tmp_path / "nothing")


def test_cli_memory_build_from_prepared_data(prepared, tmp_path):
    _, out, _ = prepared
    built = subprocess.run([sys.executable, "-m", "m3jax.cli", "memory", "build", "--config=tiny", f"--references={out}",
                            f"--bank={tmp_path / 'bank'}"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    assert "references" in built.stdout


def test_chunk_alignment_survives_packing():
    """Chunk c of a packed sequence is queried with exactly its own 64 (here 4) tokens, in order."""
    from m3jax.data.prepare import pack, retrieve_for_chunks

    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    sequences = pack(docs, seq_len=8)
    np.testing.assert_array_equal(sequences, [[5, 6, 7, 2, 8, 9, 2, 10]])  # </s> = 2 closes each document

    class Recorder:
        queries = []

        def retrieve(self, texts, k):
            self.queries.extend(texts)
            return np.zeros((len(texts), k), np.float32), np.full((len(texts), k), -1)

    recorder = Recorder()
    ids = retrieve_for_chunks(sequences, 4, recorder, lambda t: " ".join(map(str, t)), np.zeros((1, 4), np.uint16),
                              np.ones(1, np.int32), 0.9, progress=False)
    assert recorder.queries == ["5 6 7 2", "8 9 2 10"] and ids.shape == (1, 2) and (ids == -1).all()


def test_pack_and_unpack_round_trip(prepared, tmp_path):
    from m3jax.data.pack import pack, unpack

    _, out, meta = prepared
    pack(out, tmp_path / "packed")
    restored = unpack(tmp_path / "packed", tmp_path / "restored")
    meta2, arrays2 = open_prepared(restored, verify=True)
    _, arrays = open_prepared(out)
    assert meta2 == meta
    for name in arrays:
        np.testing.assert_array_equal(arrays2[name], arrays[name])
    assert (restored / "ref_texts.json").is_file()
    victim = tmp_path / "packed" / "ref_tokens.npy.xz"
    victim.write_bytes(victim.read_bytes()[:-20])
    with pytest.raises(ValueError, match="ref_tokens.npy.xz"):
        unpack(tmp_path / "packed", tmp_path / "again")
    assert not (tmp_path / "again").exists()


# trains a vocabulary on a sample of a corpus larger than the sample, in a fresh process, and prints its hash
_TRAIN = """
import hashlib, random, sys
from m3jax.data import tokenizer
rng = random.Random(7)
words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(400)]
lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000)]
path = tokenizer.train(lines, sys.argv[1], vocab_size=300, max_sentences=1000, seed=int(sys.argv[2]))
print(hashlib.sha256(path.read_bytes()).hexdigest())
"""


def test_the_vocabulary_is_the_same_in_every_process(tmp_path):
    """Prepared data must be reproducible: a sampled corpus (more lines than max_sentences) gives the same
    model in two processes (SentencePiece's own sampling did not, whatever its seed), another seed another."""
    def trained(name, seed):
        out = subprocess.run([sys.executable, "-c", _TRAIN, str(tmp_path / name), str(seed)], capture_output=True,
                             text=True, env={**os.environ, "PYTHONHASHSEED": "random"})
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()
    first = trained("a.model", 0)
    assert trained("b.model", 0) == first
    assert trained("c.model", 1) != first


def test_sample_is_uniform_and_reproducible():
    texts = [str(i) for i in range(1000)]
    picks = sample(texts, 100, seed=3)
    assert len(picks) == len(set(picks)) == 100 and set(picks) <= set(texts)
    assert picks == sample(iter(texts), 100, seed=3) and picks != sample(texts, 100, seed=4)
    assert sample(texts[:50], 100, seed=3) == texts[:50]  # fewer than k: all, in order
    # uniform: each text is kept with probability 0.1; over 200 seeds, the first and last tenths alike
    counts = np.zeros(1000)
    for seed in range(200):
        counts[[int(t) for t in sample(texts, 100, seed)]] += 1
    assert abs(counts[:100].mean() - 20) < 2 and abs(counts[-100:].mean() - 20) < 2
