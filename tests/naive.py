"""Independent float64 NumPy references, written from SPEC 2-4 with plain loops (no m3jax code).

- `attention`: memory attention (sink + own-chunk memories + causal context), forward and backward;
- `token_scores` / `top_tokens`: the sparsification rule of memory writing;
- `decoder`: the whole Memory3 forward (embedding, pre-norm blocks, RoPE, GQA, SwiGLU, head), with
  optional memory reading and per-layer capture of q/k before RoPE and k/v after it.
"""
from __future__ import annotations

import numpy as np


def _row_keys(b, i, kv_head, k, v, key_valid, mem_k, mem_v, mem_valid, sink_len, chunk_len, window):
    """Keys/values seen by query i, with their origin ('ctx', j) or ('mem', s, m)."""
    keys, vals, origin = [], [], []
    if i >= sink_len and mem_k is not None:
        c = (i - sink_len) // chunk_len
        for s in range(mem_k.shape[1]):
            if 0 <= c - s < window:
                for m in range(mem_k.shape[2]):
                    if mem_valid[b, s, m]:
                        keys.append(mem_k[b, s, m, kv_head]); vals.append(mem_v[b, s, m, kv_head])
                        origin.append(("mem", s, m))
    for j in range(i + 1):
        if key_valid[b, j]:
            keys.append(k[b, j, kv_head]); vals.append(v[b, j, kv_head]); origin.append(("ctx", j))
    return np.array(keys), np.array(vals), origin


def attention(q, k, v, key_valid, sink_len, chunk_len, mem_k=None, mem_v=None, mem_valid=None, window=1,
              d_out=None):
    """q: (B, T, Hq, D); k, v: (B, T, Hkv, D) of the stream [sink | context]; key_valid: (B, T);
    mem_k, mem_v: (B, C, M, Hkv, D) memories of each source chunk; mem_valid: (B, C, M).

    Returns out (B, T, Hq, D); with d_out also the gradients dict for q, k, v, mem_k, mem_v.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    if mem_k is not None:
        mem_k, mem_v = np.asarray(mem_k, np.float64), np.asarray(mem_v, np.float64)
    b_, t_, hq, d = q.shape
    group = hq // k.shape[2]
    out = np.zeros_like(q)
    grads = {n: np.zeros_like(x) for n, x in (("q", q), ("k", k), ("v", v), ("mem_k", mem_k), ("mem_v", mem_v))
             if x is not None}
    for b in range(b_):
        for h in range(hq):
            g = h // group
            for i in range(t_):
                keys, vals, origin = _row_keys(b, i, g, k, v, key_valid, mem_k, mem_v, mem_valid, sink_len,
                                               chunk_len, window)
                logits = keys @ q[b, i, h] / np.sqrt(d)
                p = np.exp(logits - logits.max())
                p /= p.sum()
                out[b, i, h] = p @ vals
                if d_out is None:
                    continue
                do = np.asarray(d_out[b, i, h], np.float64)
                dp = vals @ do
                ds = p * (dp - (p * dp).sum()) / np.sqrt(d)
                grads["q"][b, i, h] += ds @ keys
                for n, o in enumerate(origin):
                    dk, dv = ds[n] * q[b, i, h], p[n] * do
                    if o[0] == "ctx":
                        grads["k"][b, o[1], g] += dk; grads["v"][b, o[1], g] += dv
                    else:
                        grads["mem_k"][b, o[1], o[2], g] += dk; grads["mem_v"][b, o[1], o[2], g] += dv
    return out if d_out is None else (out, grads)


def token_scores(q_pre, k_pre, token_valid, combine="sum"):
    """(N, Hkv, T): sum over valid queries i and the group's heads of softmax_j over valid keys j."""
    q_pre, k_pre = np.asarray(q_pre, np.float64), np.asarray(k_pre, np.float64)
    n_, t_, hq, d = q_pre.shape
    hkv = k_pre.shape[2]
    group = hq // hkv
    scores = np.full((n_, hkv, t_), -np.inf)
    for n in range(n_):
        valid = [j for j in range(t_) if token_valid[n, j]]
        for g in range(hkv):
            per_head = np.zeros((group, t_))
            for hh in range(group):
                h = g * group + hh
                for i in valid:
                    e = np.array([np.exp(q_pre[n, i, h] @ k_pre[n, j, g] / np.sqrt(d)) for j in valid])
                    per_head[hh, valid] += e / e.sum()
            combined = per_head.sum(0) if combine == "sum" else per_head.max(0)
            scores[n, g, valid] = combined[valid]
    return scores


def top_tokens(scores, k):
    """Indices (N, Hkv, k) of the k best tokens, best first."""
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


# ---- the whole decoder ------------------------------------------------------------------------

def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x, positions, theta):
    """Rotate pairs (i, i + D/2) by angle position * theta^(-2i/D): HF Llama's rotate-half layout."""
    out = np.array(x, np.float64)
    d = x.shape[-1]
    for t, pos in enumerate(positions):
        for i in range(d // 2):
            ang = pos * theta ** (-2.0 * i / d)
            c, s = np.cos(ang), np.sin(ang)
            a, b = x[..., t, :, i], x[..., t, :, i + d // 2]
            out[..., t, :, i] = a * c - b * s
            out[..., t, :, i + d // 2] = b * c + a * s
    return out


def decoder(params, cfg, ids, positions, key_valid, sink_len, memory_layers=(), memory=None, window=1,
            capture_layers=(), stop_after=None):
    """params: dict of float64 arrays per layer (see tests/test_model.py:naive_params).

    ids: (B, T) stream ids; positions: (T,); memory: None or (mem (B, C, M, L_mem, 2, Hkv, D), valid (B, C, M)),
    read at `memory_layers` (the i-th memory layer reads mem[..., i, ...]). Returns logits of every stream
    position (B, T, V) and, per layer in capture_layers, (q_pre, k_pre, k_rot, v).
    """
    m = cfg.model
    h = params["embed"][ids]
    captured = {}
    for layer in range(m.num_layers):
        p = params["layers"][layer]
        x = rms_norm(h, p["input_norm"], m.norm_eps)
        q = np.einsum("btd,dhk->bthk", x, p["q"])
        k = np.einsum("btd,dhk->bthk", x, p["k"])
        v = np.einsum("btd,dhk->bthk", x, p["v"])
        q_rot, k_rot = rope(q, positions, m.rope_theta), rope(k, positions, m.rope_theta)
        if layer in capture_layers:
            captured[layer] = (q, k, k_rot, v)
        mem_args = {}
        if memory is not None and layer in memory_layers:
            mem, valid = memory
            li = list(memory_layers).index(layer)
            mem_args = dict(mem_k=mem[:, :, :, li, 0], mem_v=mem[:, :, :, li, 1], mem_valid=valid, window=window)
        a = attention(q_rot, k_rot, v, key_valid, sink_len, cfg.memory.chunk_len, **mem_args)
        h = h + np.einsum("bthk,hkd->btd", a, p["o"])
        x = rms_norm(h, p["post_norm"], m.norm_eps)
        gate, up = x @ p["gate"], x @ p["up"]
        h = h + (gate / (1 + np.exp(-gate)) * up) @ p["down"]
        if stop_after is not None and layer == stop_after:
            return None, captured
    logits = rms_norm(h, params["norm"], m.norm_eps) @ params["head"]
    return logits, captured
