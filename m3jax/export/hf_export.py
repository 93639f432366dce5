"""`m3jax export`: a Memory3 -> an HF Llama directory, plus the PyTorch Memory3 code and optionally a bank.

The directory holds:
    config.json            LlamaConfig fields + `m3jax_*` keys + `auto_map` (see hf_config.py)
    model.safetensors      HF Llama tensor names, (out, in) weights, one tensor per layer
    configuration_memory3.py, modeling_memory3.py, bank_memory3.py   the PyTorch Memory3 (trust_remote_code)
    memory_bank/           with --bank: the bank as safetensors shards + manifest.json
It is written into `<out>.partial` and renamed into place at the end.
"""
from __future__ import annotations

import json
import pathlib
import shutil

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from m3jax.export.hf_config import hf_config
from m3jax.export.outdir import atomic_out_dir
from m3jax.export.weights import hf_tensors
from m3jax.memory.fingerprint import weights_fingerprint

TORCH_FILES = ("configuration_memory3.py", "modeling_memory3.py", "bank_memory3.py")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def export_model(model, out, *, bank: str | None = None, overwrite: bool = False, dtype: str | None = None,
                 bank_shard_refs: int = 1024) -> pathlib.Path:
    """Write `model` (a Memory3) as an HF directory at `out`; `dtype` defaults to the parameter dtype."""
    from m3jax.export.bank import export_bank

    cfg = model.cfg
    dtype = dtype or cfg.model.param_dtype
    if dtype not in DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    fingerprint = weights_fingerprint(model)
    with atomic_out_dir(out, overwrite) as tmp:
        save_file(hf_tensors(model, DTYPES[dtype]), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, fingerprint=fingerprint, dtype=dtype), indent=2))
        here = pathlib.Path(__file__).parent
        for name in TORCH_FILES:
            shutil.copyfile(here / name, tmp / name)
        if bank is not None:
            (tmp / "memory_bank").mkdir()
            export_bank(bank, tmp / "memory_bank", fingerprint=fingerprint, shard_refs=bank_shard_refs)
    return pathlib.Path(out)
