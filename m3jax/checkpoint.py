"""Model weights on disk (orbax), and `--checkpoint=random[:SEED]` for random weights.

Restoring goes against the abstract model (`nnx.eval_shape`), so no weights are initialised just to be
overwritten. The training issue adds the CheckpointManager (steps, optimizer state, resume) on top.
"""
from __future__ import annotations

import pathlib

import orbax.checkpoint as ocp
from flax import nnx

from m3jax.model.lm import Memory3


def save_model(path, model) -> pathlib.Path:
    path = pathlib.Path(path).absolute()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, nnx.state(model, nnx.Param))
    return path


def load_model(cfg, checkpoint: str) -> Memory3:
    """`random` / `random:SEED`: fresh weights; a training run directory (`m3jax train --workdir`): its last
    checkpoint; otherwise a directory written by `save_model`."""
    if checkpoint == "random" or checkpoint.startswith("random:"):
        seed = int(checkpoint.partition(":")[2] or 0)
        return Memory3(cfg, rngs=nnx.Rngs(seed))
    path = pathlib.Path(checkpoint).absolute()
    if not path.exists():
        raise ValueError(f"no checkpoint at {checkpoint} (use --checkpoint=random for random weights)")
    if (path / "checkpoints").is_dir():
        from m3jax.train.loop import restore_params

        return nnx.merge(*restore_params(cfg, path))
    graphdef, abstract, rest = nnx.split(nnx.eval_shape(lambda: Memory3(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            params = ckptr.restore(path, abstract)
        except (ValueError, KeyError) as e:
            raise ValueError(f"checkpoint {checkpoint} does not fit config {cfg.name}: {e}") from None
    return nnx.merge(graphdef, params, rest)
