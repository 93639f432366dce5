"""`m3jax train`: both pretraining stages over prepared data, with exact resume.

Stage 1 trains on `train_tokens`. Stage 2 starts from a stage-1 checkpoint (same model config, or it
refuses) and trains on `continual_tokens`, each chunk's reference tokens gathered on the host from
the prepared `continual_ref_ids` and encoded inside the step. Checkpoints (orbax, async) hold the whole
train state; the loader is a pure function of (seed, step), so a run killed at any point and resumed
from its last checkpoint reaches the same parameters as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from m3jax import config as config_lib
from m3jax import sharding
from m3jax.data.loader import StepLoader, gather_references
from m3jax.data.prepare import open_prepared
from m3jax.model.lm import Memory3
from m3jax.train.metrics import MetricsLogger
from m3jax.train.optimizer import make_optimizer
from m3jax.train.step import make_train_step


class TrainingDiverged(RuntimeError):
    pass


def _check_data(cfg, meta) -> None:
    problems = []
    if meta["seq_len"] != cfg.data.seq_len:
        problems.append(f"sequences of {meta['seq_len']} tokens, config data.seq_len={cfg.data.seq_len}")
    if meta["chunk_len"] != cfg.memory.chunk_len:
        problems.append(f"chunks of {meta['chunk_len']}, config memory.chunk_len={cfg.memory.chunk_len}")
    if meta["vocab_size"] > cfg.model.vocab_size:
        problems.append(f"vocabulary of {meta['vocab_size']}, config model.vocab_size={cfg.model.vocab_size}")
    if tuple(meta["reference_prefix_ids"]) != tuple(cfg.memory.reference_prefix_ids):
        problems.append(f"reference prefix {meta['reference_prefix_ids']}, config {cfg.memory.reference_prefix_ids}")
    if problems:
        raise ValueError("the prepared data does not fit the config: " + "; ".join(problems))


def _setup(cfg):
    """Abstract model and train state (with shardings), optimizer and jitted step on this host's mesh.

    Nothing is initialised here: `_init_state` builds the real state by a jitted init whose outputs are
    already sharded, so no device ever holds the whole model unsharded.
    """
    t = cfg.train
    mesh = sharding.make_mesh(tuple(t.mesh))
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Memory3(cfg, rngs=nnx.Rngs(t.seed))))
    tx, schedule = make_optimizer(t, params)
    step_fn, state_sh, batch_sh = make_train_step(cfg, graphdef, params, tx, schedule, mesh)
    shapes = jax.eval_shape(lambda: {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)})
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, state_sh)
    return graphdef, tx, step_fn, state_sh, batch_sh, abstract


def _init_state(cfg, tx, state_sh, params=None):
    def init(params):
        if params is None:
            params = nnx.state(Memory3(cfg, rngs=nnx.Rngs(cfg.train.seed)))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    return jax.jit(init, out_shardings=state_sh)(params)


def restore_params(cfg, run_dir, abstract_state=None):
    """(graphdef, parameters) of the last checkpoint of the training run in `run_dir`; refused if that run
    trained another model than `cfg` describes."""
    run_dir = pathlib.Path(run_dir).absolute()
    if not (run_dir / "config.json").is_file():
        raise ValueError(f"{run_dir} is not a training run (no config.json)")
    saved = json.loads((run_dir / "config.json").read_text())
    ours = json.loads(config_lib.to_json(cfg))
    layout = ("layer_start", "num_layers", "reference_prefix_ids", "reference_len", "tokens_per_head")
    how = ("attention", "decode_matmul", "decode_attention", "remat", "scan_layers")  # how to compute, not what: may change

    def what(model: dict) -> dict:
        return {k: v for k, v in model.items() if k not in how}

    if what(saved["model"]) != what(ours["model"]) or any(saved["memory"][k] != ours["memory"][k] for k in layout):
        raise ValueError(f"the run in {run_dir} trained another model (model config differs); stage 2 must "
                         "continue the same model")
    graphdef, *_, abstract = _setup(cfg)
    abstract = abstract_state if abstract_state is not None else abstract
    with ocp.CheckpointManager(run_dir / "checkpoints") as mngr:
        step = mngr.latest_step()
        if step is None:
            raise ValueError(f"no checkpoint in {run_dir / 'checkpoints'}")
        return graphdef, mngr.restore(step, args=ocp.args.StandardRestore(abstract))["params"]


def _batches(cfg, arrays):
    """The loader of this stage and a function turning its rows into a model batch."""
    t = cfg.train
    if t.stage == 1:
        loader = StepLoader({"tokens": arrays["train_tokens"]}, t.batch_size, seed=t.seed,
                            process_index=jax.process_index(), process_count=jax.process_count())
        return loader, lambda rows: {"tokens": rows["tokens"].astype(np.int32)}
    loader = StepLoader({"tokens": arrays["continual_tokens"], "ref_ids": arrays["continual_ref_ids"]}, t.batch_size,
                        seed=t.seed, process_index=jax.process_index(), process_count=jax.process_count())
    ref_tokens, ref_lengths = np.asarray(arrays["ref_tokens"]), np.asarray(arrays["ref_lengths"])

    def to_batch(rows):
        tokens, lengths = gather_references(ref_tokens, ref_lengths, rows["ref_ids"])
        return {"tokens": rows["tokens"].astype(np.int32), "ref_tokens": tokens, "ref_lengths": lengths}
    return loader, to_batch


def train(cfg, data_dir, workdir, *, init_from=None, progress=True, log_every=10, checkpoint_every=100,
          keep=3, milestone_every=None) -> dict:
    config_lib.validate(cfg)
    t = cfg.train
    meta, arrays = open_prepared(data_dir)
    _check_data(cfg, meta)
    if t.stage == 2 and init_from is None:
        raise ValueError("stage 2 starts from a stage-1 checkpoint: pass its run directory (--init_from), or "
                         "--init_from=random to train with memory from scratch")
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    config_lib.save_resolved(cfg, workdir)

    graphdef, tx, step_fn, state_sh, batch_sh, abstract = _setup(cfg)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=milestone_every,
                                           enable_async_checkpointing=True)
    mngr = ocp.CheckpointManager(workdir / "checkpoints", options=options)
    start = mngr.latest_step()
    if start is not None:  # resume: the whole state, placed by its shardings
        state = mngr.restore(start, args=ocp.args.StandardRestore(abstract))
    else:
        from_run = t.stage == 2 and init_from != "random"  # `random`: memory from the start (an ablation)
        params = restore_params(cfg, init_from, abstract)[1] if from_run else None
        state = _init_state(cfg, tx, state_sh, params)
        start = 0
    loader, to_batch = _batches(cfg, arrays)
    logger = MetricsLogger(workdir, cfg, log_every)
    bar = tqdm(total=t.steps, initial=start, unit="step", disable=not progress, desc=f"stage {t.stage}")
    metrics = {}
    for step in range(start, t.steps):
        batch = jax.make_array_from_process_local_data(batch_sh, to_batch(loader.batch(step + t.data_start_step))) \
            if jax.process_count() > 1 else jax.device_put(to_batch(loader.batch(step + t.data_start_step)), batch_sh)
        state, metrics = step_fn(state, batch)
        metrics = jax.device_get(metrics)
        if not metrics["ok"]:
            mngr.wait_until_finished()
            raise TrainingDiverged(f"step {step}: loss {metrics['loss']}, gradient norm {metrics['grad_norm']}; "
                                   f"stopped; the last good checkpoint is step {mngr.latest_step()} in "
                                   f"{workdir / 'checkpoints'}")
        done = step + 1
        logger.step(done, metrics)
        bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
        if done % checkpoint_every == 0 or done == t.steps or mngr.reached_preemption(done):
            mngr.save(done, args=ocp.args.StandardSave(state))
            if mngr.reached_preemption(done):
                break
        bar.update(1)
        _crash_point(done)
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    logger.close()
    return {"step": int(state["step"]), "loss": float(metrics.get("loss", np.nan)), "workdir": str(workdir),
            "params": state["params"]}


def _crash_point(step: int) -> None:
    """Fault injection for the resume test: M3JAX_KILL_AT_STEP=<n> kills the process after step n."""
    if os.environ.get("M3JAX_KILL_AT_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
