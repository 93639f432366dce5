"""The step-indexed loader: determinism, resume without state, disjoint and complete host shards."""
import numpy as np
import pytest

from m3jax.data.loader import StepLoader, gather_references
from m3jax.data.references import sentences, split_references
from m3jax.data.split import heldout_fraction_of, is_heldout


def data(n=37, t=8):
    tokens = np.arange(n * t).reshape(n, t)
    return {"tokens": tokens, "ref_ids": np.arange(n)[:, None] * 10 + np.arange(4)}


def test_batches_are_a_pure_function_of_seed_and_step():
    a, b = StepLoader(data(), 8, seed=3), StepLoader(data(), 8, seed=3)
    for step in (5, 0, 17, 5):  # any order, like a resume
        np.testing.assert_array_equal(a.batch(step)["tokens"], b.batch(step)["tokens"])
    assert not np.array_equal(StepLoader(data(), 8, seed=4).batch(0)["tokens"], a.batch(0)["tokens"])


def test_each_epoch_is_a_permutation_and_rows_stay_together():
    loader = StepLoader(data(n=32), 8, seed=0)
    seen = np.concatenate([loader.indices(s) for s in range(4)])  # exactly one epoch
    assert sorted(seen) == list(range(32))
    batch = loader.batch(1)
    np.testing.assert_array_equal(batch["ref_ids"][:, 0], batch["tokens"][:, 0] // 8 * 10)
    assert loader.epoch_of(4) == 1 and not np.array_equal(loader.indices(4), loader.indices(0))


def test_epoch_boundary_inside_a_batch():
    loader = StepLoader(data(n=10), 4, seed=1)
    rows = np.concatenate([loader.indices(s) for s in range(5)])  # 20 positions = 2 epochs
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))


@pytest.mark.parametrize("processes", [2, 4])
def test_hosts_see_disjoint_complete_shards(processes):
    whole = StepLoader(data(), 8, seed=2)
    for step in range(6):
        parts = [StepLoader(data(), 8, seed=2, process_index=p, process_count=processes).batch(step)["tokens"]
                 for p in range(processes)]
        np.testing.assert_array_equal(np.concatenate(parts), whole.batch(step)["tokens"])


def test_memory_mapped_arrays(tmp_path):
    np.save(tmp_path / "tokens.npy", data()["tokens"])
    mapped = StepLoader({"tokens": np.load(tmp_path / "tokens.npy", mmap_mode="r")}, 8, seed=5)
    np.testing.assert_array_equal(mapped.batch(3)["tokens"], StepLoader({"tokens": data()["tokens"]}, 8, seed=5).batch(3)["tokens"])


def test_bad_loader_arguments():
    with pytest.raises(ValueError, match="disagree on the number of examples"):
        StepLoader({"a": np.zeros((3, 2)), "b": np.zeros((4, 2))}, 2)
    with pytest.raises(ValueError, match="divisible by the 3 processes"):
        StepLoader(data(), 8, process_count=3)
    with pytest.raises(ValueError, match="empty"):
        StepLoader({"a": np.zeros((0, 2))}, 2)


def test_gather_references_by_id():
    ref_tokens = np.arange(12).reshape(4, 3) + 10
    ref_lengths = np.array([3, 1, 2, 3])
    tokens, lengths = gather_references(ref_tokens, ref_lengths, np.array([[2, -1], [0, 3]]))
    assert tokens.dtype == lengths.dtype == np.int32
    assert tokens.tolist() == [[[16, 17, 18], [0, 0, 0]], [[10, 11, 12], [19, 20, 21]]]
    assert lengths.tolist() == [[2, 0], [3, 3]]


def test_split_is_stable_and_about_the_fraction():
    # a fixed value: the split must never change between runs, machines or Python versions
    assert abs(heldout_fraction_of("gcide:apple") - int.from_bytes(
        __import__("hashlib").sha256(b"gcide:apple").digest()[:8], "big") / 2 ** 64) < 1e-15
    ids = [f"doc:{i}" for i in range(20000)]
    share = np.mean([is_heldout(i, 0.01) for i in ids])
    assert 0.007 < share < 0.013


def test_references_cut_at_sentences_and_never_exceed_the_limit():
    encode = lambda s: [len(w) for w in s.split()]  # noqa: E731 - one token per word
    text = "One two three. Four five six seven! A b. " + " ".join(["w"] * 11) + ". End."
    refs = list(split_references(text, encode, max_tokens=5))
    assert [len(r) for r in refs] == [3, 4, 2, 5, 5, 2]  # the 11-word sentence is cut; its tail joins "End."
    assert sum(len(r) for r in refs) == len(encode(text))  # nothing dropped
    assert sentences('He said "Go." Then left.') == ['He said "Go."', "Then left."]
