"""The Memory3 model against the float64 loop decoder of tests/naive.py: reading, writing, layout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import naive
from m3jax import config as config_lib
from m3jax.memory.write import write_memories
from m3jax.model.lm import Memory3, MemoryInputs


def tiny(**overrides):
    return config_lib.load("tiny", overrides)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def naive_params(model):
    """Float64 copies of the model's parameters, one dict per layer."""
    f64 = lambda x: np.asarray(x[...], np.float64)  # noqa: E731
    layers = {}
    for seg in model.layers:
        blk = seg.blocks
        for j in range(seg.num_layers):
            layers[seg.first_layer + j] = dict(
                input_norm=f64(blk.input_layernorm.weight)[j], post_norm=f64(blk.post_attention_layernorm.weight)[j],
                q=f64(blk.self_attn.q_proj.kernel)[j], k=f64(blk.self_attn.k_proj.kernel)[j],
                v=f64(blk.self_attn.v_proj.kernel)[j], o=f64(blk.self_attn.o_proj.kernel)[j],
                gate=f64(blk.mlp.gate_proj.kernel)[j], up=f64(blk.mlp.up_proj.kernel)[j],
                down=f64(blk.mlp.down_proj.kernel)[j])
    return dict(embed=f64(model.embed_tokens), norm=f64(model.norm.weight), head=f64(model.lm_head.kernel),
                layers=layers)


def context_stream(model, tokens):
    """The naive decoder's view of a context: ids and positions of [<s>Reference: | <s> | tokens]."""
    mem = model.cfg.memory
    p, r = len(mem.reference_prefix_ids), mem.reference_len
    b, t = tokens.shape
    sink = np.array(tuple(mem.reference_prefix_ids) + (model.cfg.model.bos_id,))
    ids = np.concatenate([np.broadcast_to(sink, (b, p + 1)), tokens], 1)
    positions = np.concatenate([np.arange(p), [p + r], p + r + 1 + np.arange(t)])
    return ids, positions, p + 1


def random_memory(cfg, rng, b, chunks, refs, k):
    m = cfg.model
    kv = rng.normal(size=(b, chunks, refs, cfg.memory.num_layers, 2, m.num_kv_heads, k, m.head_dim))
    valid = rng.random((b, chunks, refs, k)) < 0.8
    return kv.astype(np.float32), valid


def naive_memory(kv, valid):
    """(B, C, R, L, 2, Hkv, k, D) -> the naive layout (B, C, R*k, L, 2, Hkv, D), (B, C, R*k)."""
    b, c, r, l, two, hkv, k, d = kv.shape
    return np.moveaxis(kv, 6, 3).reshape(b, c, r * k, l, two, hkv, d), valid.reshape(b, c, r * k)


@pytest.mark.parametrize("padded", [False, True])
def test_plain_decoder_matches_naive(padded):
    model = Memory3(tiny(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 512, (2, 32))
    padding = np.ones((2, 32), bool)
    if padded:
        padding[1, 20:] = False
    logits = model(jnp.asarray(tokens), padding_mask=jnp.asarray(padding))
    ids, positions, s = context_stream(model, tokens)
    key_valid = np.concatenate([np.ones((2, s), bool), padding], 1)
    ref, _ = naive.decoder(naive_params(model), model.cfg, ids, positions, key_valid, s)
    assert logits.shape == (2, 32, 2048) and logits.dtype == jnp.float32
    assert rel(logits, ref[:, s:]) < 1e-5


@pytest.mark.parametrize("layer_start, window, refs", [(0, 1, 2), (1, 1, 2), (2, 2, 1)])
def test_memory_reading_matches_naive(layer_start, window, refs):
    """Memory enters exactly at the memory layers (first, middle or last two of four) and per chunk."""
    cfg = tiny(**{"memory.layer_start": layer_start})
    model = Memory3(cfg, rngs=nnx.Rngs(2))
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 512, (2, 40))  # 3 chunks of 16, the last one partial
    kv, valid = random_memory(cfg, rng, 2, 3, refs, 3)
    logits = model(jnp.asarray(tokens), memory=MemoryInputs(jnp.asarray(kv), jnp.asarray(valid), window))
    ids, positions, s = context_stream(model, tokens)
    ref, _ = naive.decoder(naive_params(model), cfg, ids, positions, np.ones(ids.shape, bool), s,
                           memory_layers=range(layer_start, layer_start + 2), memory=naive_memory(kv, valid),
                           window=window)
    assert rel(logits, ref[:, s:]) < 1e-5
    plain = model(jnp.asarray(tokens))
    assert rel(plain, logits) > 1e-3  # the memory did matter


def test_memory_masked_out_equals_no_memory():
    cfg = tiny()
    model = Memory3(cfg, rngs=nnx.Rngs(4))
    rng = np.random.default_rng(5)
    tokens = jnp.asarray(rng.integers(0, 512, (2, 32)))
    kv, valid = random_memory(cfg, rng, 2, 2, 5, 4)
    off = model(tokens, memory=MemoryInputs(jnp.asarray(kv), jnp.zeros(valid.shape, bool)))
    np.testing.assert_allclose(off, model(tokens), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layer_start,attention", [(0, "exact"), (1, "exact"), (1, "xla")])
def test_write_matches_naive_selection(layer_start, attention):
    """With `xla` attention, tokens are scored through the fused-attention path (sparsify.kernel_token_scores)."""
    cfg = tiny(**{"memory.layer_start": layer_start, "model.attention": attention})
    model = Memory3(cfg, rngs=nnx.Rngs(6))
    rng = np.random.default_rng(7)
    lengths = np.array([32, 17, 3])  # the last is shorter than tokens_per_head = 4
    refs = rng.integers(4, 512, (3, 32))
    memories, slots = write_memories(model, refs, lengths)
    assert memories.shape == (3, 2, 2, 2, 4, 16)
    np.testing.assert_array_equal(slots, [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
    prefix = np.array(cfg.memory.reference_prefix_ids)
    p = len(prefix)
    mem_layers = list(range(layer_start, layer_start + 2))
    params = naive_params(model)
    for n, length in enumerate(lengths):
        ids = np.concatenate([prefix, refs[n, :length]])[None]
        _, cap = naive.decoder(params, cfg, ids, np.arange(p + length), np.ones(ids.shape, bool), p,
                               capture_layers=mem_layers, stop_after=mem_layers[-1])
        valid = np.arange(p + length)[None] >= p
        for li, layer in enumerate(mem_layers):
            q_pre, k_pre, k_rot, v = cap[layer]
            top = naive.top_tokens(naive.token_scores(q_pre, k_pre, valid), 4)[0]  # (Hkv, 4)
            for g in range(2):
                real = top[g][: min(4, length)]
                want_k, want_v = k_rot[0, real, g], v[0, real, g]
                assert rel(memories[n, li, 0, g, : len(real)], want_k) < 1e-5
                assert rel(memories[n, li, 1, g, : len(real)], want_v) < 1e-5


def test_memory_with_every_token_equals_the_references_full_kv():
    """Top-k = all tokens, one chunk: reading written memories = reading the references' full K/V at their
    positions (computed by the naive decoder on `<s>Reference:` + reference)."""
    cfg = tiny(**{"memory.tokens_per_head": 32})
    model = Memory3(cfg, rngs=nnx.Rngs(8))
    rng = np.random.default_rng(9)
    refs = rng.integers(4, 512, (2, 32))
    memories, slots = write_memories(model, refs, np.array([32, 32]))
    assert slots.all()
    tokens = rng.integers(4, 512, (1, 16))  # a single chunk
    written = MemoryInputs(jnp.asarray(memories[None, None]), jnp.asarray(slots[None, None]))
    logits = model(jnp.asarray(tokens), memory=written)

    prefix = np.array(cfg.memory.reference_prefix_ids)
    p, params = len(prefix), naive_params(model)
    full = []  # (R, 32 tokens, L_mem, 2, Hkv, D)
    for n in range(2):
        ids = np.concatenate([prefix, refs[n]])[None]
        _, cap = naive.decoder(params, cfg, ids, np.arange(p + 32), np.ones(ids.shape, bool), p,
                               capture_layers=(0, 1), stop_after=1)
        full.append(np.stack([np.stack([cap[l][2][0, p:], cap[l][3][0, p:]], 1) for l in (0, 1)], 1))
    full = np.concatenate(full)[None, None]  # (1, 1, 64, L, 2, Hkv, D)
    ids, positions, s = context_stream(model, tokens)
    ref, _ = naive.decoder(params, cfg, ids, positions, np.ones(ids.shape, bool), s, memory_layers=(0, 1),
                           memory=(full, np.ones((1, 1, 64), bool)))
    assert rel(logits, ref[:, s:]) < 1e-5


@pytest.mark.parametrize("with_memory", [False, True])
def test_attention_implementations_agree(with_memory):
    rng = np.random.default_rng(10)
    tokens = jnp.asarray(rng.integers(0, 512, (2, 32)))
    padding = jnp.asarray(np.arange(32)[None, :] < np.array([[32], [21]]))
    kv, valid = random_memory(tiny(), rng, 2, 2, 2, 4)
    memory = MemoryInputs(jnp.asarray(kv), jnp.asarray(valid)) if with_memory else None
    exact = Memory3(tiny(), rngs=nnx.Rngs(11))
    want = exact(tokens, memory=memory, padding_mask=padding)
    for impl in ("xla", "xla_split"):
        model = Memory3(tiny(**{"model.attention": impl}), rngs=nnx.Rngs(11))
        assert rel(model(tokens, memory=memory, padding_mask=padding), want) < 1e-5, impl


def _loss_and_grads(cfg, tokens, memory):
    graphdef, state = nnx.split(Memory3(cfg, rngs=nnx.Rngs(12)))

    def loss(state):
        logits = nnx.merge(graphdef, state)(tokens, memory=memory)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 7])

    return jax.jit(jax.value_and_grad(loss))(state)


@pytest.mark.parametrize("variant", [{"model.remat": "nothing_saveable"}, {"model.remat": "dots_saveable"},
                                     {"model.remat": "save_attention_projections"}, {"model.scan_layers": False},
                                     {"model.scan_layers": False, "model.remat": "nothing_saveable"}])
def test_remat_and_scan_do_not_change_the_math(variant):
    rng = np.random.default_rng(13)
    tokens = jnp.asarray(rng.integers(0, 512, (2, 32)))
    kv, valid = random_memory(tiny(), rng, 2, 2, 2, 4)
    memory = MemoryInputs(jnp.asarray(kv), jnp.asarray(valid))
    base_loss, base_grads = _loss_and_grads(tiny(), tokens, memory)
    loss, grads = _loss_and_grads(tiny(**variant), tokens, memory)
    np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
        assert rel(a, b) < 1e-5


def test_bf16_compute_with_f32_parameters():
    cfg = tiny(**{"model.dtype": "bfloat16"})
    model = Memory3(cfg, rngs=nnx.Rngs(14))
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
    tokens = jnp.asarray(np.random.default_rng(15).integers(0, 512, (2, 32)))
    f32 = Memory3(tiny(), rngs=nnx.Rngs(14))
    logits = model(tokens)
    assert logits.dtype == jnp.float32
    assert 1e-6 < rel(logits, f32(tokens)) < 3e-2  # bf16 rounding, nothing worse


def test_every_parameter_has_logical_axes():
    model = Memory3(tiny(), rngs=nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == var[...].ndim, path


def test_bad_inputs_get_clear_errors():
    cfg = tiny()
    model = Memory3(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"tokens\[1, 3\] = 2048 is outside the vocabulary"):
        model(jnp.zeros((2, 8), jnp.int32).at[1, 3].set(2048))
    with pytest.raises(ValueError, match=r"tokens\[0, 1\] = -1 is outside the vocabulary"):
        model.prefill(jnp.zeros((2, 8), jnp.int32).at[0, 1].set(-1), cache_len=64)
    with pytest.raises(ValueError, match=r"shape \(batch, length\)"):
        model(jnp.zeros((8,), jnp.int32))
    with pytest.raises(TypeError, match="integer token ids"):
        model(jnp.zeros((2, 8), jnp.float32))
    with pytest.raises(ValueError, match="padding_mask has shape"):
        model(jnp.zeros((2, 8), jnp.int32), padding_mask=jnp.ones((2, 9), bool))
    with pytest.raises(ValueError, match="padding_mask must be right padding"):
        model(jnp.zeros((1, 4), jnp.int32), padding_mask=jnp.array([[True, False, True, True]]))
    kv, valid = random_memory(cfg, np.random.default_rng(0), 2, 2, 5, 4)
    with pytest.raises(ValueError, match=r"3 chunks of 16\) this model needs"):
        model(jnp.zeros((2, 40), jnp.int32), memory=MemoryInputs(jnp.asarray(kv), jnp.asarray(valid)))
    with pytest.raises(ValueError, match="references have 33 tokens; memory.reference_len is 32"):
        write_memories(model, np.ones((1, 33), int), np.array([33]))
    with pytest.raises(ValueError, match="reference 1 is empty"):
        write_memories(model, np.ones((2, 8), int), np.array([8, 0]))
    with pytest.raises(ValueError, match="reference 0 token 2 = -1"):
        write_memories(model, np.array([[5, 6, -1, 0]]), np.array([3]))


def test_concrete_token_ids_are_checked_once_per_call(monkeypatch):
    model = Memory3(tiny(), rngs=nnx.Rngs(0))
    checked = []
    check = model._check_tokens
    monkeypatch.setattr(model, "_check_tokens", lambda tokens, name: checked.append(name) or check(tokens, name))
    tokens = jnp.ones((2, 8), jnp.int32)
    model(tokens)
    model.prefill(tokens, cache_len=64)
    assert checked == ["tokens", "tokens"]  # one pass over the ids per call (prefill used to make two)


def test_prefill_logits_at_one_position_per_row_are_those_of_the_full_forward():
    cfg = tiny(**{"model.dtype": "float32"})
    model = Memory3(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(5, cfg.model.vocab_size, (3, 20)), jnp.int32)
    lengths = np.array([20, 7, 1])
    mask = jnp.arange(20)[None, :] < lengths[:, None]
    full = np.asarray(model(tokens, padding_mask=mask))
    last, cache = model.prefill(tokens, cache_len=40, padding_mask=mask, logits_at=jnp.asarray(lengths - 1))
    assert last.shape == (3, full.shape[-1])
    np.testing.assert_allclose(np.asarray(last), full[np.arange(3), lengths - 1], rtol=1e-5, atol=1e-5)
    _, full_cache = model.prefill(tokens, cache_len=40, padding_mask=mask)
    for (k, v), (fk, fv) in zip(cache, full_cache):
        np.testing.assert_array_equal(np.asarray(k), np.asarray(fk))
    with pytest.raises(ValueError, match=r"logits_at has shape \(2,\), expected \(3,\)"):
        model.prefill(tokens, cache_len=40, logits_at=jnp.zeros((2,), jnp.int32))


@pytest.mark.parametrize("with_memory", [False, True])
def test_prefill_over_per_layer_weights_equals_the_stacked_prefill(with_memory):
    """Generation's prefill runs the layers over `layer_states` (fused q/k/v and gate/up kernels): the same
    logits, and per-layer caches equal to the stacked ones, memory slots included."""
    cfg = tiny(**{"model.dtype": "float32", "memory.layer_start": 1})
    model = Memory3(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(5, cfg.model.vocab_size, (2, 20)), jnp.int32)
    mask = jnp.arange(20)[None, :] < jnp.array([20, 9])[:, None]
    memory = None
    if with_memory:
        kv, valid = random_memory(cfg, rng, 2, 2, 3, 4)
        memory = MemoryInputs(jnp.asarray(kv), jnp.asarray(valid))
    _, state = nnx.split(model)
    layer_states = [seg.layer_states(state["layers"][i]["blocks"]) for i, seg in enumerate(model.layers)]
    kw = dict(cache_len=48, memory=memory, padding_mask=mask, memory_slots=12, logits_at=jnp.array([19, 8]))
    want_logits, want_cache = model.prefill(tokens, **kw)
    logits, cache = model.prefill(tokens, layer_states=layer_states, **kw)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=1e-5, atol=1e-5)
    assert [len(seg_kv) for seg_kv in cache] == [seg.num_layers for seg in model.layers]
    for seg, seg_kv, (want_k, want_v) in zip(model.layers, cache, want_cache):
        for i, (k, v) in enumerate(seg_kv):
            assert k.shape == want_k.shape[1:] == (2, 48 + 12 * seg.is_memory, cfg.model.num_kv_heads,
                                                   cfg.model.head_dim)
            np.testing.assert_allclose(np.asarray(k), np.asarray(want_k[i]), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.asarray(v), np.asarray(want_v[i]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cache_len=10 is shorter than the prompt's stream"):
        model.prefill(tokens, cache_len=10, layer_states=layer_states)


@pytest.mark.parametrize("with_memory", [False, True])
def test_prefill_with_the_sink_apart_equals_the_prefill_through_it(with_memory):
    """`prefill(sink_kv=...)` reads the prompt without the sink and merges the sink's keys, computed once, into
    each attention: the same logits and caches as the exact kernel over the whole stream, memory included."""
    overrides = {"model.dtype": "float32", "memory.layer_start": 1}
    exact = Memory3(tiny(**overrides, **{"model.attention": "exact"}), rngs=nnx.Rngs(0))
    model = Memory3(tiny(**overrides, **{"model.attention": "xla_split"}), rngs=nnx.Rngs(1))
    nnx.update(model, nnx.state(exact))
    cfg, s = model.cfg, len(model.cfg.memory.reference_prefix_ids) + 1
    rng = np.random.default_rng(5)
    lengths = np.array([20, 9, 1])
    tokens = jnp.asarray(rng.integers(5, cfg.model.vocab_size, (3, 20)), jnp.int32)
    mask = jnp.arange(20)[None, :] < jnp.asarray(lengths)[:, None]
    memory = None
    if with_memory:
        kv, valid = random_memory(cfg, rng, 3, 2, 3, 4)
        memory = MemoryInputs(jnp.asarray(kv), jnp.asarray(valid))
    layer_states = [seg.layer_states() for seg in model.layers]
    with jax.default_matmul_precision("highest"):  # float32 products on a GPU default to TF32
        sink, stacked = model.sink_kv(layer_states), model.sink_kv()
    assert [len(seg_sink) for seg_sink in sink] == [seg.num_layers for seg in model.layers]
    assert sink[0][0][0].shape == (s, cfg.model.num_kv_heads, cfg.model.head_dim)
    for seg_sink, seg_stacked in zip(sink, stacked):  # the same from the stacked weights
        for layer_kv, stacked_kv in zip(seg_sink, seg_stacked):
            for got, want in zip(layer_kv, stacked_kv):
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    kw = dict(cache_len=48, memory=memory, padding_mask=mask, memory_slots=12, logits_at=jnp.asarray(lengths - 1))
    with jax.default_matmul_precision("highest"):
        want_logits, want_cache = exact.prefill(tokens, **kw)
        logits, cache = model.prefill(tokens, layer_states=layer_states, sink_kv=sink, **kw)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=1e-5, atol=1e-5)
    for seg, seg_kv, want_kv in zip(model.layers, cache, want_cache):
        for i, layer_kv in enumerate(seg_kv):
            for got, want in zip(layer_kv, want_kv):
                assert got.shape == want.shape[1:] == (3, 48 + 12 * seg.is_memory, cfg.model.num_kv_heads,
                                                       cfg.model.head_dim)
                for row, n in enumerate(lengths):  # the sink and the real tokens; the rest is free room
                    np.testing.assert_allclose(np.asarray(got[row, :s + n]), np.asarray(want[i, row, :s + n]),
                                               rtol=1e-5, atol=1e-5)
                assert not np.asarray(got[:, s + 24:]).any()  # after the 20 tokens padded to 24: empty room
    with pytest.raises(ValueError, match="pass layer_states too"):
        model.prefill(tokens, cache_len=48, sink_kv=sink)
    with pytest.raises(ValueError, match="attention with the sink apart needs one of"):
        exact.prefill(tokens, cache_len=48, layer_states=[seg.layer_states() for seg in exact.layers], sink_kv=sink)
    # sink_kv not made for this model (a segment missing; a shorter sink): named, before any work
    with pytest.raises(ValueError, match=r"one \(k, v\) per layer"):
        model.prefill(tokens, cache_len=48, layer_states=layer_states, sink_kv=sink[:-1])
    short = [[(k[1:], v[1:]) for k, v in seg_sink] for seg_sink in sink]
    with pytest.raises(ValueError, match=r"sink_kv\[0\]\[0\] must be \(k, v\) each of shape"):
        model.prefill(tokens, cache_len=48, layer_states=layer_states, sink_kv=short)
