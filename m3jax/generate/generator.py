"""Batched generation with explicit memory, and the no-memory and RAG baselines behind the same API.

With memory (SPEC 4): each prompt chunk reads the memories retrieved with its own text. Decoding
continues with the memories of the prompt's last chunk; after every `chunk_len` new tokens (64 in the
paper) they are dropped and those new tokens are the query for the next ones. RAG: the references the
prompt's chunks retrieve are put, as text, in front of the prompt (whole references, best chunk
first, as many as fit the context), and no memory is read.

The prompt is read once (`prefill`) into a preallocated KV cache; with memory, decoding runs `chunk_len`
steps per jitted call (one `lax.scan`, cache donated), and the host retrieves between calls; without
memory (none, RAG) it runs in one call. `generate_many` runs batches in threads so that one batch's host
work (retrieval, bank reads) overlaps another's decoding. Tokens after a row's end-of-text are dropped
from its output (the batch keeps its shape while decoding).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3jax.config import sink_len
from m3jax.generate.sampling import check_sampling, next_token
from m3jax.model.attention import SINK_APART
from m3jax.rounding import round_up

MODES = ("memory", "none", "rag")


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # new tokens of each row, up to and including its end-of-text
    prompts: list[list[int]]  # what the model read: the prompts, with the references in front for RAG
    retrievals: list[np.ndarray]  # reference ids: prompt chunks (B, C, R), then (B, R) per decoding swap
    seconds: dict  # prefill, decode, retrieval (host) wall time
    events: list = dataclasses.field(default_factory=list)  # (phase, start, end) in time.perf_counter seconds


def cache_len(cfg, prompt_len: int, max_new_tokens: int) -> int:
    """KV-cache positions for a prompt (padded to prompt_len tokens) and max_new_tokens more: the sink
    too, rounded up to a multiple of 8 so that few lengths compile."""
    return round_up(sink_len(cfg) + prompt_len + max_new_tokens, 8)


def _prefill(graphdef, treedef, weights, tokens, lengths, memory, sink_kv, *, cache_len, memory_slots):
    """The last prompt token's logits and the cache: per layer over `layer_states`, or stacked (None).
    weights: the leaves of (state, layer_states), treedef their structure (see `Generator.__init__`);
    sink_kv: None, or `_sink_kv`'s (the prompt is read without the sink)."""
    state, layer_states = jax.tree.unflatten(treedef, weights)
    model = nnx.merge(graphdef, state)
    mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return model.prefill(tokens, cache_len=cache_len, memory=memory, padding_mask=mask, memory_slots=memory_slots,
                         logits_at=lengths - 1, layer_states=layer_states, sink_kv=sink_kv)


def _sink_kv(graphdef, treedef, weights):
    """The sink's keys and values at every layer (`Memory3.sink_kv`): the same for every prompt."""
    state, layer_states = jax.tree.unflatten(treedef, weights)
    return nnx.merge(graphdef, state).sink_kv(layer_states)


def _decode(graphdef, treedef, weights, cache, token, write_at, memory_kv, key, *, steps, temperature, top_p):
    """Feed `token` and `steps - 1` more sampled ones; returns the `steps` tokens sampled after them.
    memory_kv: None, or the memories (kv, valid) this span reads, written into the cache's memory slots."""
    state, layer_states = jax.tree.unflatten(treedef, weights)
    model = nnx.merge(graphdef, state)
    memory_valid = None
    if memory_kv is not None:
        cache, memory_valid = model.load_memory(cache, *memory_kv)

    def step(carry, key):
        cache, token, write_at = carry
        logits, cache = model.decode_step(token, write_at, cache, memory_valid, layer_states)
        token = next_token(logits, key, model.cfg.model.vocab_size, temperature, top_p)
        return (cache, token, write_at + 1), token

    (cache, _, _), tokens = jax.lax.scan(step, (cache, token, write_at), jax.random.split(key, steps))
    return tokens.T, cache


def _token_lists(prompts, vocab_size: int) -> list[list[int]]:
    """A batch of prompts as lists of Python ints; a clear error for text, a lone prompt, non-integer ids or
    ids outside [0, vocab_size) (checked here, in the one pass over the ids)."""
    if isinstance(prompts, (str, bytes)):
        raise ValueError("prompts are token ids, got text: tokenize it first")
    fast = _rectangular_ids(prompts, vocab_size)
    if fast is not None:
        return fast
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)):
            raise ValueError(f"prompt {i} is text, not token ids: tokenize it first")
        if isinstance(p, (int, np.integer)):
            raise ValueError(f"prompt {i} is a single token id ({p}); a batch is a list of prompts, each a list of "
                             "token ids (for one prompt, pass [prompt])")
        ids = np.asarray(p)
        integers = np.issubdtype(ids.dtype, np.integer) or (
            ids.dtype == object and all(isinstance(t, (int, np.integer)) for t in ids.flat))  # ints past int64
        if ids.ndim != 1 or not (integers or ids.size == 0):
            raise ValueError(f"prompt {i} must be a flat sequence of integer token ids, got {ids.dtype} values of "
                             f"shape {ids.shape}")
        bad = np.flatnonzero([not 0 <= t < vocab_size for t in ids.flat] if ids.dtype == object
                             else (ids < 0) | (ids >= vocab_size))
        if bad.size:
            raise ValueError(f"prompt {i} holds token id {ids.flat[bad[0]]}, outside the vocabulary [0, {vocab_size})")
        out.append([int(t) for t in ids.tolist()])
    return out


def _rectangular_ids(prompts, vocab_size: int) -> list[list[int]] | None:
    """Prompts of one length, all valid ids, as lists in one vectorised pass (a stream of 6 x 32 x 128 ids: 0.9
    ms instead of 3.0 on the development CPU, before the first batch starts); None for anything else, which the
    per-prompt checks handle (and explain)."""
    try:
        ids = np.asarray(prompts)
    except (ValueError, TypeError):  # ragged
        return None
    if ids.ndim != 2 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):  # bools are not
        return None
    if ids.min() < 0 or ids.max() >= vocab_size:
        return None
    return ids.tolist()


def kernels_as(state, dtype):
    """The state with every linear kernel in `dtype`. Linear layers cast their kernel to the compute dtype
    at each use: done once here, decoding reads half the bytes of f32 master weights and converts nothing
    per token, with the same results. Norm weights and embeddings stay as they are (used in f32 / gathered)."""
    def cast(path, x):
        is_kernel = any(getattr(key, "key", None) == "kernel" for key in path)
        return x.astype(dtype) if is_kernel and x.dtype != dtype else x
    return jax.tree_util.tree_map_with_path(cast, state)


class Generator:
    """`Generator(model, memory_source).generate(prompts, max_new_tokens, mode=...)`.

    memory_source: a `MemorySource` (needed for modes `memory` and `rag`); prompts: lists of token ids.
    unroll_layers: decode with the layers as straight-line code over unstacked copies of their weights
    (longer compile and a second copy of the layer weights; a step reads each weight once).
    sink_apart: compute the sink's keys and values once (they are the same for every prompt) and read
    prompts without it, when the attention kernel can merge them (the split kernels and splash:
    `model.attention` auto on a GPU or a TPU) and the layers are unrolled: the same results up to
    rounding, a shorter prefill.
    """

    def __init__(self, model, memory_source=None, *, eos_id: int = 2, unroll_layers: bool = True,
                 sink_apart: bool = True):
        self.cfg, self.source, self.eos_id = model.cfg, memory_source, eos_id
        dtype = jnp.dtype(self.cfg.model.dtype)
        self.graphdef, state = nnx.split(model)
        self.state = kernels_as(state, dtype)
        # Unstacked copies of the layers' (cast) weights for decoding (costs their memory a second time).
        self.layer_states = None
        if unroll_layers:
            self.layer_states = [seg.layer_states(self.state["layers"][i]["blocks"])
                                 for i, seg in enumerate(model.layers)]
        self.chunk = self.cfg.memory.chunk_len
        # Prefill and decoding are jitted for this generator over the weights as one flat list: a call then
        # passes a list of arrays, not nnx State trees to flatten and a graph definition to hash (~1.5 ms
        # of host time a call for m3_2p4b's 44 layers, on the development CPU).
        self._weights, treedef = jax.tree.flatten((self.state, self.layer_states))
        self._prefill = jax.jit(functools.partial(_prefill, self.graphdef, treedef),
                                static_argnames=("cache_len", "memory_slots"))
        impls = {seg.blocks.self_attn.impl for seg in model.layers}
        self.sink_apart = sink_apart and unroll_layers and impls <= set(SINK_APART)
        self._sink = None  # the sink's keys and values, computed at the first prefill that needs them
        self._sink_lock = threading.Lock()  # batches in flight run in threads
        self._sink_kv = jax.jit(functools.partial(_sink_kv, self.graphdef, treedef))
        self._decode = jax.jit(functools.partial(_decode, self.graphdef, treedef),
                               static_argnames=("steps", "temperature", "top_p"), donate_argnums=(1,))

    def generate(self, prompts, max_new_tokens: int, *, mode: str = "memory", temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0) -> Generation:
        return self.generate_many([prompts], max_new_tokens, mode=mode, temperature=temperature, top_p=top_p,
                                  seed=seed)[0]

    def generate_many(self, batches, max_new_tokens: int, *, mode: str = "memory", temperature: float = 0.0,
                      top_p: float = 1.0, seed: int = 0, in_flight: int = 2) -> list[Generation]:
        """Generate for several batches of prompts, `in_flight` of them at a time: while the device
        decodes one batch, the host retrieves and reads the bank for another (each batch's results are
        what `generate` gives it alone; batch i samples with seed + i)."""
        check_sampling(temperature, top_p)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "none" and self.source is None:
            raise ValueError(f"mode {mode!r} needs a memory source (a knowledge base and its memory bank)")
        if mode == "memory" and self.source.reader is None:
            raise ValueError("mode 'memory' needs a memory bank; this memory source only retrieves (RAG)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {in_flight}")
        vocab = self.cfg.model.vocab_size  # read once: config lookups are slow
        batches = [_token_lists(prompts, vocab) for prompts in batches]
        for prompts in batches:
            self._check_prompts(prompts, max_new_tokens)
        if in_flight == 1 or len(batches) == 1:
            return [self._generation(p, max_new_tokens, mode, temperature, top_p, seed + i)
                    for i, p in enumerate(batches)]
        # Threads, not coroutines: a decoding span (a while loop on the device) holds its calling thread
        # until it ends, with the GIL released, so another thread's host work runs meanwhile.
        with concurrent.futures.ThreadPoolExecutor(in_flight, thread_name_prefix="generate") as pool:
            runs = [pool.submit(self._generation, p, max_new_tokens, mode, temperature, top_p, seed + i)
                    for i, p in enumerate(batches)]
            return [run.result() for run in runs]

    def _generation(self, prompts, max_new_tokens, mode, temperature, top_p, seed) -> Generation:
        seconds = {"prefill": 0.0, "decode": 0.0, "retrieval": 0.0}
        events = []

        def took(phase, t0):
            end = time.perf_counter()
            seconds[phase] += end - t0
            events.append((phase, t0, end))
        retrievals = []
        tokens, lengths = self._pad(prompts)
        memory = None
        if mode != "none":
            t0 = time.perf_counter()
            ids = self.source.chunk_ids(tokens, lengths)
            retrievals.append(ids)
            if mode == "rag":
                prompts = [self._rag_prompt(p, row, max_new_tokens) for p, row in zip(prompts, ids)]
                tokens, lengths = self._pad(prompts)
            else:
                memory = self.source.reader.memory_inputs(ids, on_device=True)
                # Decoding starts with the memories of each prompt's last chunk: already read, not read again.
                rows, last_chunk = np.arange(len(prompts)), (lengths - 1) // self.chunk
                first_kv = (memory.kv[rows, last_chunk], memory.valid[rows, last_chunk])
            took("retrieval", t0)

        t0 = time.perf_counter()
        positions = cache_len(self.cfg, tokens.shape[1], max_new_tokens)
        # Memory mode: the memory layers' caches end in slots for one memory set (R references x k tokens).
        memory_slots = 0 if memory is None else first_kv[0].shape[1] * first_kv[0].shape[5]
        logits, cache = self._prefill(self._weights, jnp.asarray(tokens), jnp.asarray(lengths), memory,
                                      self._sink_keys_values(), cache_len=positions, memory_slots=memory_slots)
        key = jax.random.key(seed)
        key, first_key = jax.random.split(key)
        token = next_token(logits, first_key, self.cfg.model.vocab_size, temperature, top_p)
        out = [np.asarray(token)[:, None]]
        took("prefill", t0)
        write_at = jnp.asarray(sink_len(self.cfg) + lengths, jnp.int32)
        done = 1  # new tokens so far; the next one fed is new[done - 1], reading memory epoch (done - 1) // chunk
        while done < max_new_tokens:
            fed = done - 1
            memory_kv = None
            if mode == "memory":
                t0 = time.perf_counter()
                if fed > 0:  # epoch boundary: the last chunk_len new tokens query the next memories
                    new = np.concatenate(out, axis=1)
                    queries = [[] if self.eos_id in row[:fed] else row[fed - self.chunk:fed] for row in new]
                    last = self.source.retrieve(queries)
                    retrievals.append(last)
                memory_kv = first_kv if fed == 0 else self.source.reader.gather_on_device(last)
                took("retrieval", t0)
            t0 = time.perf_counter()
            # only memory needs the host between spans; one span otherwise saves a call and its round trip
            steps = min(self.chunk, max_new_tokens - done) if mode == "memory" else max_new_tokens - done
            key, span_key = jax.random.split(key)
            new_tokens, cache = self._decode(self._weights, cache, token, write_at, memory_kv, span_key,
                                             steps=steps, temperature=temperature, top_p=top_p)
            out.append(np.asarray(new_tokens))
            token, write_at, done = new_tokens[:, -1], write_at + steps, done + steps
            took("decode", t0)
        return Generation([self._until_eos(row) for row in np.concatenate(out, axis=1).tolist()], prompts,
                          retrievals, seconds, events)

    # ---- helpers ------------------------------------------------------------------------------
    def _sink_keys_values(self):
        """None (the prefill computes the sink), or its keys and values, computed once."""
        if not self.sink_apart:
            return None
        with self._sink_lock:
            if self._sink is None:
                self._sink = self._sink_kv(self._weights)
            return self._sink

    def _check_prompts(self, prompts, max_new_tokens: int) -> None:
        if not prompts:
            raise ValueError("no prompts given")
        limit = self.cfg.data.seq_len
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
            if len(p) + max_new_tokens > limit:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                                 f"the context of {limit} tokens (data.seq_len)")

    def _pad(self, prompts):
        """Right-padded (B, T) with T a multiple of chunk_len (fewer shapes to compile), and lengths."""
        lengths = np.array([len(p) for p in prompts], np.int32)
        tokens = np.full((len(prompts), round_up(int(lengths.max()), self.chunk)), self.cfg.model.pad_id, np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        return tokens, lengths

    def _rag_prompt(self, prompt, chunk_ids, max_new_tokens: int):
        """References retrieved by the prompt's chunks (best first within a chunk, chunks in order,
        each once), whole, as many as fit the context, then the prompt."""
        budget = self.cfg.data.seq_len - max_new_tokens - len(prompt)
        front = []
        for j in dict.fromkeys(int(j) for j in chunk_ids.reshape(-1) if j >= 0):
            ref = list(map(int, self.source.reference(j)))
            if len(front) + len(ref) > budget:
                break
            front += ref
        return front + prompt

    def _until_eos(self, row: list[int]) -> list[int]:
        return row[:row.index(self.eos_id) + 1] if self.eos_id in row else row
