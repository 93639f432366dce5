"""Where the time of memory writing goes: encoding throughput of one config under variants.

    python benchmarks/write_variants_gpu.py --config m3_2p4b

Variants change one thing each against the default (batch 512): batch size, no remat wrapper,
bf16 parameters (no per-call cast), token selection replaced by "first k tokens" (its cost), and
two other formulations of the selection scores.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import m3jax.model.sparsify as sparsify
import m3jax.model.transformer as transformer
from m3jax import config as config_lib
from m3jax.checkpoint import load_model
from m3jax.memory.write import MemoryWriter


def first_tokens(q_pre, k_pre, k_rot, v, token_valid, top_k, combine="sum"):
    take = lambda x: jnp.swapaxes(x, 1, 2)[:, :, -top_k:]  # noqa: E731 - same shapes, no scoring
    return take(k_rot), take(v)


def softmax_scores(q_pre, k_pre, token_valid, combine="sum"):
    """The first formulation (jax.nn.softmax, then mask and sum), kept to compare against."""
    n, t, hq, d = q_pre.shape
    qg = q_pre.reshape(n, t, k_pre.shape[2], hq // k_pre.shape[2], d)
    logits = jnp.einsum("nihgd,njhd->nhgij", qg, k_pre, preferred_element_type=jnp.float32) * d ** -0.5
    key_ok = token_valid[:, None, None, None, :]
    probs = jax.nn.softmax(jnp.where(key_ok, logits, -jnp.inf), axis=-1)
    probs = jnp.where(token_valid[:, None, None, :, None] & key_ok, probs, 0.0)
    return jnp.where(token_valid[:, None, :], probs.sum(axis=3).sum(axis=2), -jnp.inf)


def bf16_logit_scores(q_pre, k_pre, token_valid, combine="sum"):
    """Logits materialised in bf16 (half the bytes); softmax still in f32."""
    n, t, hq, d = q_pre.shape
    qg = q_pre.reshape(n, t, k_pre.shape[2], hq // k_pre.shape[2], d)
    logits = jnp.einsum("nihgd,njhd->nhgij", qg, k_pre).astype(jnp.float32) * d ** -0.5
    logits = jnp.where(token_valid[:, None, None, None, :], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    ok = token_valid[:, None, None, :, None]
    s = jnp.sum(jnp.where(ok, jnp.exp(logits - jnp.where(ok, lse, 0.0)), 0.0), axis=3).sum(axis=2)
    return jnp.where(token_valid[:, None, :], s, -jnp.inf)


def rate(cfg, batch, reps=4):
    model = load_model(cfg, "random:0")
    rng = np.random.default_rng(0)
    n = batch * (reps + 1)
    tokens = rng.integers(4, cfg.model.vocab_size, (n, cfg.memory.reference_len)).astype(np.int32)
    lengths = np.full(n, cfg.memory.reference_len, np.int32)
    writer = MemoryWriter(model, batch)
    writer.fetch(writer.dispatch(tokens[:batch], lengths[:batch]))  # compile
    start = time.perf_counter()
    out = [writer.dispatch(tokens[(i + 1) * batch:(i + 2) * batch], lengths[(i + 1) * batch:(i + 2) * batch])
           for i in range(reps)]
    jax.block_until_ready(out)
    device_only = reps * batch / (time.perf_counter() - start)
    return device_only


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="m3_2p4b")
    args = parser.parse_args()
    base = {"model.dtype": "bfloat16"}
    variants = [("default, batch 512", {}, 512, None), ("batch 256", {}, 256, None),
                ("batch 1024", {}, 1024, None), ("remat none", {"model.remat": "none"}, 512, None),
                ("bf16 parameters", {"model.param_dtype": "bfloat16"}, 512, None),
                ("no token selection", {}, 512, "none"), ("selection: jax.nn.softmax form", {}, 512, "softmax"),
                ("selection: bf16 logits", {}, 512, "bf16")]
    print(f"jax {jax.__version__}, {jax.devices()}\n\n| variant | refs/s (device, back to back) |\n|---|---|")
    original_select, original_scores = transformer.select_tokens, sparsify.token_scores
    for name, overrides, batch, selection in variants:
        transformer.select_tokens = first_tokens if selection == "none" else original_select
        sparsify.token_scores = {"softmax": softmax_scores, "bf16": bf16_logit_scores}.get(selection, original_scores)
        r = rate(config_lib.load(args.config, {**base, **overrides}), batch)
        print(f"| {name} | {r:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
