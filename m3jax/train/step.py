"""The train step of both stages, with gradient accumulation, and its sharded jit.

Stage 1 (warmup) is plain causal LM. Stage 2 (continual train) encodes the batch's references with the
*current* weights through the memory layers inside the step (SPEC 5: one reference per chunk, chunk c
reads the memories of chunks c-4..c), then trains with memory attention; `grad_through_references`
decides whether gradients also flow through that encoding. The loss is a token-weighted mean over the
whole batch: micro-batches sum losses and gradients, then divide once by the token count.
A step whose loss or gradient norm is not finite leaves parameters and optimizer state unchanged and
reports `ok = False`, so the caller can stop with the last good state intact.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from m3jax import sharding
from m3jax.model.lm import MemoryInputs
from m3jax.train.loss import lm_loss


def batch_memory(model, ref_tokens, ref_lengths, window: int, grad_through: bool) -> MemoryInputs:
    """ref_tokens (B, C, L), ref_lengths (B, C) (0: no reference) -> MemoryInputs with one memory per chunk."""
    b, c, length = ref_tokens.shape
    lengths = ref_lengths.reshape(-1)
    memories, valid = model.encode_references(ref_tokens.reshape(b * c, length), jnp.maximum(lengths, 1))
    if not grad_through:
        memories = jax.lax.stop_gradient(memories)
    valid = valid & (lengths > 0)[:, None]
    return MemoryInputs(memories.reshape(b, c, 1, *memories.shape[1:]), valid.reshape(b, c, 1, -1), window)


def loss_terms(params, graphdef, batch, stage: int, grad_through: bool, window: int):
    """(sum of token losses, token count) of one (micro-)batch."""
    model = nnx.merge(graphdef, params)
    memory = None
    if stage == 2:
        memory = batch_memory(model, batch["ref_tokens"], batch["ref_lengths"], window, grad_through)
    return lm_loss(model(batch["tokens"], memory=memory), batch["tokens"], batch.get("padding_mask"))


def train_step(state, batch, *, graphdef, tx, schedule, stage: int, accum: int, grad_through: bool, window: int):
    """state: {"step", "params", "opt_state"}; batch: arrays with the global batch first."""
    params = state["params"]
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
    grad_fn = jax.value_and_grad(loss_terms, has_aux=True)

    def accumulate(carry, mb):
        grads, total, count = carry
        (t, n), g = grad_fn(params, graphdef, mb, stage, grad_through, window)
        return (jax.tree.map(jnp.add, grads, g), total + t, count + n), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, total, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), micro)
    grads = jax.tree.map(lambda g: g / count, grads)
    loss, grad_norm = total / count, optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    new_state = {"step": state["step"] + ok.astype(jnp.int32), "params": keep(new_params, params),
                 "opt_state": keep(opt_state, state["opt_state"])}
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]), "tokens": count, "ok": ok}
    return new_state, metrics


def state_shardings(mesh, params, tx, rules=sharding.DEFAULT_RULES):
    """NamedShardings of the train state: parameters by the logical rules, optimizer moments like the
    parameter they belong to (optax nests them under the same tree path), scalars replicated."""
    with sharding.activate(mesh, rules):
        specs = nnx.get_partition_spec(params)
    param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    by_path = {tuple(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_sh)[0]}
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())

    def like_param(path, _):
        path = tuple(path)
        return next((by_path[path[n:]] for n in range(len(path)) if path[n:] in by_path), replicated)

    opt_sh = jax.tree_util.tree_map_with_path(like_param, jax.eval_shape(tx.init, params))
    return {"step": replicated, "params": param_sh, "opt_state": opt_sh}


def make_train_step(cfg, graphdef, params, tx, schedule, mesh):
    """Jit the step with explicit shardings over `mesh`; the state is donated."""
    t = cfg.train
    stage = 2 if t.stage == 2 and t.stage2_memory else 1  # what the step computes: with memory or not
    step = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule, stage=stage,
                             accum=t.accum_steps, grad_through=cfg.memory.grad_through_references,
                             window=cfg.memory.train_window)
    rules = sharding.rules_with(t.sharding_rules)
    state_sh = state_shardings(mesh, params, tx, rules)
    batch_sh = NamedSharding(mesh, sharding.logical_to_spec(("act_batch",), rules))
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())

    def constrained(state, batch):  # traced inside the mesh context: activation constraints apply
        with sharding.constraints(mesh, rules):
            return step(state, batch)

    return jax.jit(constrained, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                   donate_argnums=0), state_sh, batch_sh
