"""Launchers: their dry runs print exactly the commands they would run; shellcheck finds nothing."""
import os
import pathlib
import shutil
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"


def dry(script, *args, extra=()):
    """The dry run's lines; `extra` goes after `--` (flags passed through to training)."""
    tail = ["--", *extra] if extra else []
    out = subprocess.run(["bash", str(LAUNCH / script), *args, "--dry-run", *tail], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


PREFLIGHT = "env JAX_PLATFORMS=cpu .venv/bin/m3jax compile --config=configs/m3_2p4b.py --topology=v5p-128"


def test_tpu_vm():
    lines = dry("tpu_vm.sh", "--name", "m3", "--zone", "us-east5-a", "--type", "v5p-128", "--config",
                "configs/m3_2p4b.py", "--data", "gs://b/data", "--workdir", "gs://b/run", "--repo", "REPO", "--create",
                extra=("--config.train.accum_steps=4", "--log_every=5"))
    assert lines[0] == PREFLIGHT + " --config.train.accum_steps=4"  # config overrides only, before any TPU
    assert lines[1] == ("gcloud compute tpus tpu-vm create m3 --zone=us-east5-a --accelerator-type=v5p-128 "
                        "--version=v2-alpha-tpuv5")
    assert "--worker=all" in lines[2] and "make\\ setup" in lines[2]
    assert "--worker=all" in lines[3] and "m3jax\\ train\\ --distributed\\ --config=configs/m3_2p4b.py" in lines[3]
    assert "--log_every=5" in lines[3]
    lines = dry("tpu_vm.sh", "--name", "m3", "--zone", "z", "--type", "t", "--config", "c", "--data", "d",
                "--workdir", "w", "--repo", "r", "--skip-preflight")
    assert len(lines) == 2 and "compile" not in " ".join(lines)  # no --create, no pre-flight


def test_gke_xpk():
    pre, line = dry("gke_xpk.sh", "--cluster", "c", "--workload", "w", "--type", "v5p-128", "--image", "img",
                    "--config", "configs/m3_2p4b.py", "--data", "gs://b/d", "--workdir", "gs://b/r")
    assert pre == PREFLIGHT
    assert line.startswith("xpk workload create --cluster=c --workload=w --tpu-type=v5p-128 --num-slices=1")
    assert "m3jax\\ train\\ --distributed" in line
    (line,) = dry("gke_xpk.sh", "--cluster", "c", "--workload", "w", "--type", "v5p-128", "--image", "img",
                  "--config", "c", "--data", "d", "--workdir", "r", "--skip-preflight")
    assert line.startswith("xpk workload create")


@pytest.mark.parametrize("verdict,launched", [(1, False), (0, True)])
def test_failed_preflight_stops_before_any_tpu(tmp_path, verdict, launched):
    """A real (not dry) run: a pre-flight that fails stops the launcher before gcloud is called."""
    (tmp_path / ".venv/bin").mkdir(parents=True)
    calls = tmp_path / "calls"
    for name, code in (("m3jax", verdict), ("gcloud", 0)):
        tool = tmp_path / (".venv/bin/" + name if name == "m3jax" else name)
        tool.write_text(f"#!/bin/sh\necho {name} \"$@\" >> {calls}\nexit {code}\n")
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "--name", "m3", "--zone", "z", "--type", "v5e-4",
                          "--config", "tiny", "--data", "d", "--workdir", "w", "--repo", "r"],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    log = calls.read_text().splitlines()
    assert log[0] == "m3jax compile --config=tiny --topology=v5e-4"
    assert any(line.startswith("gcloud") for line in log) == launched
    assert out.returncode == (0 if launched else 2)
    if not launched:
        assert "pre-flight: tiny does not compile or fit on v5e-4" in out.stderr and "--skip-preflight" in out.stderr


def test_slurm():
    lines = dry("slurm.sh", "--nodes", "4", "--partition", "gpu", "--config", "c.py", "--data", "/d", "--workdir", "/w")
    assert "#SBATCH --nodes=4" in lines and "#SBATCH --gpus-per-node=8" in lines and "export NCCL_NVLS_ENABLE=0" in lines
    assert "srun .venv/bin/m3jax train --distributed --config=c.py --data_dir=/d --workdir=/w" in lines


def test_local():
    lines = dry("local.sh", "--processes", "3", "--config", "c.py", "--data", "d", "--workdir", "w")
    assert len(lines) == 3 and all(f"M3JAX_PROCESS_ID={i}" in line for i, line in enumerate(lines))
    assert all("M3JAX_NUM_PROCESSES=3" in line and "--distributed" in line for line in lines)


def test_missing_arguments_are_named():
    out = subprocess.run(["bash", str(LAUNCH / "slurm.sh"), "--dry-run"], capture_output=True, text=True)
    assert out.returncode == 2 and "--partition is required" in out.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (.ci/run installs it)")
def test_shellcheck():
    scripts = sorted(str(p) for p in LAUNCH.glob("*.sh"))
    out = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True, cwd=LAUNCH)
    assert out.returncode == 0, out.stdout
