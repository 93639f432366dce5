"""The leakage filter against a brute force: DP LCS over every window start and every length <= 2|r|."""
import numpy as np
import pytest

from m3jax.retrieval.leakage import leaking_references, leaks, overlap


def lcs(a, b):
    row = [0] * (len(b) + 1)
    for x in a:
        new = [0]
        for j, y in enumerate(b):
            new.append(row[j] + 1 if x == y else max(row[j + 1], new[j]))
        row = new
    return row[-1]


def brute_lcs(text, ref):
    text, ref = list(text), list(ref)
    best = 0
    for start in range(len(text)):
        for length in range(1, 2 * len(ref) + 1):
            if start + length <= len(text):
                best = max(best, lcs(ref, text[start:start + length]))
    return best


def brute_overlap(text, ref):
    return brute_lcs(text, ref) / len(ref)


def check(text, ref):
    want = brute_overlap(text, ref)
    assert overlap(text, ref) == want, (text, ref)
    for thr in {want, want - 1e-9, want + 1e-9, 0.5, 2 / 3, 0.9}:
        assert leaks(text, ref, thr) == (want > thr), (text, ref, thr)


@pytest.mark.parametrize("vocab", [2, 3, 5])
def test_random_small(vocab):
    rng = np.random.default_rng(vocab)
    for _ in range(150):
        text = rng.integers(0, vocab, rng.integers(0, 41))
        ref = rng.integers(0, vocab, rng.integers(1, 21))
        check(text, ref)


def test_random_multiword_reference():
    # |r| > 64 exercises the carry between uint64 words (and > 128 a third word). The full brute force is
    # too slow at these sizes; the small cases above check that windows of length min(2|r|, |t|) suffice.
    rng = np.random.default_rng(7)
    for m in (63, 64, 65, 100, 130):
        ref = rng.integers(0, 3, m)
        mutated = np.where(rng.random(m) < 0.3, rng.integers(0, 4, m), ref)
        noisy = np.insert(mutated, np.arange(0, m, 4), 3)
        for text in (rng.integers(0, 3, 2 * m - 5), rng.integers(0, 4, 2 * m + 9),
                     np.concatenate([rng.integers(0, 4, 7), noisy, rng.integers(0, 4, 5)])):
            span = min(2 * m, len(text))
            want = max(lcs(ref, text[s:s + span]) for s in range(len(text) - span + 1))
            assert overlap(text, ref) == want / m


def test_reference_equal_to_text():
    ref = [3, 1, 4, 1, 5, 9, 2, 6]
    assert overlap(ref, ref) == 1.0
    assert leaks(ref, ref, 0.9) and not leaks(ref, ref, 1.0)


def test_noise_inserted_between_tokens():
    rng = np.random.default_rng(1)
    ref = list(rng.integers(0, 50, 10))
    for gap in (0, 1, 2, 3):  # the LCS spreads over 10 + 9 * gap tokens: beyond 2|r| for gap >= 2
        text = [100, 101]
        for tok in ref:
            text += [tok] + [200 + g for g in range(gap)]
        check(text, ref)
    assert overlap([t for tok in ref for t in (tok, 999)], ref) == 1.0  # spread over 2|r| - 1 tokens


def test_halves_far_apart():
    ref = list(range(10))
    text = ref[:5] + [99] * 30 + ref[5:]
    assert overlap(text, ref) == brute_overlap(text, ref) == 0.5
    assert overlap(ref[:5] + [99] * 10 + ref[5:], ref) == 1.0  # 20 tokens: still one window


def test_repeated_tokens():
    check([1] * 30, [1] * 5)
    check([1] * 3, [1] * 5)
    check([1, 2] * 15, [1] * 6 + [2] * 6)
    check([1] * 12 + [2] * 12, [1, 2] * 5)


def test_reversed_reference():
    ref = list(range(12))
    check(ref[::-1], ref)
    check(list(range(20))[::-1] + ref, ref[::-1])


def test_text_shorter_than_reference():
    check([1, 2], [0, 1, 2, 3, 4, 5])
    check([7], [7, 7, 7])


def test_reference_of_length_one():
    assert overlap([5, 6, 7], [6]) == 1.0
    assert overlap([5, 6, 7], [8]) == 0.0
    assert not leaks([5, 6, 7], [6], 1.0) and leaks([5, 6, 7], [6], 0.99)


def test_threshold_boundary_does_not_leak():
    # overlap exactly 2/3 and 0.9: "exceeds" means equality does not leak.
    assert overlap([1, 2, 9, 9, 9, 9], [1, 2, 3]) == 2 / 3
    assert not leaks([1, 2, 9, 9, 9, 9], [1, 2, 3], 2 / 3)
    ref = list(range(10))
    text = ref[:9] + [50]
    assert overlap(text, ref) == 0.9 and not leaks(text, ref, 0.9) and leaks(text, ref, 0.89)
    assert not leaking_references(text, [ref], 0.9)[0]


def test_empty_inputs():
    assert overlap([], [1, 2]) == 0.0 and not leaks([], [1, 2], 0.0)
    with pytest.raises(ValueError, match="empty reference"):
        overlap([1, 2], [])
    with pytest.raises(ValueError, match="empty reference"):
        leaking_references([1, 2], [[1], []], 0.5)


def test_input_validation():
    with pytest.raises(ValueError, match="1-D"):
        overlap(np.zeros((2, 3), int), [1])
    with pytest.raises(ValueError, match="1-D"):
        leaks([1, 2], np.int64(1), 0.5)
    with pytest.raises(ValueError, match="integer"):
        overlap([1.0, 2.0], [1])
    with pytest.raises(ValueError, match="integer"):
        overlap([1, 2], np.array([True]))
    assert overlap(np.array([1, 2, 3], np.uint16), np.array([2, 3], np.int32)) == 1.0


def test_leaking_references_batch():
    rng = np.random.default_rng(3)
    for _ in range(20):
        text = list(rng.integers(0, 4, rng.integers(0, 40)))
        refs = [list(rng.integers(0, 4, rng.integers(1, 15))) for _ in range(6)]
        refs.append(text[5:15] or [0])  # a planted one
        for thr in (0.5, 2 / 3, 0.9):
            want = np.array([brute_overlap(text, r) > thr for r in refs])
            got = leaking_references(text, refs, thr)
            assert got.dtype == bool and got.shape == (len(refs),)
            np.testing.assert_array_equal(got, want)
    assert leaking_references([1, 2], [], 0.5).shape == (0,)
