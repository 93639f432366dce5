"""The memory part + merge kernel of split memory attention (Pallas, interpreted on the CPU) against the
float64 loop reference of tests/naive.py, and against XLA's path in bf16; and split attention with the
sink's keys apart (generation's prefill), which merges them before the kernel does the memories."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import naive
from m3jax import sharding
from m3jax.model import memory_merge, split_attention
from m3jax.model.attention import attend, attend_after_sink
from m3jax.model.masks import context_mask
from m3jax.model.split_attention import _causal_with_lse, _Chunked, _memory_part, merge_parts

SINK = 3


def case(seed, chunks=3, chunk_len=16, per_chunk=5, window=1, hq=4, hkv=2, d=80, dtype=np.float32, short=0, sink=SINK):
    """short: the last chunk has that many rows fewer (the kernel's last block runs past the rows); sink: 0
    for a stream whose sink is merged apart (generation's prefill)."""
    rng = np.random.default_rng(seed)
    b, t = 2, chunks * chunk_len - short
    q = rng.normal(size=(b, sink + t, hq, d)).astype(dtype)
    k, v = (rng.normal(size=(b, sink + t, hkv, d)).astype(dtype) for _ in range(2))
    mem_k, mem_v = (rng.normal(size=(b, chunks, per_chunk, hkv, d)).astype(dtype) for _ in range(2))
    mem_valid = rng.random((b, chunks, per_chunk)) < 0.7
    mem_valid[0, 1] = False  # a chunk that reads no memory: its rows are the stream part's
    padding = np.ones((b, t), bool)
    padding[1, t - chunk_len // 2:] = False
    mask = context_mask(jnp.asarray(padding), sink, chunk_len,
                        (np.repeat(np.arange(chunks), per_chunk), jnp.asarray(mem_valid).reshape(b, -1), window))
    return q, k, v, mem_k, mem_v, mem_valid, padding, mask


def merged(q, k, v, mem_k, mem_v, mask, kernel: bool):
    """The stream part (XLA's causal attention with its log-sum-exp), then the kernel's or XLA's merge."""
    b, c, m, hkv, d = mem_k.shape
    with jax.default_matmul_precision("highest"):  # float32 products on a GPU default to TF32
        out_s, lse_s = _causal_with_lse(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask.kv_lengths, "xla")
    view = _Chunked(mask.layout, q.shape[1], jnp.asarray(mem_k).reshape(b, c * m, hkv, d),
                    jnp.asarray(mem_v).reshape(b, c * m, hkv, d), mask.memory_valid)
    if kernel:
        return memory_merge.merge_memory(jnp.asarray(q), out_s, lse_s, view.keys, view.values, view.valid,
                                         sink=mask.layout.sink_len, chunk_len=mask.layout.chunk_len, interpret=True)
    with jax.default_matmul_precision("highest"):
        return merge_parts(out_s, lse_s, *_memory_part(jnp.asarray(q), view), q.dtype)


@pytest.mark.parametrize("window,hq,hkv,short,sink", [(1, 4, 2, 0, SINK), (2, 4, 2, 0, SINK), (1, 5, 1, 0, SINK),
                                                     (1, 4, 2, 11, SINK), (1, 4, 2, 11, 0)])
def test_kernel_matches_naive_float64(window, hq, hkv, short, sink):
    q, k, v, mem_k, mem_v, mem_valid, padding, mask = case(window * 10 + hq + short, window=window, hq=hq, hkv=hkv,
                                                           short=short, sink=sink)
    out, lse = merged(q, k, v, mem_k, mem_v, mask, kernel=True)
    key_valid = np.concatenate([np.ones((2, sink), bool), padding], 1)
    want = naive.attention(q, k, v, key_valid, sink, 16, mem_k, mem_v, mem_valid, window)
    real = key_valid  # rows past a row's padding are never read
    np.testing.assert_allclose(np.asarray(out)[real], want[real], rtol=1e-5, atol=1e-5)
    _, want_lse = merged(q, k, v, mem_k, mem_v, mask, kernel=False)
    np.testing.assert_allclose(np.asarray(lse)[real], np.asarray(want_lse)[real], rtol=1e-6, atol=1e-5)


def test_sink_rows_and_chunks_without_memory_keep_the_stream_part():
    q, k, v, mem_k, mem_v, mem_valid, padding, mask = case(7)
    with jax.default_matmul_precision("highest"):
        out_s, lse_s = _causal_with_lse(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask.kv_lengths, "xla")
    out, lse = merged(q, k, v, mem_k, mem_v, mask, kernel=True)
    no_memory = slice(SINK + 16, SINK + 32)  # row 0's chunk 1 reads none
    for rows in (np.s_[:, :SINK], np.s_[0, no_memory]):
        np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(out_s)[rows], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(lse)[rows], np.asarray(lse_s)[rows], rtol=1e-6)
    assert not np.allclose(np.asarray(out)[1, no_memory], np.asarray(out_s)[1, no_memory])  # row 1's does


def test_bf16_agrees_with_xlas_merge():
    q, k, v, mem_k, mem_v, _, padding, mask = case(3, chunk_len=32, per_chunk=40, dtype=jnp.bfloat16)
    got, got_lse = merged(q, k, v, mem_k, mem_v, mask, kernel=True)
    want, want_lse = merged(q, k, v, mem_k, mem_v, mask, kernel=False)
    assert got.dtype == jnp.bfloat16
    real = np.concatenate([np.ones((2, SINK), bool), padding], 1)
    np.testing.assert_allclose(np.asarray(got, np.float32)[real], np.asarray(want, np.float32)[real],
                               rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(got_lse)[real], np.asarray(want_lse)[real], rtol=1e-3, atol=1e-3)


def test_shapes_it_does_not_take_are_named():
    assert memory_merge.fits(64, 40, 80)
    assert not memory_merge.fits(24, 40, 80) and not memory_merge.fits(64, 40, 72)  # chunk length, head dim
    assert not memory_merge.fits(64, memory_merge.MAX_SLOTS + 1, 80)
    q = jnp.zeros((1, SINK + 40, 2, 80))
    keys = jnp.zeros((1, 2, 5, 1, 80))
    with pytest.raises(ValueError, match="does not take"):  # 40 rows after the sink are 3 chunks of 16, not 2
        memory_merge.merge_memory(q, q, jnp.zeros(q.shape[:3]), keys, keys, jnp.ones((1, 2, 5), bool),
                                  sink=SINK, chunk_len=16)
    with pytest.raises(ValueError, match="shapes disagree"):
        memory_merge.merge_memory(q, q[:, 1:], jnp.zeros(q.shape[:3]), keys, keys, jnp.ones((1, 2, 5), bool),
                                  sink=SINK, chunk_len=16)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's stream kernel runs on GPU only")
def test_cudnn_split_attention_with_the_kernel_matches_naive():
    """The whole split attention on a GPU (cuDNN stream part, this kernel's merge), forward and backward."""
    q, k, v, mem_k, mem_v, mem_valid, padding, mask = case(5, chunk_len=64, per_chunk=40)
    b, c, m, hkv, d = mem_k.shape
    d_out = np.random.default_rng(0).normal(size=q.shape).astype(np.float32)

    def f(q, k, v, mem_k, mem_v):
        keys = jnp.concatenate([mem_k.reshape(b, c * m, hkv, d), k], axis=1)
        values = jnp.concatenate([mem_v.reshape(b, c * m, hkv, d), v], axis=1)
        return attend(q, keys, values, mask, "cudnn_split").astype(jnp.float32)

    args = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, mem_k, mem_v)]
    out, vjp = jax.vjp(f, *args)
    grads = vjp(jnp.asarray(d_out))
    key_valid = np.concatenate([np.ones((b, SINK), bool), padding], 1)
    as64 = [np.asarray(x, np.float64) for x in args]
    want, want_grads = naive.attention(*as64[:3], key_valid, SINK, 64, *as64[3:], mem_valid, 1, d_out=d_out)
    np.testing.assert_allclose(np.asarray(out)[key_valid], want[key_valid], rtol=3e-2, atol=3e-2)
    for name, g in zip(("q", "k", "v", "mem_k", "mem_v"), grads):
        g, w = np.asarray(g, np.float64), want_grads[name]
        assert np.linalg.norm(g - w) / np.linalg.norm(w) < 3e-2, name


on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN runs on GPU only")


@pytest.mark.parametrize("impl", ["xla_split", "xla_split+kernel", "splash", pytest.param("cudnn_split", marks=on_gpu)])
@pytest.mark.parametrize("with_memory", [False, True])
def test_attention_with_the_sink_apart_matches_naive(impl, with_memory, monkeypatch):
    """The stream without its sink, whose keys (the same for every row) are merged apart: what the naive
    attention over [sink | stream] gives the stream's rows, with and without memories. `+kernel`: the
    sink (and memory) merged by the memory merge kernel, as on cuDNN's path (interpreted here)."""
    calls, by_kernel = [], impl.endswith("+kernel")
    if by_kernel:
        impl = impl.removesuffix("+kernel")
        monkeypatch.setattr(split_attention, "_merges_by_kernel", lambda _: True)
        merge = memory_merge.merge_memory
        monkeypatch.setattr(memory_merge, "merge_memory", lambda *a, **kw: calls.append(a[3].shape) or merge(*a, **kw))
    cudnn = impl == "cudnn_split"
    chunk_len = 64 if cudnn else 16
    q, k, v, mem_k, mem_v, mem_valid, padding, _ = case(13, chunk_len=chunk_len, per_chunk=40 if cudnn else 5)
    if not with_memory:
        mem_valid[:] = False
    k[:, :SINK], v[:, :SINK] = k[:1, :SINK], v[:1, :SINK]  # the sink is a constant
    b, c, m, hkv, d = mem_k.shape
    args = [jnp.asarray(x, jnp.bfloat16 if cudnn else jnp.float32) for x in (q, k, v, mem_k, mem_v)]
    key_valid = np.concatenate([np.ones((b, SINK), bool), padding], 1)
    want = naive.attention(*(np.asarray(x, np.float64) for x in args[:3]), key_valid, SINK, chunk_len,
                           *(np.asarray(x, np.float64) for x in args[3:]), mem_valid, 1)[:, SINK:]
    q, k, v, mem_k, mem_v = args
    keys, values = k[:, SINK:], v[:, SINK:]
    if with_memory:
        mask = context_mask(jnp.asarray(padding), 0, chunk_len,
                            (np.repeat(np.arange(c), m), jnp.asarray(mem_valid).reshape(b, -1), 1))
        keys = jnp.concatenate([mem_k.reshape(b, c * m, hkv, d), keys], axis=1)
        values = jnp.concatenate([mem_v.reshape(b, c * m, hkv, d), values], axis=1)
    else:
        mask = context_mask(jnp.asarray(padding), 0, chunk_len)
    with jax.default_matmul_precision("highest"):
        got = attend_after_sink(q[:, SINK:], keys, values, mask, (k[0, :SINK], v[0, :SINK]), impl)
    tol = 3e-2 if cudnn else 1e-5
    np.testing.assert_allclose(np.asarray(got, np.float32)[padding], want[padding], rtol=tol, atol=tol)
    if by_kernel:  # one kernel call, every chunk reading [sink | its memory] (48 rows: 1 chunk of 64 without memory)
        assert calls == [(b, c if with_memory else 1, SINK + m * with_memory, hkv, d)]


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (the CPU run forces 8 host devices)")
def test_under_a_mesh_each_device_merges_its_own_rows():
    """Traced under sharding constraints (data 2, fsdp 2, tensor 2 on 8 CPU devices), the kernel runs under
    shard_map, batch over data x fsdp and kv heads over tensor, and gives the unsharded result."""
    q, k, v, mem_k, mem_v, _, _, _ = case(9, hq=4, hkv=2)
    q, k, v = (np.concatenate([x, x[::-1]]) for x in (q, k, v))  # batch 4: divisible by data x fsdp
    mem_k, mem_v = (np.concatenate([x, x[::-1]]) for x in (mem_k, mem_v))
    b, c, m, hkv, d = mem_k.shape
    valid = np.random.default_rng(1).random((b, c * m)) < 0.8
    mask = context_mask(jnp.ones((b, q.shape[1] - SINK), bool), SINK, 16,
                        (np.repeat(np.arange(c), m), jnp.asarray(valid), 1))
    want = merged(q, k, v, mem_k, mem_v, mask, kernel=True)
    mesh = sharding.make_mesh((2, 2, 2))

    @jax.jit
    def sharded(q, k, v, mem_k, mem_v):
        with sharding.constraints(mesh):
            return merged(q, k, v, mem_k, mem_v, mask, kernel=True)
    got = sharded(*(jnp.asarray(x) for x in (q, k, v, mem_k, mem_v)))
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
    assert "shard_map" in str(jax.make_jaxpr(sharded)(*(jnp.asarray(x) for x in (q, k, v, mem_k, mem_v))))


@pytest.mark.parametrize("sink, w", [(4, 40), (0, 44), (0, 4)])
def test_the_kernel_lowers_for_a_gpu(sink, w):
    # no GPU here: lower the kernel for CUDA (Pallas -> Triton IR) without compiling it, at generation's
    # prefill shapes (m3_2p4b's heads, chunks of 64, 5 references x 8 tokens), with the sink in the
    # stream (4), and merged apart (0) by the kernel with the memory (4 sink + 40 keys a chunk) or alone
    b, t, hq, hkv, d = 2, 128, 40, 8, 80
    rows = jnp.zeros((b, sink + t, hq, d), jnp.bfloat16)
    memory = jnp.zeros((b, t // 64, w, hkv, d), jnp.bfloat16)
    args = (rows, rows, jnp.zeros((b, sink + t, hq), jnp.float32), memory, memory, jnp.ones((b, t // 64, w), bool))
    run = lambda *a: memory_merge.merge_memory(*a, sink=sink, chunk_len=64, interpret=False)  # noqa: E731
    assert "triton" in jax.jit(run).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
