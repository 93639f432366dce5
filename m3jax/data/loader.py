"""A step-indexed, deterministic loader over prepared arrays (no TensorFlow).

Batch `step` is a pure function of (seed, step): the stream of examples is the concatenation of
per-epoch permutations drawn from (seed, epoch), and global batch `step` is positions
[step * B, (step + 1) * B) of that stream. Resuming at step s needs no iterator state. With several
processes, process p takes rows [p * B/P, (p + 1) * B/P) of each global batch, so hosts see disjoint
parts that together make the whole batch; arrays opened with `mmap_mode="r"` are read only where used.
"""
from __future__ import annotations

import numpy as np


class StepLoader:
    def __init__(self, arrays: dict, global_batch: int, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1):
        """arrays: name -> array with the example index first (e.g. tokens (N, T), ref_ids (N, C))."""
        if not arrays:
            raise ValueError("no arrays to load")
        sizes = {name: len(a) for name, a in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"arrays disagree on the number of examples: {sizes}")
        self.size = next(iter(sizes.values()))
        if self.size == 0:
            raise ValueError("the dataset is empty")
        if global_batch < 1 or global_batch % process_count:
            raise ValueError(f"global batch {global_batch} must be positive and divisible by the "
                             f"{process_count} processes")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process index {process_index} outside 0..{process_count - 1}")
        self.arrays, self.global_batch, self.seed, self.shuffle = arrays, global_batch, seed, shuffle
        self.local_batch = global_batch // process_count
        self.process_index = process_index
        self._perm_cache: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.size)}
        return self._perm_cache[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Example indices of this process's rows of global batch `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        first = step * self.global_batch + self.process_index * self.local_batch
        positions = first + np.arange(self.local_batch)
        epochs, offsets = np.divmod(positions, self.size)
        return np.array([self._order(int(e))[o] for e, o in zip(epochs, offsets)])

    def batch(self, step: int) -> dict:
        rows = self.indices(step)
        order = np.argsort(rows)  # sorted reads are kinder to memory-mapped files
        out = {}
        for name, array in self.arrays.items():
            picked = np.asarray(array[rows[order]])
            out[name] = picked[np.argsort(order)]
        return out

    def epoch_of(self, step: int) -> int:
        return step * self.global_batch // self.size


def gather_references(ref_tokens, ref_lengths, ids) -> tuple[np.ndarray, np.ndarray]:
    """Reference ids of any shape (-1: none retrieved) -> their tokens (*ids.shape, reference_len) and
    lengths (*ids.shape), int32, zeros where there is no reference."""
    ids = np.asarray(ids)
    found, safe = ids >= 0, np.maximum(ids, 0)
    return (np.where(found[..., None], np.asarray(ref_tokens)[safe], 0).astype(np.int32),
            np.where(found, np.asarray(ref_lengths)[safe], 0).astype(np.int32))
