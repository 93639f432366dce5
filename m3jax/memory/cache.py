"""Reading memories for a batch: gather by reference id through an LRU RAM cache, prefetch to the device.

Neighbouring chunks often retrieve the same references (SPEC 4), so a batch's ids are deduplicated,
cached ones are served from RAM, and only the rest is read from the bank, in one request. A
`Prefetcher` does this for the next batches in a background thread while the device computes.
"""
from __future__ import annotations

import collections
import queue
import threading

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from m3jax.model.lm import MemoryInputs

NO_REFERENCE = -1  # an id meaning "nothing retrieved here" (e.g. dropped by the leakage filter)


class CachedBankReader:
    def __init__(self, bank, capacity: int = 4096, dtype=ml_dtypes.bfloat16):
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0, got {capacity}")
        self.bank, self.capacity, self.dtype = bank, capacity, dtype
        self._cache: collections.OrderedDict[int, tuple] = collections.OrderedDict()
        self.hits = self.misses = 0
        self._lock = threading.Lock()  # generation reads for several batches from threads

    def gather(self, ids):
        """ids: integer array of any shape (NO_REFERENCE allowed) -> memories (*ids.shape, *memory_shape) in
        `dtype` and slot validity (*ids.shape, tokens_per_head)."""
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"reference ids must be integers, got {ids.dtype}")
        with self._lock:
            return self._gather(ids)

    def _gather(self, ids):
        shape = self.bank.memory_shape
        unique, inverse = np.unique(ids.reshape(-1), return_inverse=True)
        # One table row per distinct id (zeros and no valid slot for NO_REFERENCE), filled from the cache
        # or by one bank read in the reader's dtype; the output is the table indexed by `inverse`. When
        # every distinct id is read (cache off or cold), the read's own array is the table: no extra pass.
        real = np.flatnonzero(unique != NO_REFERENCE)
        cached = np.array([int(unique[j]) in self._cache for j in real], bool)
        missing = real[~cached]
        self.hits += int(cached.sum())
        self.misses += len(missing)
        if len(missing) == len(unique):  # all read from the bank (cache off, or cold): its read is the table
            table, valid = self.bank.read(unique, self.dtype)
        else:
            table = np.zeros((len(unique), *shape), self.dtype)
            valid = np.zeros((len(unique), shape[3]), bool)
            if len(missing):
                table[missing], valid[missing] = self.bank.read(unique[missing], self.dtype)
        for j in real[cached]:
            table[j], valid[j] = self._cache[int(unique[j])]
        if self.capacity:
            for j in real:  # mark as most recently used (copies: a view would keep the whole table alive)
                i = int(unique[j])
                if i not in self._cache:
                    self._cache[i] = (table[j].copy(), valid[j].copy())
                self._cache.move_to_end(i)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        inverse = inverse.reshape(-1)
        return table[inverse].reshape(ids.shape + shape), valid[inverse].reshape(ids.shape + shape[3:4])

    def memory_inputs(self, ids, window: int = 1) -> MemoryInputs:
        """ids: (B, C, R) -> MemoryInputs on the host, ready for `jax.device_put`."""
        ids = np.asarray(ids)
        if ids.ndim != 3:
            raise ValueError(f"ids must have shape (batch, chunks, references per chunk), got {ids.shape}")
        memories, valid = self.gather(ids)
        return MemoryInputs(memories, valid, window)


def to_device(tree, parts: int = 8, min_bytes: int = 1 << 24):
    """`jax.device_put` of host arrays, each of at least `min_bytes` as `parts` pieces along its leading
    axis joined on the device. JAX copies separate host arrays concurrently and one pageable array in
    a single stream: a batch's 144 MB of memories reaches an H200 in a third of the time
    (benchmarks/bank_read.py). Smaller arrays go as they are."""
    def put(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.nbytes < min_bytes or len(x) < parts:
            return jax.device_put(x)
        return jnp.concatenate(jax.device_put(np.array_split(x, parts)))
    return jax.tree.map(put, tree)


class Prefetcher:
    """Iterate MemoryInputs on device for a sequence of id batches, `depth` batches ahead of use."""

    _END = object()

    def __init__(self, reader: CachedBankReader, id_batches, depth: int = 2, window: int = 1, sharding=None):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()

        def work():
            try:
                for ids in id_batches:
                    if self._stop.is_set():
                        return
                    inputs = reader.memory_inputs(ids, window)
                    self._queue.put(jax.device_put(inputs, sharding) if sharding is not None else
                                    to_device(inputs))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                self._queue.put(e)
                return
            self._queue.put(self._END)

        self._thread = threading.Thread(target=work, name="memory-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        while not self._queue.empty():  # unblock a worker waiting on a full queue
            self._queue.get_nowait()
