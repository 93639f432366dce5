"""PyTorch export / import (m3jax.export) against Hugging Face's own Llama code as the independent reference.

- a plain `LlamaForCausalLM` loaded from an export, fed the sink and Memory3's positions, gives our logits;
- `Memory3ForCausalLM` (trust_remote_code) with memories gives our logits with memory, and writes the
  same memories as `write_memories`;
- a foreign Llama (built and saved by transformers) imported into m3jax gives HF's logits;
- bank export, export -> import round trip, and refusals of bad input (functions and the CLI).
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from m3jax import config
from m3jax.checkpoint import load_model
from m3jax.export.hf_export import export_model
from m3jax.export.hf_import import import_hf, model_from_hf
from m3jax.memory.bank import BankMismatchError, MemoryBank, reference_hashes
from m3jax.memory.fingerprint import weights_fingerprint
from m3jax.memory.write import write_memories
from m3jax.model.lm import Memory3, MemoryInputs

REPO = pathlib.Path(__file__).resolve().parent.parent


def tiny(**overrides):
    return config.load("tiny", {"model.dtype": "float32", "model.param_dtype": "float32", **overrides})


def assert_close(ours, theirs, rtol=1e-4):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert err <= rtol, f"relative error {err:.2e} > {rtol}"


def rel_diff(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max()


def hf_stream_logits(hf_model, tokens, sink_ids, sink_positions):
    """Plain HF Llama on `sink + tokens` at Memory3's positions; logits of the context positions."""
    b, t = tokens.shape
    ids = torch.tensor(np.concatenate([np.tile(sink_ids, (b, 1)), tokens], axis=1))
    positions = torch.tensor(list(sink_positions) + [sink_positions[-1] + 1 + i for i in range(t)])[None]
    with torch.no_grad():
        out = hf_model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids)).logits
    return out[:, len(sink_ids):].numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = tiny()
    model = Memory3(cfg, rngs=nnx.Rngs(1))
    return model, export_model(model, tmp_path_factory.mktemp("export") / "hf")


@pytest.fixture(scope="module")
def remote_model(exported):
    return transformers.AutoModelForCausalLM.from_pretrained(exported[1], trust_remote_code=True,
                                                             dtype=torch.float32)


@pytest.mark.parametrize("overrides", [{}, {"model.tie_embeddings": True, "memory.layer_start": 1}])
def test_plain_llama_matches_without_memory(tmp_path, overrides):
    cfg = tiny(**overrides)
    model = Memory3(cfg, rngs=nnx.Rngs(2))
    out = export_model(model, tmp_path / "hf")
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["vocab_size"] == 2048 and hf_cfg["m3jax_vocab_size"] == cfg.model.vocab_size
    assert hf_cfg["m3jax_sink_ids"] == [1, 4, 1] and hf_cfg["m3jax_sink_positions"] == [0, 1, 2 + 32]
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokens = np.random.default_rng(0).integers(5, cfg.model.vocab_size, (2, 37))
    ours = np.asarray(model(tokens))[..., :cfg.model.vocab_size]
    theirs = hf_stream_logits(hf, tokens, hf_cfg["m3jax_sink_ids"], hf_cfg["m3jax_sink_positions"])
    assert_close(ours, theirs[..., :cfg.model.vocab_size])
    # the comparison can fail: without the sink HF sees another context and the logits differ
    with torch.no_grad():
        plain = hf(input_ids=torch.tensor(tokens)).logits.numpy()[..., :cfg.model.vocab_size]
    assert rel_diff(plain, theirs[..., :cfg.model.vocab_size]) > 1e-2


def _memories(model, cfg, rng, b, chunks, r, n_refs=12):
    """Memories of random references (some shorter than k: invalid slots) retrieved per chunk."""
    lengths = rng.integers(1, cfg.memory.reference_len + 1, n_refs)
    lengths[:3] = [1, 2, 3]  # fewer tokens than tokens_per_head = 4
    refs = rng.integers(5, cfg.model.vocab_size, (n_refs, cfg.memory.reference_len))
    memories, slots = write_memories(model, refs, lengths)
    ids = rng.integers(0, n_refs, (b, chunks, r))
    ids[0, 0, 0] = 0
    valid = slots[ids].copy()
    valid[0, 1, 2] = False  # a missing retrieval
    return refs, lengths, memories[ids], valid


@pytest.mark.parametrize("window,layer_start,grouped", [(1, 0, False), (2, 1, False), (1, 0, True)])
def test_memory3_torch_matches_with_memory(tmp_path, window, layer_start, grouped):
    cfg = tiny(**{"memory.layer_start": layer_start})
    model = Memory3(cfg, rngs=nnx.Rngs(3))
    out = export_model(model, tmp_path / "hf")
    m3 = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    assert type(m3).__name__ == "Memory3ForCausalLM"
    rng = np.random.default_rng(window)
    b, t = 2, 40  # 3 chunks of 16, the last partial
    tokens = rng.integers(5, cfg.model.vocab_size, (b, t))
    padding = np.ones((b, t), bool)
    padding[1, -5:] = False
    _, _, kv, valid = _memories(model, cfg, rng, b, 3, 3)
    # generation's layout: each token reads a memory group given per token (-1: none), not its chunk's
    group = rng.integers(-1, 3, (b, t)) if grouped else None
    ours = np.asarray(model(tokens, memory=MemoryInputs(kv, valid, window, group), padding_mask=padding))
    with torch.no_grad():
        theirs = m3(torch.tensor(tokens), attention_mask=torch.tensor(padding), memory_kv=torch.tensor(kv),
                    memory_valid=torch.tensor(valid), memory_window=window,
                    memory_token_group=None if group is None else torch.tensor(group)).logits.numpy()
        without = m3(torch.tensor(tokens), attention_mask=torch.tensor(padding)).logits.numpy()
    assert_close(ours, theirs)
    assert rel_diff(without, theirs) > 1e-3  # memory matters, so the comparison above can fail
    assert_close(np.asarray(model(tokens, padding_mask=padding)), without)


def test_memory3_torch_writes_the_same_memories(exported, remote_model):
    model, _ = exported
    cfg = model.cfg
    rng = np.random.default_rng(5)
    lengths = np.array([1, 3, 17, 32, 9])
    refs = rng.integers(5, cfg.model.vocab_size, (5, 32))
    ours, ours_valid = write_memories(model, refs, lengths)
    theirs, theirs_valid = remote_model.encode_references(torch.tensor(refs), torch.tensor(lengths))
    np.testing.assert_array_equal(theirs_valid.numpy(), ours_valid)
    mask = ours_valid[:, None, None, None, :, None]  # invalid slots hold arbitrary tokens
    assert_close(np.where(mask, theirs.numpy(), 0), np.where(mask, ours, 0))


def _load_bank_module(export_dir):
    spec = importlib.util.spec_from_file_location("bank_memory3_under_test", export_dir / "bank_memory3.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("compression", ["bf16", "int8"])
def test_bank_export_round_trip(tmp_path, exported, compression):
    model, _ = exported
    cfg = model.cfg
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 33, 12)
    refs = rng.integers(5, cfg.model.vocab_size, (12, 32))
    memories, slots = write_memories(model, refs, lengths)
    bank = MemoryBank.create(str(tmp_path / "bank"), cfg, fingerprint=weights_fingerprint(model),
                             compression=compression, shard_refs=4)
    bank.append(0, memories, slots.sum(1), reference_hashes(refs, lengths))
    out = export_model(model, tmp_path / "hf", bank=str(tmp_path / "bank"), bank_shard_refs=5)  # 3 shards
    module = _load_bank_module(out)
    from m3jax.export.bank import FORMAT

    assert module.FORMAT == FORMAT
    fingerprint = json.loads((out / "config.json").read_text())["m3jax_weights_fingerprint"]
    reader = module.load_memory_bank(out / "memory_bank", fingerprint=fingerprint, verify=True)
    ids = np.array([11, 0, 5, 4, 5, 9, 3, 10])
    want_mem, want_valid = bank.read(ids)
    got_mem, got_valid = reader.read(ids)
    np.testing.assert_array_equal(got_mem.numpy(), want_mem)
    np.testing.assert_array_equal(got_valid.numpy(), want_valid)
    kv, valid = reader.memory_inputs(ids.reshape(1, 4, 2))
    np.testing.assert_array_equal(kv.numpy(), want_mem.reshape(1, 4, 2, *want_mem.shape[1:]))
    np.testing.assert_array_equal(valid.numpy(), want_valid.reshape(1, 4, 2, -1))
    with pytest.raises(ValueError, match="other weights"):
        module.load_memory_bank(out / "memory_bank", fingerprint="sha256:other")
    # a bank written by other weights is refused, and nothing that looks complete is left behind
    other = Memory3(cfg, rngs=nnx.Rngs(99))
    with pytest.raises(BankMismatchError):
        export_model(other, tmp_path / "hf2", bank=str(tmp_path / "bank"))
    assert not (tmp_path / "hf2").exists() and not (tmp_path / "hf2.partial").exists()


def test_export_import_round_trip(tmp_path, exported):
    model, out = exported
    cfg, _, path = import_hf(out, tmp_path / "m3")
    loaded_cfg = config.load(str(path / "config.py"))
    assert loaded_cfg.to_dict() == model.cfg.to_dict() == cfg.to_dict()
    loaded = load_model(loaded_cfg, str(path / "params"))
    want = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    got = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key][...]), np.asarray(want[key][...]), err_msg=str(key))
    assert weights_fingerprint(loaded) == weights_fingerprint(model)


@pytest.mark.parametrize("tie", [False, True])
def test_import_foreign_llama_matches_hf(tmp_path, tie):
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=5000.0,
                                      rms_norm_eps=1e-6, bos_token_id=1, pad_token_id=0, tie_word_embeddings=tie)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # norms away from 1, so a mis-mapped norm weight would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.5 * torch.rand_like(p))
    hf.save_pretrained(tmp_path / "foreign")
    cfg, model = model_from_hf(tmp_path / "foreign")
    assert (cfg.model.vocab_size, cfg.model.tie_embeddings, cfg.memory.num_layers) == (300, tie, 2)
    tokens = np.random.default_rng(1).integers(2, 300, (2, 21))
    p, r = len(cfg.memory.reference_prefix_ids), cfg.memory.reference_len
    theirs = hf_stream_logits(hf, tokens, [*cfg.memory.reference_prefix_ids, cfg.model.bos_id],
                              list(range(p)) + [p + r])
    assert_close(np.asarray(model(tokens)), theirs)


def _edited_copy(src, dst, config_edit=None, tensor_edit=None):
    shutil.copytree(src, dst)
    if config_edit:
        hf = json.loads((dst / "config.json").read_text())
        config_edit(hf)
        (dst / "config.json").write_text(json.dumps(hf))
    if tensor_edit:
        tensors = load_file(str(dst / "model.safetensors"))
        tensor_edit(tensors)
        save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("edit,message", [
    ({"config_edit": lambda c: c.update(attention_bias=True)}, "attention_bias"),
    ({"config_edit": lambda c: c.update(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})},
     "RoPE scaling"),
    ({"config_edit": lambda c: c.update(rope_scaling={"type": "dynamic", "factor": 2.0})}, "RoPE scaling"),
    ({"config_edit": lambda c: c.update(hidden_act="gelu")}, "hidden_act"),
    ({"tensor_edit": lambda t: t.update({"model.layers.1.mlp.up_proj.weight": np.zeros((5, 64), np.float32)})},
     r"model.layers.1.mlp.up_proj.weight has shape \(5, 64\)"),
    ({"tensor_edit": lambda t: t.pop("model.norm.weight")}, "no tensor model.norm.weight"),
    ({"tensor_edit": lambda t: t.update({"model.layers.9.mlp.up_proj.weight": np.zeros(2, np.float32)})},
     "does not use"),
])
def test_import_refuses_incompatible_checkpoints(tmp_path, exported, edit, message):
    src = _edited_copy(exported[1], tmp_path / "bad", **edit)
    with pytest.raises(ValueError, match=message):
        import_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_out_dir_and_missing_input_are_refused(tmp_path, exported):
    model, out = exported
    with pytest.raises(ValueError, match="no such directory"):
        import_hf(tmp_path / "missing", tmp_path / "x")
    with pytest.raises(ValueError, match="not empty; pass --overwrite"):
        export_model(model, out)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty; pass --overwrite"):
        import_hf(out, busy)
    assert (busy / "keep.txt").read_text() == "mine"
    import_hf(out, busy, overwrite=True)
    assert not (busy / "keep.txt").exists() and (busy / "params").is_dir()


def _cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "m3jax.cli", *args], check=False, capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def test_cli_export_and_import(tmp_path):
    out = tmp_path / "hf"
    done = _cli("export", "--config=tiny", "--config.model.dtype=float32", "--checkpoint=random:4", f"--out={out}")
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").is_file() and (out / "modeling_memory3.py").is_file()
    again = _cli("export", "--config=tiny", "--checkpoint=random:4", f"--out={out}")
    assert again.returncode == 2 and "not empty; pass --overwrite" in again.stderr
    assert again.stderr.strip().count("\n") == 0, again.stderr  # one line
    done = _cli("import", f"--hf={out}", f"--out={tmp_path / 'm3'}")
    assert done.returncode == 0, done.stderr
    cfg = config.load(str(tmp_path / "m3" / "config.py"))
    reference = Memory3(tiny(), rngs=nnx.Rngs(4))
    assert weights_fingerprint(load_model(cfg, str(tmp_path / "m3" / "params"))) == weights_fingerprint(reference)
    bad = _cli("import", f"--hf={tmp_path / 'missing'}", f"--out={tmp_path / 'm4'}")
    assert bad.returncode == 2 and "no such directory" in bad.stderr
