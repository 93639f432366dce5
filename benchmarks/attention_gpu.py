"""GPU check of memory attention: the cuDNN path against the exact f32 path (values and gradients), and
what the Memory3 mask costs, at one memory layer of Memory3-2.4B (40/8 heads of dim 80, 2048 context
tokens, 32 chunks x 5 memories x 8 tokens = 1280 memory keys per KV head).

    python benchmarks/attention_gpu.py [--batch 4] [--model small] [--skip_model]

Two memory layouts: inference (5 references x 8 tokens per chunk, window 1) and stage-2 training (1
reference x 8 tokens per chunk, window 5); `cudnn_split` is the causal kernel plus an exact per-chunk
memory part merged by log-sum-exp (m3jax/model/split_attention.py).

Prints a table; numbers go to benchmarks/RESULTS.md with the device and date.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.model.attention import attend
from m3jax.model.masks import context_mask
from timing import median_seconds  # benchmarks/, beside this script


def timed(fn, *args, reps=20):
    """Milliseconds per call (median)."""
    return median_seconds(fn, *args, reps=reps) * 1e3


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def layer_inputs(batch, seed=0, t=2048, sink=4, hq=40, hkv=8, d=80, chunks=32, slots=40, window=1):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, sink + t, hq, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, sink + t + chunks * slots, hkv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, sink + t + chunks * slots, hkv, d), jnp.bfloat16)
    valid = jax.random.uniform(keys[3], (batch, chunks * slots)) < 0.9
    padding = jnp.ones((batch, t), bool)
    mem_mask = context_mask(padding, sink, 64, (np.repeat(np.arange(chunks), slots), valid, window))
    plain_mask = context_mask(padding, sink, 64)
    return q, k, v, mem_mask, plain_mask, chunks * slots


def attention_report(batch, slots=40, window=1):
    q, k, v, mem_mask, plain_mask, nm = layer_inputs(batch, slots=slots, window=window)
    d_out = jax.random.normal(jax.random.key(9), q.shape, jnp.bfloat16)

    def grads(impl, q, k, v, mask):
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask, impl), q, k, v)
        return (out, *vjp(d_out.astype(out.dtype)))

    ref = jax.jit(grads, static_argnums=0)("exact", *(x.astype(jnp.float32) for x in (q, k, v)), mem_mask)
    errors = {}
    for impl in ("cudnn", "cudnn_split"):
        got = jax.jit(grads, static_argnums=0)(impl, q, k, v, mem_mask)
        errors.update({f"{impl} {name}": rel(g, r) for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref)})

    def step(impl, mask, q, k, v):
        return jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, mask, impl).astype(jnp.float32) * d_out))(q, k, v)

    ctx_k, ctx_v = k[:, nm:], v[:, nm:]
    causal = jax.jit(lambda q, k, v: jax.grad(lambda q, k, v: jnp.sum(
        jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn").astype(jnp.float32)
        * d_out))(q, k, v))
    rows = {
        "cudnn is_causal, no memory": timed(causal, q, ctx_k, ctx_v),
        "cudnn dense mask, no memory": timed(jax.jit(lambda *a: step("cudnn", plain_mask, *a)), q, ctx_k, ctx_v),
        "cudnn dense mask, with memory": timed(jax.jit(lambda *a: step("cudnn", mem_mask, *a)), q, k, v),
        "cudnn_split, with memory": timed(jax.jit(lambda *a: step("cudnn_split", mem_mask, *a)), q, k, v),
        "xla, with memory": timed(jax.jit(lambda *a: step("xla", mem_mask, *a)), q, k, v),
        "exact (einsum), with memory": timed(jax.jit(lambda *a: step("exact", mem_mask, *a)), q, k, v),
    }
    return errors, rows


def model_report(name, batch):
    from flax import nnx

    from m3jax import config as config_lib
    from m3jax.model.lm import Memory3, MemoryInputs

    out = {}
    tokens = None
    for impl in ("exact", "cudnn"):
        cfg = config_lib.load(name, {"model.attention": impl, "model.dtype": "bfloat16"})
        graphdef, state = nnx.split(Memory3(cfg, rngs=nnx.Rngs(0)))
        m, mem = cfg.model, cfg.memory
        t, chunks = cfg.data.seq_len, cfg.data.seq_len // mem.chunk_len
        rng = np.random.default_rng(0)
        tokens = jnp.asarray(rng.integers(0, m.vocab_size, (batch, t)))
        kv = jnp.asarray(rng.normal(size=(batch, chunks, mem.refs_per_chunk, mem.num_layers, 2, m.num_kv_heads,
                                          mem.tokens_per_head, m.head_dim)), jnp.bfloat16)
        memory = MemoryInputs(kv, jnp.ones(kv.shape[:3] + kv.shape[6:7], bool))

        def loss(state, memory):
            logits = nnx.merge(graphdef, state)(tokens, memory=memory)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

        fwd = jax.jit(lambda s, mmr: nnx.merge(graphdef, s)(tokens, memory=mmr))
        out[impl] = np.asarray(fwd(state, memory))
        if impl == "cudnn":
            step = jax.jit(jax.value_and_grad(loss))
            out["step_ms_no_memory"] = timed(step, state, None, reps=10)
            out["step_ms_memory"] = timed(step, state, memory, reps=10)
            out["tokens"] = batch * t
    return {"logits_rel_err_cudnn_vs_exact": rel(out["cudnn"], out["exact"]),
            "train_step_ms_no_memory": out["step_ms_no_memory"], "train_step_ms_memory": out["step_ms_memory"],
            "tokens_per_step": out["tokens"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--model", default="small")
    parser.add_argument("--model-batch", type=int, default=8)
    parser.add_argument("--skip_model", action="store_true")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, devices {jax.devices()}")
    for label, slots, window in (("inference: 5 references per chunk, window 1", 40, 1),
                                 ("stage 2: 1 reference per chunk, window 5", 8, 5)):
        errors, rows = attention_report(args.batch, slots, window)
        print(f"\n{label}; bf16 vs exact (f32), batch {args.batch}: "
              + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
        print(f"one memory layer of m3_2p4b, forward+backward, batch {args.batch}, 2048 tokens, {32 * slots} "
              "memory keys:")
        for name, ms in rows.items():
            print(f"  {name:34s} {ms:8.2f} ms", flush=True)
    if args.skip_model:
        return
    model = model_report(args.model, args.model_batch)
    print(f"\nmodel {args.model}, bf16, batch {args.model_batch}: " + json.dumps(model))


if __name__ == "__main__":
    main()
