"""Generation: KV-cached decoding with memory swaps vs full recomputation, RAG prompts, sampling, bad input."""
import functools
import threading
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3jax import config as config_lib
from m3jax.generate.generator import Generator
from m3jax.generate.memory_source import MemorySource
from m3jax.generate.sampling import next_token
from m3jax.memory.cache import CachedBankReader
from m3jax.memory.write import write_memories
from m3jax.model.lm import Memory3, MemoryInputs

NUM_REFS = 24


class ArrayBank:
    """The part of MemoryBank a reader uses, over memories held in RAM."""

    def __init__(self, memories, slots):
        self.memories, self.slots = memories, slots
        self.count, self.memory_shape = len(memories), memories.shape[1:]

    def read(self, ids, dtype=np.float32):
        return self.memories[ids].astype(dtype), self.slots[ids]


class HashRetriever:
    """Deterministic stand-in for BM25: a query text maps to references by a hash; records queries."""

    def __init__(self):
        self.queries = []

    def retrieve(self, texts, k):
        self.queries += list(texts)
        ids = [[(zlib.crc32(t.encode()) + 7 * i) % NUM_REFS for i in range(k)] for t in texts]
        return np.zeros((len(texts), k), np.float32), np.array(ids, np.int64)


def expected_ids(tokens, k):
    """What HashRetriever + MemorySource pick for a query of token ids (no leakage filter)."""
    text = " ".join(map(str, tokens))
    return [(zlib.crc32(text.encode()) + 7 * i) % NUM_REFS for i in range(k)][:k // 2]


@pytest.fixture(scope="module")
def setup():
    cfg = config_lib.load("tiny", {"model.dtype": "float32", "memory.refs_per_chunk": 2})
    model = Memory3(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, cfg.memory.reference_len + 1, NUM_REFS)
    refs = rng.integers(5, cfg.model.vocab_size, (NUM_REFS, cfg.memory.reference_len))
    memories, slots = write_memories(model, refs, lengths)
    bank = ArrayBank(np.asarray(memories, np.float32), np.asarray(slots))
    retriever = HashRetriever()
    source = MemorySource(cfg, retriever, CachedBankReader(bank, dtype=np.float32), refs, lengths,
                          lambda ids: " ".join(map(str, ids)), candidates=4)
    return cfg, model, source, retriever, (refs, lengths, bank)


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(graphdef, state, tokens, mask, kv, valid, group):
    memory = MemoryInputs(kv, valid, token_group=group)
    return nnx.merge(graphdef, state)(tokens, memory=memory, padding_mask=mask)


def reference_generate(cfg, model, prompt, max_new, bank):
    """Greedy decoding by full recomputation: every step reruns the whole text. Prompt tokens read their
    chunk's memories; generated token j reads epoch j // chunk_len, where epoch 0 is the prompt's last
    chunk's memories and epoch e > 0 those retrieved with generated tokens chunk*(e-1) .. chunk*e - 1."""
    chunk = cfg.memory.chunk_len
    n_chunks = -(-len(prompt) // chunk)
    groups = [expected_ids(prompt[c * chunk:(c + 1) * chunk], 4) for c in range(n_chunks)]
    groups.append(groups[-1])
    width, n_groups = len(prompt) + max_new, n_chunks + max_new // chunk + 1  # fixed shapes: one compile
    graphdef, state = nnx.split(model)
    out = []
    for _ in range(max_new):
        fed = len(out)  # generated tokens already in the text
        while len(groups) - n_chunks < ((fed - 1) // chunk + 1 if fed else 0):
            e = len(groups) - n_chunks
            groups.append(expected_ids(out[chunk * (e - 1):chunk * e], 4))
        text = prompt + out
        token_group = [t // chunk for t in range(len(prompt))] + [n_chunks + g // chunk for g in range(fed)]
        ids = np.array(groups + [groups[0]] * (n_groups - len(groups)))
        pad = width - len(text)
        logits = _full_logits(graphdef, state, np.array([text + [0] * pad]), np.array([[True] * len(text) + [False] * pad]),
                              bank.memories[ids][None], bank.slots[ids][None],
                              np.array([token_group + [-1] * pad], np.int32))
        out.append(int(np.argmax(np.asarray(logits)[0, len(text) - 1, :cfg.model.vocab_size])))
    return out


def same_weights(model, **model_overrides):
    """A model with `model`'s weights and other `model.*` settings (kernels)."""
    overrides = {"model.dtype": "float32", "memory.refs_per_chunk": 2}
    overrides.update({f"model.{k}": v for k, v in model_overrides.items()})
    other = Memory3(config_lib.load("tiny", overrides), rngs=nnx.Rngs(1))
    nnx.update(other, nnx.state(model))
    return other


# per-layer weights and caches (with the XLA or the Pallas cache attention), or a scan over stacked ones;
# the split prompt attention and splash (TPU's; interpreted here) read prompts with the sink apart (its keys
# and values computed once)
@pytest.mark.parametrize("unroll,attention,prompt_attention", [
    (True, "xla", "auto"), (True, "pallas", "auto"), (False, "xla", "auto"), (True, "xla", "xla_split"),
    (True, "xla", "splash")])
def test_cached_generation_with_memory_equals_full_recomputation(setup, unroll, attention, prompt_attention):
    cfg, model, source, _retriever, (_, _, bank) = setup
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(5, cfg.model.vocab_size, n)) for n in (20, 33, 7)]
    max_new = 3 * cfg.memory.chunk_len + 5  # three memory swaps
    decoder = model
    if (attention, prompt_attention) != ("xla", "auto"):  # the same weights, other kernels
        decoder = same_weights(model, decode_attention=attention, attention=prompt_attention)
    generator = Generator(decoder, source, eos_id=-1, unroll_layers=unroll)
    assert generator.sink_apart == (prompt_attention in ("xla_split", "splash"))
    result = generator.generate(prompts, max_new, mode="memory")
    for prompt, got in zip(prompts, result.tokens):
        assert got == reference_generate(cfg, model, list(map(int, prompt)), max_new, bank)


def test_memory_swaps_at_chunk_boundaries(setup):
    cfg, model, source, retriever, _ = setup
    chunk = cfg.memory.chunk_len
    prompt = list(np.random.default_rng(2).integers(5, cfg.model.vocab_size, 2 * chunk))
    retriever.queries.clear()
    result = Generator(model, source, eos_id=-1).generate([prompt], 3 * chunk + 2)  # feeds new[3 * chunk]
    new = result.tokens[0]
    text = lambda ids: " ".join(map(str, ids))
    want = [text(prompt[:chunk]), text(prompt[chunk:]), text(new[:chunk]), text(new[chunk:2 * chunk]),
            text(new[2 * chunk:3 * chunk])]
    assert retriever.queries == want
    assert [r.shape for r in result.retrievals] == [(1, 2, 2), (1, 2), (1, 2), (1, 2)]


def test_only_memory_mode_decodes_in_spans(setup):
    # memory swaps need the host every chunk_len new tokens; without memory, decoding is one call
    cfg, model, source, _, _ = setup
    chunk = cfg.memory.chunk_len
    prompt = list(np.random.default_rng(4).integers(5, cfg.model.vocab_size, chunk))
    calls = {}
    for mode in ("memory", "none", "rag"):
        gen = Generator(model, source, eos_id=-1)
        decode, seen = gen._decode, []
        gen._decode = lambda *args, decode=decode, seen=seen, **kw: seen.append(kw["steps"]) or decode(*args, **kw)
        assert len(gen.generate([prompt], 3 * chunk + 2, mode=mode).tokens[0]) == 3 * chunk + 2
        calls[mode] = seen
    assert calls["memory"] == [chunk, chunk, chunk, 1]
    assert calls["none"] == calls["rag"] == [3 * chunk + 1]


def test_batches_in_flight_equal_one_batch_at_a_time(setup):
    """generate_many runs batches concurrently (the first two batches' prompt retrievals meet at a
    barrier: one batch at a time, they could not) and gives each batch what generate gives it alone, with seed + i."""
    cfg, model, source, retriever, _ = setup
    rng = np.random.default_rng(4)
    batches = [[list(rng.integers(5, cfg.model.vocab_size, n)) for n in sizes] for sizes in ((9, 30), (17,), (5, 6))]
    generator = Generator(model, source, eos_id=-1)
    kwargs = dict(mode="memory", temperature=0.9, top_p=0.9)
    new = cfg.memory.chunk_len + 3
    alone = [generator.generate(b, new, seed=7 + i, **kwargs) for i, b in enumerate(batches)]
    barrier, threads, plain = threading.Barrier(2, timeout=30), set(), source.decode

    def meeting(ids):  # a query's ids -> text: the first call of each of two threads waits for the other
        if threading.get_ident() not in threads and len(threads) < 2:
            threads.add(threading.get_ident())
            barrier.wait()  # raises BrokenBarrierError after the timeout if the batches ran one at a time
        return plain(ids)

    source.decode = meeting
    try:
        together = generator.generate_many(batches, new, seed=7, in_flight=2, **kwargs)
    finally:
        source.decode = plain
    assert [g.tokens for g in together] == [g.tokens for g in alone]
    with pytest.raises(ValueError, match="in_flight"):
        generator.generate_many(batches, 4, in_flight=0)


def test_decode_weights_cast_once_to_the_compute_dtype(monkeypatch):
    """f32 master weights, bf16 compute: the generator holds its linear kernels in bf16 (norms and
    embeddings untouched) and generates exactly what it generates when each use casts them."""
    import m3jax.generate.generator as generator_module

    cfg = config_lib.load("tiny", {"model.dtype": "bfloat16", "model.param_dtype": "float32"})
    model = Memory3(cfg, rngs=nnx.Rngs(3))
    prompts = [list(np.random.default_rng(5).integers(5, cfg.model.vocab_size, n)) for n in (9, 14)]
    cast = Generator(model, eos_id=-1)
    leaves = jax.tree_util.tree_flatten_with_path([cast.state, cast.layer_states])[0]
    for path, x in leaves:
        kernel = any(name in jax.tree_util.keystr(path) for name in ("kernel", "qkv", "gate_up"))
        assert x.dtype == (jnp.bfloat16 if kernel else jnp.float32), jax.tree_util.keystr(path)
    monkeypatch.setattr(generator_module, "kernels_as", lambda state, dtype: state)
    per_use = Generator(model, eos_id=-1)
    assert per_use.state["lm_head"]["kernel"][...].dtype == jnp.float32
    assert cast.generate(prompts, 12, mode="none").tokens == per_use.generate(prompts, 12, mode="none").tokens


def test_fused_decode_weights_are_the_layer_kernels():
    """Each layer's fused q/k/v and gate/up kernels are its own kernels side by side; the state keeps
    zero-size placeholders, so the per-layer copy does not hold them twice."""
    cfg = config_lib.load("tiny")
    model = Memory3(cfg, rngs=nnx.Rngs(4))
    stack = model.layers[0]
    blocks = nnx.state(stack.blocks)
    for i, (state, fused) in enumerate(stack.layer_states()):
        attn, mlp = blocks["self_attn"], blocks["mlp"]
        hq = attn["q_proj"]["kernel"][...].shape[2]
        hkv = attn["k_proj"]["kernel"][...].shape[2]
        np.testing.assert_array_equal(fused["qkv"][:, :hq], attn["q_proj"]["kernel"][...][i])
        np.testing.assert_array_equal(fused["qkv"][:, hq:hq + hkv], attn["k_proj"]["kernel"][...][i])
        np.testing.assert_array_equal(fused["qkv"][:, hq + hkv:], attn["v_proj"]["kernel"][...][i])
        np.testing.assert_array_equal(fused["gate_up"][:, 0], mlp["gate_proj"]["kernel"][...][i])
        np.testing.assert_array_equal(fused["gate_up"][:, 1], mlp["up_proj"]["kernel"][...][i])
        assert state["self_attn"]["q_proj"]["kernel"][...].size == 0
        assert state["mlp"]["up_proj"]["kernel"][...].size == 0
        np.testing.assert_array_equal(state["self_attn"]["o_proj"]["kernel"][...], attn["o_proj"]["kernel"][...][i])


@pytest.mark.parametrize("sink_apart", [False, True])
def test_no_memory_mode_equals_plain_recomputation(setup, sink_apart):
    cfg, model, _, _, _ = setup
    prompts = [list(np.random.default_rng(3).integers(5, cfg.model.vocab_size, n)) for n in (11, 70)]
    generator = Generator(same_weights(model, attention="xla_split") if sink_apart else model, eos_id=-1)
    assert generator.sink_apart == sink_apart
    for prompt, got in zip(prompts, generator.generate(prompts, 20, mode="none").tokens):
        text = list(map(int, prompt))
        for _ in range(20):
            text.append(int(np.argmax(np.asarray(model(np.array([text])))[0, -1, :cfg.model.vocab_size])))
        assert got == text[len(prompt):]


def test_rag_prompt_holds_the_retrieved_references(setup):
    cfg, model, source, _, (refs, lengths, _) = setup
    chunk = cfg.memory.chunk_len
    prompt = list(map(int, np.random.default_rng(4).integers(5, cfg.model.vocab_size, chunk + 3)))
    result = Generator(model, source, eos_id=-1).generate([prompt], 4, mode="rag")
    ids = list(dict.fromkeys(expected_ids(prompt[:chunk], 4) + expected_ids(prompt[chunk:], 4)))
    front = [int(t) for j in ids for t in refs[j, :lengths[j]]]
    budget = cfg.data.seq_len - 4 - len(prompt)
    while len(front) > budget:  # whole references only, as many as fit
        ids.pop()
        front = [int(t) for j in ids for t in refs[j, :lengths[j]]]
    assert result.prompts[0] == front + prompt
    plain = Generator(model, eos_id=-1).generate([front + prompt], 4, mode="none")
    assert result.tokens == plain.tokens


def test_eos_ends_a_row(setup):
    cfg, model, _, _, _ = setup
    prompt = list(np.random.default_rng(5).integers(5, cfg.model.vocab_size, 9))
    free = Generator(model, eos_id=-1).generate([prompt], 12, mode="none").tokens[0]
    stopped = Generator(model, eos_id=free[4]).generate([prompt], 12, mode="none").tokens[0]
    assert stopped == free[:free.index(free[4]) + 1]


def test_top_p_and_temperature_sampling():
    import jax

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05, 0.0]], np.float32) + 1e-30)
    draws = [int(next_token(logits, jax.random.key(i), 4, 1.0, 0.7)[0]) for i in range(300)]
    assert set(draws) == {0, 1}  # 0.5 < 0.7 <= 0.8: the two most likely tokens only
    assert 0.5 < draws.count(0) / 300 < 0.75  # renormalised: 0.5 / 0.8 = 0.625
    assert int(next_token(logits, jax.random.key(0), 4, 0.0, 1.0)[0]) == 0
    draws = [int(next_token(logits, jax.random.key(i), 4, 1.0, 1.0)[0]) for i in range(300)]
    assert 4 not in draws and {0, 1, 2} <= set(draws)  # padding rows past the vocabulary never win


def test_prompts_of_one_length_become_the_same_lists_of_ints():
    from m3jax.generate.generator import _token_lists

    ids = np.random.default_rng(5).integers(0, 100, (4, 7))
    for given in (ids.tolist(), ids.astype(np.uint16), list(ids.astype(np.int32))):
        got = _token_lists(given, 100)
        assert got == ids.tolist() and all(type(t) is int for row in got for t in row)
    with pytest.raises(ValueError, match="prompt 1 holds token id 100"):
        _token_lists([[1, 2], [3, 100]], 100)
    with pytest.raises(ValueError, match="integer token ids"):
        _token_lists([[True, False]], 100)


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([[]], {}, "prompt 0 is empty"),
    ([[5] * 120], {"max_new_tokens": 20}, "exceeds the context of 128"),
    ([[5, 99999]], {}, "outside the vocabulary"),
    ([[5], [7, -3]], {}, "prompt 1 holds token id -3, outside the vocabulary"),
    ([[5, 2 ** 70]], {}, f"prompt 0 holds token id {2 ** 70}, outside the vocabulary"),
    ([np.array([5, 70000], np.uint32)], {}, "prompt 0 holds token id 70000, outside the vocabulary"),
    ("a text prompt", {}, "tokenize it first"),
    ([[5], "more text"], {}, "prompt 1 is text"),
    ([5, 6, 7], {}, "prompt 0 is a single token id"),
    ([[5, 6.5]], {}, "prompt 0 must be a flat sequence of integer token ids"),
    ([[[5, 6], [7, 8]]], {}, "prompt 0 must be a flat sequence of integer token ids"),
    ([[5]], {"temperature": -1.0}, "temperature"),
    ([[5]], {"top_p": 0.0}, "top_p"),
    ([[5]], {"mode": "beam"}, "mode must be one of"),
    ([[5]], {"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_input_is_refused_clearly(setup, prompts, kwargs, message):
    _cfg, model, source, _, _ = setup
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        Generator(model, source).generate(prompts, kwargs.pop("max_new_tokens"), **kwargs)


def test_memory_mode_needs_a_source(setup):
    _, model, _, _, _ = setup
    with pytest.raises(ValueError, match="needs a memory source"):
        Generator(model).generate([[5, 6]], 3, mode="memory")
