"""`m3jax compile`: TPU slice names, and fit / no-fit verdicts from real XLA:TPU compilations on this CPU host."""
import importlib.util
import os
import subprocess
import sys

import pytest

from m3jax.aot import check, topology

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="compiling for TPUs needs libtpu (requirements: libtpu==0.0.42.*)")


@pytest.mark.parametrize("name,topo,chips,hbm_gib", [
    ("v5p-8", "v5p:2x2x1", 4, 95), ("v5p-16", "v5p:2x2x2", 8, 95), ("v5p-32", "v5p:2x2x4", 16, 95),
    ("v5p-128", "v5p:4x4x4", 64, 95), ("v5p-256", "v5p:4x4x8", 128, 95), ("v5p-1024", "v5p:8x8x8", 512, 95),
    ("v4-32", "v4:2x2x4", 16, 32), ("v5e-4", "v5e:2x2", 4, 16), ("v5litepod-16", "v5e:4x4", 16, 16),
    ("v5e-32", "v5e:4x8", 32, 16), ("v6e-256", "v6e:16x16", 256, 32), ("v5p:4x4x8", "v5p:4x4x8", 128, 95),
])
def test_slice_names(name, topo, chips, hbm_gib):
    s = topology.parse(name)
    assert (s.topology, s.chips, s.generation.hbm_bytes) == (topo, chips, hbm_gib * 2 ** 30)


@pytest.mark.parametrize("name,message", [("v5p-12", "power-of-two"), ("v5p-7", "count TensorCores"),
                                          ("v9x-8", "unknown TPU generation"), ("a100-8", "unknown TPU slice"),
                                          ("v5e:2x2x2", "2 sides")])
def test_bad_slice_names(name, message):
    with pytest.raises(ValueError, match=message):
        topology.parse(name)


def test_verdict_compares_total_with_hbm():
    s = topology.parse("v5e-4")
    fits = check.StepReport("stage1", True, arguments=2 * 2 ** 30, temporaries=10 * 2 ** 30)
    over = check.StepReport("stage2", True, arguments=2 * 2 ** 30, temporaries=15 * 2 ** 30)
    assert check.all_fit(s, [fits]) and not check.all_fit(s, [fits, over])
    assert not check.all_fit(s, [check.StepReport("generate", False, note="RESOURCE_EXHAUSTED")])


def _compile(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "m3jax.cli", "compile", *args], capture_output=True, text=True,
                          env=env, timeout=600, check=False)


@needs_libtpu
def test_tiny_fits_a_v5e_slice():
    """All three steps compile for 4 v5e chips; splash attention is chosen for TPU, FSDP over the chips."""
    out = _compile("--config=tiny", "--topology=v5e-4")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "tiny on v5e-4 (v5e:2x2, 4 chips, 16 GiB HBM per chip), attention splash" in text
    assert "mesh data=1, fsdp=4, tensor=1" in text
    for step in ("stage1", "stage2", "generate"):
        line = next(line for line in text.splitlines() if line.startswith(step))
        assert " fits: total " in line and "GiB of 16 GiB per chip" in line, line
    assert text.count("model FLOPs per step") == 2 and text.count("XLA cost analysis") == 3
    assert "one decoding step" in text or "a forward pass" in text


@needs_libtpu
def test_a_model_that_cannot_fit_is_reported():
    """An embedding of 50M rows (~12 GiB of f32 weights, plus gradient and Adam moments) on 4 v5e chips."""
    out = _compile("--config=tiny", "--topology=v5e-4", "--steps=stage1", "--config.model.vocab_size=50000000",
                   "--config.model.attention=exact")
    assert out.returncode == 1, out.stdout + out.stderr[-3000:]
    assert "stage1    DOES NOT FIT" in out.stdout
    assert "m3jax compile: tiny does not fit v5e-4: stage1 need more than the 16 GiB of HBM per chip" in out.stderr


def test_unknown_slice_is_a_clear_error():
    out = _compile("--config=tiny", "--topology=v5p-12", "--steps=stage1")
    assert out.returncode == 2 and "power-of-two number of chips, not 6" in out.stderr
