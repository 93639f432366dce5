"""Configs: the paper's numbers (SPEC 2-3) reproduced from the configs, and validation messages."""
import subprocess
import sys

import pytest

from m3jax import config as config_lib
from m3jax import sizes
from m3jax.config import ConfigError


def test_m3_2p4b_sizes_match_the_paper():
    cfg = config_lib.load("m3_2p4b")
    counts = sizes.parameter_counts(cfg)  # counted from the model's abstract parameters
    assert abs(counts["non_embedding"] / 2.433e9 - 1) < 0.005
    assert config_lib.padded_vocab_size(cfg.model) == 60416
    assert counts["embedding"] == 2 * 60416 * 3200  # untied embedding and LM head
    assert sizes.memory_numbers_per_reference(cfg) == 225_280
    assert sizes.memory_bytes_per_reference(cfg) == 450_560  # 440 KiB in bf16
    assert sizes.sparsity_factor(cfg) == 160
    assert sizes.vq_code_bytes(cfg.memory.vq_factory) == 14
    bank = {k: sizes.human_bytes(v) for k, v in sizes.bank_bytes(cfg).items()}
    assert bank == {"dense": "7.17 PiB", "sparse": "45.9 TiB", "quantized": "4.02 TiB"}


def test_ablation_model_size():
    counts = sizes.parameter_counts(config_lib.load("m3_0p92b"))
    assert abs(counts["non_embedding"] / 0.92e9 - 1) < 0.01


def test_small_is_in_its_range():
    assert 50e6 <= sizes.parameter_counts(config_lib.load("small"))["non_embedding"] <= 100e6


def test_vq_code_sizes():
    assert sizes.vq_code_bytes("OPQ20x80,Residual2x14,PQ8x10") == 14  # FAISS's own separator
    assert sizes.vq_code_bytes("PQ16") == 16  # 8 bits per code by default
    with pytest.raises(ConfigError, match="cannot size component 'IVF4096'"):
        sizes.vq_code_bytes("IVF4096-PQ8")


@pytest.mark.parametrize("overrides, message", [
    ({"model.num_kv_heads": 3}, r"model.num_heads \(4\) must be divisible by model.num_kv_heads \(3\)"),
    ({"memory.layer_start": 3}, r"memory layers 3..4 .* beyond the stack of model.num_layers=4"),
    ({"memory.num_layers": 5}, r"beyond the stack of model.num_layers=4"),
    ({"memory.chunk_len": 48}, r"memory.chunk_len \(48\) must divide data.seq_len \(128\)"),
    ({"model.head_dim": 15}, r"model.head_dim \(15\) must be even"),
    ({"model.hidden_size": 0}, r"model.hidden_size must be a positive integer"),
    ({"model.remat": "some"}, r"model.remat is 'some'; expected one of"),
    ({"memory.tokens_per_head": 64}, r"memory.tokens_per_head \(64\) exceeds memory.reference_len \(32\)"),
    ({"memory.reference_prefix_ids": (2, 3)}, r"must start with model.bos_id"),
    ({"memory.reference_prefix_ids": (1, 6000)}, r"reference_prefix_ids\[1\] = 6000 is outside the vocabulary"),
    ({"data.heldout_fraction": 0.0}, r"data.heldout_fraction must be in \(0, 1\)"),
    ({"memory.vq_factory": "OPQ20x80-PQ8x10"}, r"rotates 80-dim vectors, but .*model.head_dim=16"),
])
def test_validate_names_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.load("tiny", overrides)


def test_unknown_fields_and_files():
    with pytest.raises(ConfigError, match="unknown config field 'model.num_layer'"):
        config_lib.load("tiny", {"model.num_layer": 3})
    with pytest.raises(ConfigError, match="no config file 'nope'; built-in configs: m3_0p92b, m3_2p4b, small, tiny"):
        config_lib.load("nope")


def test_resolved_config_round_trips(tmp_path):
    cfg = config_lib.load("tiny")
    path = config_lib.save_resolved(cfg, tmp_path)
    import json
    assert json.loads(path.read_text())["memory"]["chunk_len"] == 16


def m3jax(*args):
    return subprocess.run([sys.executable, "-m", "m3jax.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_info_prints_the_paper_numbers():
    out = m3jax("info", "--config=configs/m3_2p4b.py")
    assert out.returncode == 0, out.stderr
    for text in ("2,433,308,800 (2.433B)", "450,560 bytes", "1/160", "dense 7.17 PiB", "sparse 45.9 TiB",
                 "quantized 4.02 TiB", "memory layers              0..21 (22 of 44)"):
        assert text in out.stdout, text


def test_cli_bad_config_is_one_clear_line():
    out = m3jax("info", "--config=tiny", "--config.model.num_kv_heads=3")
    assert out.returncode == 2
    assert "error: model.num_heads (4) must be divisible by model.num_kv_heads (3)" in out.stderr
    assert "Traceback" not in out.stderr
    out = m3jax("info", "--config=missing")
    assert out.returncode == 2 and "no config file 'missing'" in out.stderr and "Traceback" not in out.stderr
    out = m3jax("frobnicate", "--config=tiny")
    assert out.returncode != 0 and "usage: m3jax <info|demo|memory build" in out.stderr
