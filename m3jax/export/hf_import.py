"""`m3jax import`: an HF Llama directory (config.json + safetensors) -> an m3jax config and weights.

The output directory holds:
    m3jax_config.json      the m3jax config (from `m3jax_config` if m3jax exported the checkpoint)
    config.py              `get_config()` reading it, so `--config=<out>/config.py` works
    params/                the weights, written by m3jax.checkpoint.save_model
Use them as `m3jax <command> --config=<out>/config.py --checkpoint=<out>/params`.
"""
from __future__ import annotations

import json
import pathlib

from flax import nnx
from safetensors.numpy import load_file

from m3jax import config as config_lib
from m3jax.checkpoint import save_model
from m3jax.export.hf_config import config_from_hf
from m3jax.export.outdir import atomic_out_dir, check_out_dir
from m3jax.export.weights import load_hf_tensors
from m3jax.model.lm import Memory3

CONFIG_PY = '''"""m3jax config of a model imported from an HF checkpoint (`m3jax import`)."""
import json
import pathlib

from m3jax.export.hf_config import config_from_dict


def get_config():
    return config_from_dict(json.loads(pathlib.Path(__file__).with_name("m3jax_config.json").read_text()))
'''


def read_hf_dir(hf_dir) -> tuple[dict, dict]:
    """(config.json as a dict, {name: NumPy array}) of an HF checkpoint: one model.safetensors or an index."""
    hf_dir = pathlib.Path(hf_dir)
    if not hf_dir.is_dir():
        raise ValueError(f"--hf={hf_dir}: no such directory")
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{hf_dir} has no config.json (not an HF checkpoint directory)")
    try:
        hf = json.loads(config_file.read_text())
    except ValueError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from None
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{hf_dir} has no model.safetensors (nor model.safetensors.index.json); "
                         "PyTorch .bin checkpoints are not read: re-save with safe_serialization=True")
    tensors = {}
    for name in files:
        tensors.update(load_file(str(hf_dir / name)))
    return hf, tensors


def model_from_hf(hf_dir):
    """(cfg, Memory3) from an HF Llama directory, without initialising weights first."""
    hf, tensors = read_hf_dir(hf_dir)
    cfg = config_from_hf(hf, name=f"imported:{pathlib.Path(hf_dir).name}")
    abstract = nnx.eval_shape(lambda: Memory3(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = load_hf_tensors(abstract, tensors)
    return cfg, nnx.merge(graphdef, params, rest)


def import_hf(hf_dir, out, *, overwrite: bool = False):
    """Write the m3jax config and weights of an HF Llama directory into `out`; return (cfg, model, out)."""
    check_out_dir(out, overwrite)  # before the (possibly long) read
    cfg, model = model_from_hf(hf_dir)
    with atomic_out_dir(out, overwrite) as tmp:
        (tmp / "m3jax_config.json").write_text(config_lib.to_json(cfg))
        (tmp / "config.py").write_text(CONFIG_PY)
        save_model(tmp / "params", model)
    return cfg, model, pathlib.Path(out)
