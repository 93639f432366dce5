"""Launchers: their dry runs print exactly the commands they would run; shellcheck finds nothing."""
import pathlib
import shutil
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"


def dry(script, *args):
    out = subprocess.run(["bash", str(LAUNCH / script), *args, "--dry-run"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_tpu_vm():
    lines = dry("tpu_vm.sh", "--name", "m3", "--zone", "us-east5-a", "--type", "v5p-128", "--config",
                "configs/m3_2p4b.py", "--data", "gs://b/data", "--workdir", "gs://b/run", "--repo", "REPO", "--create")
    assert lines[0] == ("gcloud compute tpus tpu-vm create m3 --zone=us-east5-a --accelerator-type=v5p-128 "
                        "--version=v2-alpha-tpuv5")
    assert "--worker=all" in lines[1] and "make\\ setup" in lines[1]
    assert "--worker=all" in lines[2] and "m3jax\\ train\\ --distributed\\ --config=configs/m3_2p4b.py" in lines[2]
    assert len(dry("tpu_vm.sh", "--name", "m3", "--zone", "z", "--type", "t", "--config", "c", "--data", "d",
                   "--workdir", "w", "--repo", "r")) == 2  # no --create: no create command


def test_gke_xpk():
    (line,) = dry("gke_xpk.sh", "--cluster", "c", "--workload", "w", "--type", "v5p-128", "--image", "img",
                  "--config", "configs/m3_2p4b.py", "--data", "gs://b/d", "--workdir", "gs://b/r")
    assert line.startswith("xpk workload create --cluster=c --workload=w --tpu-type=v5p-128 --num-slices=1")
    assert "m3jax\\ train\\ --distributed" in line


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
