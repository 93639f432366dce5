"""Reading memories for a batch: gather by reference id through an LRU RAM cache, prefetch to the device.

Neighbouring chunks often retrieve the same references (SPEC 4), so a batch's ids are deduplicated,
cached ones are served from RAM, and only the rest is read from the bank, in one request; on the way
to the device only the distinct memories are copied, and the device puts them in the batch's order. A
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
from m3jax.rounding import power_of_two_at_least, round_up

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
        `dtype` and slot validity (*ids.shape, tokens_per_head), on the host."""
        table, valid, inverse = self.distinct(ids)
        return table[inverse], valid[inverse]

    def gather_on_device(self, ids, parts: int = 8, min_bytes: int = 1 << 24):
        """`gather` as device arrays: only the distinct memories are copied, indexed there (`take_on_device`)."""
        return take_on_device(*self.distinct(ids), parts=parts, min_bytes=min_bytes)

    def distinct(self, ids):
        """ids -> (table, valid, inverse): one row per distinct id and `inverse` (ids.shape, int32) indexing
        it, so that table[inverse] is what `gather` returns."""
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"reference ids must be integers, got {ids.dtype}")
        with self._lock:
            table, valid, inverse = self._distinct(ids)
        return table, valid, inverse.reshape(ids.shape).astype(np.int32)

    def _distinct(self, ids):
        shape = self.bank.memory_shape
        unique, inverse = np.unique(ids.reshape(-1), return_inverse=True)
        # One table row per distinct id (zeros and no valid slot for NO_REFERENCE), filled from the cache
        # or by one bank read in the reader's dtype. When every distinct id is read (cache off, or
        # cold), the read's own array is the table: no extra pass over it.
        real = np.flatnonzero(unique != NO_REFERENCE)
        cached = np.array([int(unique[j]) in self._cache for j in real], bool)
        missing = real[~cached]
        self.hits += int(cached.sum())
        self.misses += len(missing)
        if len(missing) == len(unique):
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
        return table, valid, inverse

    def memory_inputs(self, ids, window: int = 1, *, on_device: bool = False) -> MemoryInputs:
        """ids: (B, C, R) -> MemoryInputs, on the host (ready for `jax.device_put` with a sharding) or
        on the default device."""
        ids = np.asarray(ids)
        if ids.ndim != 3:
            raise ValueError(f"ids must have shape (batch, chunks, references per chunk), got {ids.shape}")
        memories, valid = self.gather_on_device(ids) if on_device else self.gather(ids)
        return MemoryInputs(memories, valid, window)


def take_on_device(table, valid, inverse, *, parts: int = 8, min_bytes: int = 1 << 24):
    """(table[inverse], valid[inverse]) on the default device, indexed there: the host copies only the
    distinct rows, with no pass over them to put them in order. A table of at least `min_bytes` goes as
    `parts` pieces in one `jax.device_put`, since JAX copies separate host arrays concurrently and one
    pageable array in a single stream (benchmarks/bank_read.py: 144 MB reach an H200 in a third of the
    time). Rows are zero-padded so that few shapes compile: pieces to a multiple of 8 rows, and a small
    table to a power of two (its padding costs nothing worth saving)."""
    if table.nbytes < min_bytes:
        parts, size = 1, power_of_two_at_least(len(table), 8)
    else:
        size = round_up(-(-len(table) // parts), 8)  # ceil(rows / parts), to a multiple of 8
    pieces = [_pad_rows(table[p * size:(p + 1) * size], size) for p in range(parts)]
    on_device = jax.device_put((pieces, _pad_rows(valid, parts * size), np.asarray(inverse, np.int32)))
    return _joined_take(*on_device)


@jax.jit
def _joined_take(pieces, valid, inverse):
    return jnp.concatenate(pieces)[inverse], valid[inverse]


def _pad_rows(x, rows: int):
    """x with zero rows appended up to `rows` (x itself when it has them: no copy)."""
    if len(x) == rows:
        return x
    return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)])


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
                    if sharding is None:
                        self._queue.put(reader.memory_inputs(ids, window, on_device=True))
                    else:
                        self._queue.put(jax.device_put(reader.memory_inputs(ids, window), sharding))
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
