"""The splash backend (Pallas interpret mode on the CPU) against the exact attention path, and `auto`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3jax import config, sharding
from m3jax.model import attention
from m3jax.model.attention import attend, resolve_impl
from m3jax.model.lm import Memory3, MemoryInputs
from m3jax.model.masks import MemoryLayout, context_mask
from m3jax.model.splash import splash_attention, static_mask

SINK, CHUNK, HQ, HKV, D = 3, 16, 4, 2, 16


def _case(chunks, per_chunk, window, seed=0):
    """Random q/k/v over `[memory | sink | context]` with a padded row and some empty memory slots."""
    rng = np.random.default_rng(seed)
    b, t = 2, chunks * CHUNK + 5  # a partial last chunk
    padding = np.ones((b, t), bool)
    padding[1, t - 21:] = False
    memory = None
    if per_chunk:
        valid = rng.random((b, chunks * per_chunk)) > 0.3
        memory = (np.repeat(np.arange(chunks), per_chunk), jnp.asarray(valid), window)
    mask = context_mask(jnp.asarray(padding), SINK, CHUNK, memory)
    tq = SINK + t
    tk = tq + chunks * per_chunk
    q, k, v = (jnp.asarray(rng.normal(size=(b, n, h, D)), jnp.float32) for n, h in ((tq, HQ), (tk, HKV), (tk, HKV)))
    return q, k, v, mask


def _value_and_grads(impl, q, k, v, mask):
    def loss(q, k, v):
        out = attend(q, k, v, mask, impl)
        return jnp.sum(jnp.sin(out) * jnp.arange(out.shape[1])[None, :, None, None] / out.shape[1]), out
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


@pytest.mark.parametrize("chunks,per_chunk,window", [
    (0, 0, 1),  # no memory: causal stream with right padding (non-memory layers, reference encoding)
    (2, 6, 1),  # inference layout: each chunk reads its own retrieved memories
    (5, 4, 3),  # stage-2 layout: chunk c reads the memories of chunks c-2..c
])
def test_splash_matches_exact_values_and_gradients(chunks, per_chunk, window):
    q, k, v, mask = _case(max(chunks, 2), per_chunk, window)
    want, want_grads = _value_and_grads("exact", q, k, v, mask)
    got, got_grads = _value_and_grads("splash", q, k, v, mask)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5, err_msg=f"d{name}")
    if per_chunk:  # an empty slot gets no gradient, and it is not trivially so for the valid ones
        unused = ~np.asarray(mask.memory_valid)
        assert np.all(np.asarray(got_grads[1])[:, :unused.shape[1]][unused] == 0)
        assert np.abs(np.asarray(got_grads[1])[:, :unused.shape[1]][~unused]).max() > 1e-3


def test_static_mask_by_hand():
    """2 sink positions, chunks of 2, one slot per chunk, window 2; padded to 128 x 128 blocks."""
    layout = MemoryLayout(sink_len=2, chunk_len=2, slot_chunks=(0, 1), window=2)
    m = static_mask(5, 2, layout)  # stream: sink, sink, chunk 0, chunk 0, chunk 1
    want = np.array([
        # m0 m1 s0 s1 c0 c0 c1
        [0, 0, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 1, 0, 0],
        [1, 0, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ], bool)
    assert m.shape == (128, 128)
    np.testing.assert_array_equal(m[:5, :7], want)
    assert not m[:5, 7:].any()  # padded keys
    assert m[5:, 2].all() and m[5:].sum() == 123  # padded queries read one sink key only


def _tiny(impl):
    cfg = config.load("tiny", {"model.attention": impl})
    return Memory3(cfg, rngs=nnx.Rngs(0)), cfg


def _model_inputs(cfg, b=4, chunks=3):
    rng = np.random.default_rng(1)
    m, mem = cfg.model, cfg.memory
    t = chunks * mem.chunk_len
    tokens = jnp.asarray(rng.integers(5, m.vocab_size, (b, t)), jnp.int32)
    padding = np.ones((b, t), bool)
    padding[-1, t - 7:] = False
    kv = rng.normal(size=(b, chunks, 1, mem.num_layers, 2, m.num_kv_heads, mem.tokens_per_head, m.head_dim))
    valid = rng.random((b, chunks, 1, mem.tokens_per_head)) > 0.25
    return tokens, jnp.asarray(padding), MemoryInputs(jnp.asarray(kv, jnp.float32), jnp.asarray(valid), window=2)


def test_model_with_splash_equals_exact_sharded():
    """The whole model with memory, traced under a (data 2, fsdp 2, tensor 2) mesh: splash runs under
    shard_map over batch and heads and gives the exact path's logits."""
    exact, cfg = _tiny("exact")
    splash, _ = _tiny("splash")
    tokens, padding, memory = _model_inputs(cfg)
    want = exact(tokens, memory=memory, padding_mask=padding)
    mesh = sharding.make_mesh((2, 2, 2))
    graphdef, state = nnx.split(splash)

    @jax.jit
    def forward(state, tokens, padding, memory):
        with sharding.constraints(mesh):
            return nnx.merge(graphdef, state)(tokens, memory=memory, padding_mask=padding)

    with jax.set_mesh(mesh):
        got = forward(state, tokens, padding, memory)
    real = np.asarray(padding)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-4, rtol=1e-4)


def test_log_sum_exp_matches_the_scores_sharded_or_not():
    """with_lse (generation's prefill merges the sink's keys through it): each query's log-sum-exp over its
    allowed scaled scores (float64 by hand), the output unchanged; the same under a (data 2, fsdp 2,
    tensor 2) mesh, where the kernel runs under shard_map over batch and heads."""
    q, k, v, mask = _case(2, 6, 1)
    out, lse = splash_attention(q, k, v, mask, with_lse=True)
    np.testing.assert_allclose(out, splash_attention(q, k, v, mask), atol=1e-6)
    allowed = np.asarray(mask.to_dense(q.shape[1], k.shape[1]))[:, 0]  # (B, Tq, Tk)
    keys = np.repeat(np.asarray(k, np.float64), HQ // HKV, axis=2)  # query head h reads kv head h // G
    scores = np.einsum("bqhd,bkhd->bqhk", np.asarray(q, np.float64), keys) / np.sqrt(D)
    scores = np.where(allowed[:, :, None], scores, -np.inf)
    top = scores.max(-1)
    want = top + np.log(np.exp(scores - top[..., None]).sum(-1))  # (B, Tq, Hq)
    assert lse.shape == want.shape and np.isfinite(want).all()  # every query (padded ones too) reads some key
    np.testing.assert_allclose(lse, want, atol=1e-5, rtol=1e-5)
    mesh = sharding.make_mesh((2, 2, 2))

    @jax.jit
    def sharded(q, k, v):
        with sharding.constraints(mesh):
            return splash_attention(q, k, v, mask, with_lse=True)

    with jax.set_mesh(mesh):
        got_out, got_lse = sharded(q, k, v)
    np.testing.assert_allclose(got_out, out, atol=1e-6)
    np.testing.assert_allclose(got_lse, lse, atol=1e-6)


@pytest.mark.parametrize("per_chunk", [0, 40])
def test_the_kernel_with_its_log_sum_exp_lowers_for_a_tpu(per_chunk):
    # no TPU here: lower for it (Pallas -> Mosaic) without compiling, at generation's prefill shapes with the
    # sink apart (m3_2p4b's heads, a 128-token prompt, chunks of 64, 5 references x 8 tokens each)
    b, t, hq, hkv, d, chunks = 2, 128, 40, 8, 80, 2
    memory = None
    if per_chunk:
        memory = (np.repeat(np.arange(chunks), per_chunk), jnp.ones((b, chunks * per_chunk), bool), 1)
    mask = context_mask(jnp.ones((b, t), bool), 0, 64, memory)
    q = jnp.zeros((b, t, hq, d), jnp.bfloat16)
    k = jnp.zeros((b, chunks * per_chunk + t, hkv, d), jnp.bfloat16)
    run = lambda q, k, v: splash_attention(q, k, v, mask, interpret=False, with_lse=True)  # noqa: E731
    assert "tpu_custom_call" in jax.jit(run).trace(q, k, k).lower(lowering_platforms=("tpu",)).as_text()


def test_a_kernel_made_under_a_jit_serves_later_calls():
    """Kernels are cached by shape; one first made while a jit traced (a train step) must serve later calls
    (an evaluation, eagerly or in another jit) instead of leaking that trace's values into them."""
    from m3jax.model import splash
    q, k, v, mask = _case(2, 6, 1)
    splash._kernel.cache_clear()
    first = jax.jit(lambda q, k, v: attend(q, k, v, mask, "splash"))(q, k, v)
    assert splash._kernel.cache_info().currsize == 1
    np.testing.assert_allclose(attend(q, k, v, mask, "splash"), first, atol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda q, k, v: attend(q, k, v, mask, "splash") * 2)(q, k, v), 2 * first,
                               atol=1e-6)
    assert splash._kernel.cache_info().hits == 2


def test_splash_falls_back_to_exact_without_a_static_layout():
    """Per-row token groups (generation) cannot be a static mask: the exact path answers instead."""
    q, k, v, mask = _case(2, 3, 1)
    grouped = mask.replace(layout=None)
    np.testing.assert_allclose(attend(q, k, v, grouped, "splash"), attend(q, k, v, mask, "exact"), atol=1e-6)


@pytest.mark.parametrize("platform,dtype,want", [
    ("tpu", "bfloat16", "splash"), ("tpu", "float32", "splash"),
    ("gpu", "bfloat16", "cudnn_split"), ("gpu", "float16", "cudnn_split"), ("gpu", "float32", "exact"),
    ("cpu", "bfloat16", "exact"), ("cpu", "float32", "exact"),
])
def test_auto_backend_per_platform(platform, dtype, want, monkeypatch):
    assert resolve_impl("auto", dtype, platform) == want
    monkeypatch.setattr(attention.jax, "default_backend", lambda: platform)  # what a layer sees at init
    assert resolve_impl("auto", dtype) == want
    cfg = config.load("tiny", {"model.attention": "auto", "model.dtype": dtype})
    assert attention.Attention(cfg.model, rngs=nnx.Rngs(0)).impl == want
    assert resolve_impl("exact", dtype, platform) == "exact"  # an explicit choice is kept
