"""Are the serial products (m3jax/model/decode_serial.py) right on the GPU, and the same every run?

    python benchmarks/decode_serial_gpu.py [--config m3_2p4b] [--batch 32] [--steps 16] [--repeats 20]

Random weights of the config's shape, bf16. After one prefill, `--steps` decoding steps run with
`decode_matmul="serial"` and with "pallas" (the split-K kernel with separate norm / SiLU kernels) from the
same cache and tokens (the "pallas" run's tokens fed to both): reports the logits' largest difference
relative to their scale, and how often the two pick the same next token. Then the first serial step is
run `--repeats` times on the same inputs: the serial kernels' last-arriving program sums partial
products other programs wrote, so a missing memory ordering would show as outputs that differ between
runs (they must be bit-identical).
"""
from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3jax import config as config_lib
from m3jax.checkpoint import load_model
from m3jax.generate.generator import cache_len, kernels_as


def decoder(config: str, impl: str):
    cfg = config_lib.load(config, {"model.dtype": "bfloat16", "model.param_dtype": "bfloat16",
                                   "model.decode_matmul": impl})
    model = load_model(cfg, "random:0")
    graphdef, state = nnx.split(model)
    state = kernels_as(state, jnp.bfloat16)
    layer_states = [seg.layer_states(state["layers"][i]["blocks"]) for i, seg in enumerate(model.layers)]
    return cfg, graphdef, state, layer_states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="m3_2p4b")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    prompt_len = 128
    runs = {}
    for impl in ("pallas", "serial"):
        cfg, graphdef, state, layer_states = decoder(args.config, impl)

        @functools.partial(jax.jit, static_argnames="positions")
        def prefill(state, layer_states, tokens, positions):
            model = nnx.merge(graphdef, state)
            lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
            return model.prefill(tokens, cache_len=positions, logits_at=lengths - 1, layer_states=layer_states)

        @jax.jit
        def step(state, layer_states, token, write_at, cache):
            return nnx.merge(graphdef, state).decode_step(token, write_at, cache, None, layer_states)

        tokens = jnp.asarray(np.random.default_rng(0).integers(5, 500, (args.batch, prompt_len)), jnp.int32)
        logits, cache = prefill(state, layer_states, tokens, cache_len(cfg, prompt_len, args.steps + 8))
        token = jnp.argmax(logits[:, :cfg.model.vocab_size], -1).astype(jnp.int32)
        write_at = jnp.full((args.batch,), prompt_len + config_lib.sink_len(cfg), jnp.int32)
        feed = runs.get("pallas", {}).get("tokens")
        out, fed = [], []
        for s in range(args.steps):
            if feed is not None:
                token = feed[s]
            fed.append(token)
            step_logits, cache = step(state, layer_states, token, write_at, cache)
            out.append(np.asarray(step_logits[:, :cfg.model.vocab_size], np.float32))
            token, write_at = jnp.argmax(step_logits[:, :cfg.model.vocab_size], -1).astype(jnp.int32), write_at + 1
        runs[impl] = {"logits": out, "tokens": fed}
        if impl == "serial":
            _, cache0 = prefill(state, layer_states, tokens, cache_len(cfg, prompt_len, args.steps + 8))
            write0 = jnp.full((args.batch,), prompt_len + config_lib.sink_len(cfg), jnp.int32)
            first = [np.asarray(step(state, layer_states, fed[0], write0, jax.tree.map(jnp.copy, cache0))[0])
                     for _ in range(args.repeats)]
            runs["repeat_identical"] = all(np.array_equal(first[0], f) for f in first[1:])
        del state, layer_states
    a, b = np.stack(runs["pallas"]["logits"]), np.stack(runs["serial"]["logits"])
    result = {"config": args.config, "batch": args.batch, "steps": args.steps,
              "max_diff_over_scale": float(np.abs(a - b).max() / np.abs(a).max()),
              "mean_abs_diff": float(np.abs(a - b).mean()), "logit_scale": float(np.abs(a).max()),
              "same_next_token": float(np.mean(a.argmax(-1) == b.argmax(-1))),
              "repeats": args.repeats, "serial_repeats_bit_identical": runs["repeat_identical"],
              "device": jax.devices()[0].device_kind, "jax": jax.__version__}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
