"""AdamW with a warmup-stable-decay schedule, global-norm clipping and a weight-decay mask (SPEC 5)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def wsd_schedule(peak: float, total_steps: int, warmup_steps: int, decay_fraction: float, min_ratio: float):
    """Linear warmup to `peak`, constant, then linear decay to `min_ratio * peak` over the last
    `decay_fraction` of the steps (the warmup-stable-decay shape read off the paper's plots)."""
    decay_steps = max(int(total_steps * decay_fraction), 1)
    stable_steps = max(total_steps - warmup_steps - decay_steps, 0)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup_steps, 1)),
         optax.constant_schedule(peak),
         optax.linear_schedule(peak, peak * min_ratio, decay_steps)],
        boundaries=[max(warmup_steps, 1), max(warmup_steps, 1) + stable_steps])


def decay_mask(params, decay_norms_and_embeddings: bool = False):
    """True where weight decay applies: matrices of layers; norms and embeddings only if configured."""
    def keep(path, leaf):
        if decay_norms_and_embeddings:
            return True
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return not any(n in ("embed_tokens", "lm_head") or n.endswith("norm") or n == "norm" for n in names)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(train_cfg, params):
    t = train_cfg
    schedule = wsd_schedule(t.lr, t.steps, t.warmup_steps, t.decay_fraction, t.min_lr_ratio)
    tx = optax.chain(
        optax.clip_by_global_norm(t.clip_norm),
        optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                    mask=decay_mask(params, t.decay_norms_and_embeddings), mu_dtype=jnp.float32))
    return tx, schedule
