"""Next-token choice: greedy, temperature, and top-p (nucleus) sampling."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def check_sampling(temperature: float, top_p: float) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def next_token(logits, key, vocab_size: int, temperature: float, top_p: float):
    """logits (B, padded_vocab) f32 -> (B,) int32. Rows past `vocab_size` (embedding padding) never win."""
    logits = logits[:, :vocab_size]
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1:
        # Keep the smallest set of most likely tokens whose probability reaches top_p (at least one).
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of strictly more likely tokens
        kept = jnp.sum(before < top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(sorted_logits, kept - 1, axis=-1)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
