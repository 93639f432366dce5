"""m3jax.model.inspect against the model's real outputs and the float64 loop references of tests/naive.py.

- kept tokens: gathering the model's keys/values at the reported indices gives exactly what
  `write_memories` stores; the scores and the top-k equal a float64 recomputation;
- attention to memory: the same layer-by-layer pass gives the model's logits; memory and stream shares
  sum to 1; the memory share equals a float64 recomputation; without valid memories it is 0.
"""
import naive
import numpy as np
import pytest
from flax import nnx
from test_model import context_stream, naive_params

from m3jax import config
from m3jax.memory.write import write_memories
from m3jax.model.inspect import kept_tokens, memory_attention
from m3jax.model.lm import Memory3, MemoryInputs


def tiny(**overrides):
    return config.load("tiny", {"model.dtype": "float32", **overrides})


@pytest.fixture(scope="module", params=[{}, {"memory.layer_start": 1}])
def model(request):
    return Memory3(tiny(**request.param), rngs=nnx.Rngs(4))


def references(cfg, rng, n=6):
    lengths = rng.integers(1, cfg.memory.reference_len + 1, n)
    lengths[:2] = [2, cfg.memory.reference_len]  # one shorter than tokens_per_head, one full
    tokens = rng.integers(5, cfg.model.vocab_size, (n, cfg.memory.reference_len))
    return tokens, lengths


def test_kept_tokens_are_what_write_memories_stores(model):
    cfg = model.cfg
    tokens, lengths = references(cfg, np.random.default_rng(0))
    kept = kept_tokens(model, tokens, lengths)
    memories, slots = write_memories(model, tokens, lengths)
    n, k = len(tokens), cfg.memory.tokens_per_head
    assert kept.index.shape == (n, cfg.memory.num_layers, cfg.model.num_kv_heads, k)
    filled = kept.index >= 0
    np.testing.assert_array_equal(filled, np.broadcast_to(slots[:, None, None, :], filled.shape))
    assert (kept.index < lengths[:, None, None, None]).all()
    for row in kept.index.reshape(-1, k):  # a token is kept at most once per head
        assert len(set(row[row >= 0].tolist())) == (row >= 0).sum()
    mask = filled[..., None]
    np.testing.assert_allclose(np.where(mask, kept.keys, 0), np.where(mask, memories[:, :, 0], 0), atol=1e-5)
    np.testing.assert_allclose(np.where(mask, kept.values, 0), np.where(mask, memories[:, :, 1], 0), atol=1e-5)
    # the comparison can fail: other tokens' keys differ from the kept ones
    shifted = np.roll(kept.keys, 1, axis=3)
    assert np.abs(np.where(mask, shifted - memories[:, :, 0], 0)).max() > 1e-2


def test_kept_token_scores_match_float64(model):
    cfg = model.cfg
    tokens, lengths = references(cfg, np.random.default_rng(1), n=3)
    kept = kept_tokens(model, tokens, lengths)
    p = len(cfg.memory.reference_prefix_ids)
    ids = np.concatenate([np.tile(cfg.memory.reference_prefix_ids, (len(tokens), 1)), tokens], axis=1)
    real = np.arange(tokens.shape[1])[None] < lengths[:, None]
    key_valid = np.concatenate([np.ones((len(tokens), p), bool), real], axis=1)
    layers = list(range(cfg.memory.layer_start, cfg.memory.layer_start + cfg.memory.num_layers))
    _, captured = naive.decoder(naive_params(model), cfg, ids, np.arange(ids.shape[1]), key_valid, p,
                                capture_layers=layers, stop_after=layers[-1])
    token_valid = np.concatenate([np.zeros((len(tokens), p), bool), real], axis=1)
    for i, layer in enumerate(layers):
        q_pre, k_pre, _, _ = captured[layer]
        want = naive.token_scores(q_pre, k_pre, token_valid)[..., p:]
        got = kept.scores[:, i]
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
        np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-4)
        top = naive.top_tokens(np.where(np.isfinite(want), want, -1.0), cfg.memory.tokens_per_head)
        index = kept.index[:, i]
        np.testing.assert_array_equal(index[index >= 0], top[index >= 0])


def _memory(model, rng, b, chunks, refs):
    cfg = model.cfg
    tokens, lengths = references(cfg, rng, n=10)
    memories, slots = write_memories(model, tokens, lengths)
    ids = rng.integers(0, len(tokens), (b, chunks, refs))
    valid = slots[ids].copy()
    valid[0, 1] = False  # a chunk that retrieved nothing
    return MemoryInputs(memories[ids], valid)


def naive_memory_share(model, tokens, memory):
    """(B, memory_layers, Hq, T) in float64 from the loop decoder's q and k."""
    cfg = model.cfg
    ids, positions, s = context_stream(model, tokens)
    b, c, r = memory.kv.shape[:3]
    k = memory.kv.shape[6]
    # (B, C, R, L, 2, H, k, D) -> the loop decoder's (B, C, R*k slots, L, 2, H, D)
    mem = np.moveaxis(np.asarray(memory.kv, np.float64), 6, 3).reshape(b, c, r * k, *memory.kv.shape[3:6], -1)
    mem_valid = np.asarray(memory.valid).reshape(b, c, r * k)
    layers = list(range(cfg.memory.layer_start, cfg.memory.layer_start + cfg.memory.num_layers))
    key_valid = np.ones(ids.shape, bool)
    _, captured = naive.decoder(naive_params(model), cfg, ids, positions, key_valid, s, memory_layers=layers,
                                memory=(mem, mem_valid), capture_layers=layers, stop_after=layers[-1])
    hq, d = cfg.model.num_heads, cfg.model.head_dim
    group = hq // cfg.model.num_kv_heads
    share = np.zeros((b, len(layers), hq, tokens.shape[1]))
    for li, layer in enumerate(layers):
        q_pre, _, k_rot, v = captured[layer]
        q = naive.rope(q_pre, positions, cfg.model.rope_theta)
        mem_k, mem_v = mem[:, :, :, li, 0], mem[:, :, :, li, 1]
        for bi in range(b):
            for h in range(hq):
                for t in range(tokens.shape[1]):
                    keys, _, origin = naive._row_keys(bi, s + t, h // group, k_rot, v, key_valid, mem_k, mem_v,
                                                      mem_valid, s, cfg.memory.chunk_len, 1)
                    logits = keys @ q[bi, s + t, h] / np.sqrt(d)
                    prob = np.exp(logits - logits.max())
                    prob /= prob.sum()
                    share[bi, li, h, t] = sum(pi for pi, o in zip(prob, origin) if o[0] == "mem")
    return share


def test_memory_attention_matches_the_model_and_float64(model):
    cfg = model.cfg
    rng = np.random.default_rng(2)
    b, t = 2, 3 * cfg.memory.chunk_len
    tokens = rng.integers(5, cfg.model.vocab_size, (b, t))
    memory = _memory(model, rng, b, 3, 2)
    got = memory_attention(model, tokens, memory)
    np.testing.assert_allclose(got.logits, np.asarray(model(tokens, memory=memory)), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got.memory_share + got.stream_share, 1.0, atol=1e-5)
    np.testing.assert_allclose(got.memory_share, naive_memory_share(model, tokens, memory), atol=1e-5)
    np.testing.assert_allclose(got.by_reference.sum(-1), got.memory_share, atol=1e-6)
    chunk = cfg.memory.chunk_len
    np.testing.assert_allclose(got.chunk_share, got.memory_share.reshape(*got.memory_share.shape[:-1], 3, chunk)
                               .mean(-1), atol=1e-6)
    assert np.all(got.memory_share[0, :, :, chunk:2 * chunk] == 0)  # the chunk without valid memories
    assert got.memory_share.max() > 1e-3  # elsewhere memory gets attention, so the checks can fail


def test_chunk_share_ignores_padding(model):
    cfg = model.cfg
    rng = np.random.default_rng(3)
    chunk = cfg.memory.chunk_len
    tokens = rng.integers(5, cfg.model.vocab_size, (2, 2 * chunk))
    padding = np.ones(tokens.shape, bool)
    padding[1, chunk + 3:] = False
    got = memory_attention(model, tokens, _memory(model, rng, 2, 2, 2), padding_mask=padding)
    np.testing.assert_allclose(got.chunk_share[1, ..., 1], got.memory_share[1, ..., chunk:chunk + 3].mean(-1),
                               atol=1e-6)
