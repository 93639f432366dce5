"""The `splash` attention backend: Pallas TPU splash attention with the Memory3 masks.

Splash attention skips whole (query block, key block) tiles that its static mask leaves empty, so
memory keys cost only the tiles where a chunk meets its own memories. What goes where:

- The **static** mask (a numpy array, the same for every batch row and head) holds the structure:
  causal over the stream `[sink | context]`, and at memory layers the memory slots each query chunk
  reads (chunk c reads the slots of chunks c-window+1..c; sink queries read none). It comes from
  `MemoryLayout` (sink length, chunk length, each slot's chunk, window), which `context_mask` attaches.
- What differs **per batch row** (right padding of the stream, memory slots left empty by short
  references or missing retrievals) is key-side only, so it goes through the kernel's segment ids:
  every query has segment 0, a usable key 0, an unusable key 1. A query never loses all its keys:
  every real query sees the stream's first key (the sink's, or with the sink apart the prompt's first
  token), which is always valid.
- Lengths are padded to whole kernel blocks; padded key columns are False in the static mask, padded
  query rows see the stream's first key (their outputs are dropped).
- With a sharding context (`m3jax.sharding.constraints`) the kernel runs under `shard_map`, batch over
  the mesh axes of `act_batch` and heads over those of `act_heads` when they divide; otherwise it is
  vmapped over the batch on one device.
- Generation's prefill with the sink apart asks for each query's log-sum-exp too (`with_lse`), to merge
  the sink's keys in afterwards (`split_attention.attention_after_sink`).
- Off TPU the kernel runs in Pallas interpret mode (tests on the CPU). A dense mask without a layout
  (generation's per-row token groups) is not expressible statically: `attend` uses the exact path then.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec as P

from m3jax import sharding
from m3jax.model.masks import AttentionMask, MemoryLayout
from m3jax.rounding import round_up

BLOCK = 128  # kernel tile along queries and keys (TPU lanes)


def static_mask(tq: int, num_memory: int, layout: MemoryLayout | None) -> np.ndarray:
    """(Tq_padded, Tk_padded) bool: the structure of `[memory | stream]` attention, padded to blocks."""
    tk = num_memory + tq
    out = np.zeros((round_up(tq, BLOCK), round_up(tk, BLOCK)), bool)
    index = np.arange(tq)
    out[:tq, num_memory:tk] = index[None, :] <= index[:, None]
    if num_memory:
        rel = index - layout.sink_len
        q_chunk = np.where(rel >= 0, rel // layout.chunk_len, -1)
        lag = q_chunk[:, None] - np.asarray(layout.slot_chunks)[None, :]
        out[:tq, :num_memory] = (q_chunk[:, None] >= 0) & (lag >= 0) & (lag < layout.window)
    out[tq:, num_memory] = True  # padded queries: one valid key, so their softmax stays finite
    return out


@functools.lru_cache(maxsize=32)
def _kernel(tq: int, num_memory: int, layout: MemoryLayout | None, heads: int, interpret: bool, with_lse: bool):
    mask = mask_lib.NumpyMask(static_mask(tq, num_memory, layout))
    # The kernel keeps its mask's block tables as arrays, and this cache keeps the kernel: made under a jit's
    # trace they would be that trace's values, leaked into every later use. Made eagerly, they are constants.
    with jax.ensure_compile_time_eval():
        return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([mask] * heads), head_shards=1, q_seq_shards=1,
                                          block_sizes=kernel_lib.BlockSizes.get_default(), interpret=interpret,
                                          save_residuals=with_lse)


def _key_usable(mask: AttentionMask, b: int, tq: int, num_memory: int):
    """(B, Tk) bool: memory slots by the layout's validity, stream keys by the row's length."""
    stream = jnp.arange(tq)[None, :] < mask.kv_lengths[:, None]
    if not num_memory:
        return stream
    return jnp.concatenate([mask.memory_valid.astype(bool), stream], axis=1)


def _local_attention(q, k, v, key_usable, *, num_memory: int, layout, interpret: bool, with_lse: bool):
    """One device's share: q (b, Tq, H, D), k/v (b, Tk, Hkv, D), key_usable (b, Tk) -> (b, Tq, H, D), and
    with_lse its log-sum-exp (b, Tq, H) f32 too."""
    b, tq, hq, d = q.shape
    tk = k.shape[1]
    kernel = _kernel(tq, num_memory, layout, hq, interpret, with_lse)
    tq_pad, tk_pad = round_up(tq, BLOCK), round_up(tk, BLOCK)
    q = jnp.pad(q * jnp.asarray(d ** -0.5, q.dtype), ((0, 0), (0, tq_pad - tq), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, tk_pad - tk), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, tk_pad - tk), (0, 0), (0, 0)))
    kv_segment = jnp.pad(jnp.where(key_usable, 0, 1), ((0, 0), (0, tk_pad - tk)), constant_values=1)
    segments = kernel_lib.SegmentIds(q=jnp.zeros((b, tq_pad), jnp.int32), kv=kv_segment.astype(jnp.int32))
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(_heads_first(q), _heads_first(k),
                                                                       _heads_first(v), segments)
    if not with_lse:
        return _heads_first(out)[:, :tq]
    out, (lse,) = out  # lse (b, H, Tq_padded), of the scaled scores
    return _heads_first(out)[:, :tq], jnp.swapaxes(lse, 1, 2)[:, :tq].astype(jnp.float32)


def _heads_first(x):
    """(b, T, H, D) <-> (b, H, T, D): the kernel wants heads before the sequence."""
    return jnp.swapaxes(x, 1, 2)


def _on_tpu(mesh) -> bool:
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    return device.platform == "tpu"


def splash_attention(q, k, v, mask: AttentionMask, interpret: bool | None = None, with_lse: bool = False):
    """q: (B, Tq, Hq, D); k, v: (B, Nm + Tq, Hkv, D) -> (B, Tq, Hq, D), the keys `[memory | stream]`.

    mask carries the stream lengths and, with memory keys, its `layout` and `memory_valid`.
    interpret: None runs the compiled kernel when the target devices are TPUs, interpret mode otherwise.
    with_lse (inference: no gradient): also the log-sum-exp of each query's scores, (B, Tq, Hq) f32, so
    that keys outside the call can be merged in (generation's prefill with the sink apart).
    """
    b, tq, hq, _ = q.shape
    num_memory = k.shape[1] - tq
    if num_memory < 0:
        raise ValueError(f"splash attention needs the queries to be the stream's last keys ({tq} vs {k.shape[1]})")
    layout = mask.layout
    if num_memory and (layout is None or len(layout.slot_chunks) != num_memory):
        raise ValueError(f"splash attention over {num_memory} memory keys needs a MemoryLayout that describes them")
    context = sharding.current()
    mesh = context[0] if context is not None else None
    if interpret is None:
        interpret = not _on_tpu(mesh)
    local = functools.partial(_local_attention, num_memory=num_memory, layout=layout, interpret=interpret,
                              with_lse=with_lse)
    usable = _key_usable(mask, b, tq, num_memory)
    if mesh is None:
        return local(q, k, v, usable)
    rules = context[1]
    batch = sharding.mesh_axes(mesh, rules, "act_batch", b)
    heads = sharding.mesh_axes(mesh, rules, "act_heads", hq)
    if heads is not None and sharding.mesh_axes(mesh, rules, "act_heads", k.shape[2]) is None:
        heads = None  # the KV heads must split the same way as the query heads
    act, keys = P(batch, None, heads, None), P(batch, None)
    out_specs = (act, P(batch, None, heads)) if with_lse else act
    return jax.shard_map(local, mesh=mesh, in_specs=(act, act, act, keys), out_specs=out_specs,
                         check_vma=False)(q, k, v, usable)
