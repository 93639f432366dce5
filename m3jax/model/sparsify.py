"""Token sparsification of a reference (SPEC 3): which tokens of each KV head become its memory.

score_j = sum over queries i of softmax_j(q_i . k_j / sqrt(d)), with q and k taken before RoPE, no
causal mask, and start tokens and padding excluded as both queries and keys. The query heads of one
KV group combine their scores by `combine` ("sum" by default: the attention the group gives token j).
Per KV head the `top_k` highest-scoring tokens are kept, best first; their keys after RoPE and their
values are stored.

Scores are column sums of attention probabilities. `token_scores` forms the (T x T) probabilities in
XLA; `kernel_token_scores` gets the same sums from a fused attention kernel's backward: with output
gradient 1 on every valid query, the values' gradient is sum_i p_ij (the kernel never stores the
probabilities: on an H200 the XLA form took ~1.5 ms per layer of a stage-2 step, benchmarks/RESULTS.md).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Selection(NamedTuple):
    """What memory writing keeps of a layer: token_valid (N, T) bool; `top_k` per KV head; `combine` of a
    group's heads. With `lengths`, the valid tokens are exactly [start, start + lengths) per row, and
    `kernel` ("cudnn" or "xla") names the fused attention that scores them (see kernel_token_scores)."""
    token_valid: jax.Array
    top_k: int
    combine: str = "sum"
    start: int = 0
    lengths: jax.Array | None = None
    kernel: str | None = None


def token_scores(q_pre, k_pre, token_valid, combine: str = "sum"):
    """q_pre: (N, T, Hq, D), k_pre: (N, T, Hkv, D), token_valid: (N, T) -> (N, Hkv, T) f32, -inf if invalid."""
    n, t, hq, d = q_pre.shape
    hkv = k_pre.shape[2]
    qg = q_pre.reshape(n, t, hkv, hq // hkv, d)
    # Logits in the compute dtype: they are the largest temporary (N x heads x T x T), and bf16 halves its
    # bytes (+5% writing throughput at 2.4B on an H200); the softmax below runs in f32.
    logits = jnp.einsum("nihgd,njhd->nhgij", qg, k_pre).astype(jnp.float32) * d ** -0.5
    logits = jnp.where(token_valid[:, None, None, None, :], logits, -jnp.inf)
    # softmax_j summed over queries i, as exp(logit - logsumexp_j): two passes over the (T x T) logits
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    query_ok = token_valid[:, None, None, :, None]
    per_head = jnp.sum(jnp.where(query_ok, jnp.exp(logits - jnp.where(query_ok, lse, 0.0)), 0.0), axis=3)
    scores = per_head.sum(axis=2) if combine == "sum" else per_head.max(axis=2)  # (N, Hkv, T)
    return jnp.where(token_valid[:, None, :], scores, -jnp.inf)


def kernel_token_scores(q_pre, k_pre, start: int, lengths, combine: str = "sum", implementation: str = "xla"):
    """`token_scores` for valid tokens [start, start + lengths) per row, through a fused attention kernel:
    (N, Hkv, T) f32, -inf outside. Scores carry no gradient (they only pick tokens)."""
    n, t, hq, d = q_pre.shape
    hkv = k_pre.shape[2]
    q, k = (jax.lax.stop_gradient(x[:, start:]) for x in (q_pre, k_pre))
    span = t - start
    pad = (-span) % 8  # cuDNN's differentiated attention wants lengths in multiples of 8
    q, k = (jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]) for x in (q, k))
    if combine != "sum":  # per query head: the kernel's value gradient would sum a group's heads
        k = jnp.repeat(k, hq // hkv, axis=2)
    lengths = lengths.astype(jnp.int32)
    real = jnp.arange(span + pad)[None, :] < lengths[:, None]  # (N, T')
    _, attention_vjp = jax.vjp(
        lambda values: jax.nn.dot_product_attention(q, k, values, key_value_seq_lengths=lengths,
                                                    implementation=implementation), jnp.zeros_like(k))
    ones_on_valid = jnp.broadcast_to(real[:, :, None, None], q.shape).astype(q.dtype)
    (received,) = attention_vjp(ones_on_valid)  # (N, T', heads, D): every column is sum_i p_ij
    scores = received[..., 0].astype(jnp.float32)
    if combine != "sum":
        scores = scores.reshape(n, span + pad, hkv, hq // hkv).max(axis=-1)
    scores = jnp.where(real[:, :, None], scores, -jnp.inf)[:, :span]
    return jnp.concatenate([jnp.full((n, hkv, start), -jnp.inf), jnp.swapaxes(scores, 1, 2)], axis=2)


def select_tokens(q_pre, k_pre, k_rot, v, selection: Selection):
    """Return (keys, values), each (N, Hkv, top_k, D): the kept tokens per KV head, best first."""
    with jax.named_scope("sparsify"):
        return _select(q_pre, k_pre, k_rot, v, selection)


def _select(q_pre, k_pre, k_rot, v, sel: Selection):
    if sel.kernel is not None and sel.lengths is not None:
        scores = kernel_token_scores(q_pre, k_pre, sel.start, sel.lengths, sel.combine, sel.kernel)
    else:
        scores = token_scores(q_pre, k_pre, sel.token_valid, sel.combine)
    top_k = sel.top_k
    _, idx = jax.lax.top_k(scores, top_k)  # (N, Hkv, top_k)

    def gather(x):  # (N, T, Hkv, D) -> (N, Hkv, top_k, D)
        return jnp.take_along_axis(jnp.swapaxes(x, 1, 2), idx[..., None], axis=2)

    return gather(k_rot), gather(v)


def slot_valid(token_valid, top_k: int):
    """(N, top_k) bool: invalid tokens score -inf and sort last, so the first min(n, top_k) slots are real."""
    n_valid = token_valid.sum(axis=-1)
    return jnp.arange(top_k)[None, :] < n_valid[:, None]
