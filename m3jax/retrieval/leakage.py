"""Leakage filter for Memory3 training data: does a retrieved reference give away the text?

A reference r (token ids) leaks into a text t when overlap(t, r) exceeds a threshold (the paper uses
0.9 while training and 2/3 at evaluation; here it is always a parameter), where

    overlap(t, r) = max over windows w of t with |w| <= 2|r| of LCS(r, w) / |r|

with LCS the longest common *subsequence*; a text shorter than 2|r| is one window.

Algorithm (exact, pure NumPy):

1. LCS only grows when the window grows, and only text tokens that occur in r can match, so it is
   enough to look at the "hits" (positions of t holding a token of r) and, for each hit i, at the
   run of hits in [pos_i, pos_i + L), L = min(2|r|, |t|). Runs contained in the previous run are
   dropped. Every window's hits lie in some run and every run lies in some window, so the maximum
   LCS over runs equals the maximum over windows.
2. Each run gets an upper bound, sum over tokens v of min(count of v in r, count of v in the run),
   computed for all runs at once in O(hits): a hit counts for run i iff fewer than count_r(v)
   earlier hits of the same token lie in [i, hit), a range of run starts, so a difference array does it.
3. Runs are evaluated in decreasing bound order, in growing batches, with the bit-parallel LCS of
   Allison-Dix / Hyyro (V = ones; per char c: U = V & Match[c]; V = (V + U) | (V - U); LCS = zero
   bits of V), vectorised across the batch with |r| bits spread over uint64 words. Batches stop as
   soon as the best bound cannot beat the best LCS found (or the threshold, in `leaks`).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


def _tokens(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of token ids, got shape {a.shape}")
    if a.size and a.dtype.kind not in "iu":  # an empty list arrives as float64: allow it
        raise ValueError(f"{name} must hold integer token ids, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _lcs_runs(sym: np.ndarray, match: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """LCS(r, sym[a:b]) for every run (a, b); match[w, s] holds word w of the bit mask of symbol s in r,
    and the last column (symbol id len(match[0]) - 1) is all zeros, used to pad shorter runs."""
    words, pad = match.shape[0], match.shape[1] - 1
    lengths = stops - starts
    steps = np.arange(lengths.max())[:, None]
    # chars[s, b]: s-th symbol of run b; past its end the all-zero symbol, which leaves V unchanged.
    chars = np.append(sym, pad)[np.where(steps < lengths, starts + steps, len(sym))]
    v = [np.full(len(starts), _ONES) for _ in range(words)]
    for ch in chars:
        carry = None
        for w in range(words):
            a = v[w]
            u = a & match[w][ch]
            s = a + u if carry is None else a + u + carry
            if w + 1 < words:  # the sum's carry out of this word (u + carry <= 2^64, so s == a means a wrap)
                carry = s < a if carry is None else (s < a) | ((s == a) & carry)
            v[w] = s | (a - u)  # U is a subset of V bitwise, so V - U never borrows across words
    # Bits above |r| stay set (no symbol matches there), so the zero bits are exactly the LCS.
    return 64 * words - sum(np.bitwise_count(x).astype(np.int64) for x in v)


def _best_lcs(text: np.ndarray, ref: np.ndarray, threshold: float | None = None) -> int:
    """Max LCS(ref, window) over windows; with a threshold, stops as soon as LCS / |ref| > threshold
    (the result is then a lower bound, still on the right side of the threshold)."""
    m = len(ref)
    if m == 0:
        raise ValueError("empty reference: overlap is defined only for references with at least one token")
    vocab, ref_sym, ref_count = np.unique(ref, return_inverse=True, return_counts=True)
    slot = np.minimum(np.searchsorted(vocab, text), len(vocab) - 1)
    pos = np.flatnonzero(vocab[slot] == text)  # hits: text positions holding a token of ref
    if len(pos) == 0:
        return 0
    sym, k = slot[pos], len(pos)
    span = min(2 * m, len(text))
    # Step 1: run i covers hits [i, stop[i]); keep runs not inside the previous one.
    stop = np.searchsorted(pos, pos + span)
    runs = np.flatnonzero(np.diff(stop, prepend=0) > 0)
    # Step 2: hit h (token v) counts for run i iff i <= h, run i reaches h, and fewer than count_r(v)
    # hits of v lie in [i, h): i > prev[h], the hit count_r(v) occurrences of v back (-1 if none).
    by_sym = np.argsort(sym, kind="stable")
    back = ref_count[sym[by_sym]]
    rank = np.arange(k) - np.searchsorted(sym[by_sym], sym[by_sym])  # occurrences of v before h
    prev = np.full(k, -1)
    prev[by_sym] = np.where(rank >= back, by_sym[np.maximum(np.arange(k) - back, 0)], -1)
    lo = np.maximum(prev + 1, np.searchsorted(pos, pos - span, side="right"))
    # Runs lo[h]..h count hit h: bound[i] = #{h: lo[h] <= i} - #{h: h < i}, since lo[h] <= h.
    bound = (np.cumsum(np.bincount(lo, minlength=k)) - np.arange(k))[runs]
    if threshold is not None:  # a run whose bound does not exceed the threshold cannot leak
        keep = bound / m > threshold
        runs, bound = runs[keep], bound[keep]
    by_bound = np.argsort(-bound, kind="stable")
    runs, bound = runs[by_bound], bound[by_bound]
    # Step 3: bit masks of ref's symbols, then exact LCS by decreasing bound, in batches of 64, 512, ...
    words = -(-m // 64)
    match = np.zeros((words, len(vocab) + 1), np.uint64)
    j = np.arange(m)
    np.bitwise_or.at(match, (j // 64, ref_sym), np.uint64(1) << (j % 64).astype(np.uint64))
    best, done, size = 0, 0, 64
    while done < len(runs) and bound[done] > best:
        batch = runs[done:done + size]
        best = max(best, int(_lcs_runs(sym, match, batch, stop[batch]).max()))
        if threshold is not None and best / m > threshold:
            break
        done, size = done + size, size * 8
    return best


def overlap(text: Sequence[int] | np.ndarray, reference: Sequence[int] | np.ndarray) -> float:
    """Max over windows w of text with |w| <= 2|reference| of LCS(reference, w) / |reference|."""
    ref = _tokens(reference, "reference")
    return _best_lcs(_tokens(text, "text"), ref) / len(ref)


def leaks(text: Sequence[int] | np.ndarray, reference: Sequence[int] | np.ndarray, threshold: float) -> bool:
    """Whether overlap(text, reference) > threshold (strictly), pruning windows that cannot exceed it."""
    ref = _tokens(reference, "reference")
    return _best_lcs(_tokens(text, "text"), ref, threshold) / len(ref) > threshold


def leaking_references(text: Sequence[int] | np.ndarray, references: Iterable[Sequence[int] | np.ndarray],
                       threshold: float) -> np.ndarray:
    """Boolean array: leaks(text, r, threshold) for each reference r (any lengths)."""
    text = _tokens(text, "text")
    out = []
    for i, r in enumerate(references):
        ref = _tokens(r, f"references[{i}]")
        out.append(_best_lcs(text, ref, threshold) / len(ref) > threshold)
    return np.array(out, dtype=bool)
