"""Next-token cross entropy in f32, weighted by tokens (padding and the last position carry no weight)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def lm_loss(logits, tokens, padding_mask=None):
    """logits: (B, T, V) where logits[:, t] predicts tokens[:, t+1]. Returns (sum of losses, token count)."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    weights = jnp.ones(targets.shape, jnp.float32) if padding_mask is None else padding_mask[:, 1:].astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((logz - picked) * weights), jnp.sum(weights)
