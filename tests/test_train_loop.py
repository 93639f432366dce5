"""The training loop on prepared (synthetic) data: both stages, exact resume after SIGKILL, refusals."""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from m3jax import config as config_lib
from m3jax.data.prepare import prepare
from m3jax.train.loop import TrainingDiverged, train
from synthetic_data import synthetic

STEPS = {"train.steps": 12, "train.batch_size": 8, "train.warmup_steps": 2, "train.lr": 3e-3,
         "train.mesh": (1, -1, 1)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(config_lib.load("tiny"), None, out, documents=synthetic(), progress=False)
    return out


def final_params(workdir):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mngr:
        restored = mngr.restore(mngr.latest_step())
    return restored["params"]


def test_stage1_then_stage2(data, tmp_path):
    s1 = train(config_lib.load("tiny", STEPS), data, tmp_path / "s1", progress=False, log_every=1, checkpoint_every=5)
    lines = (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 12 and s1["step"] == 12
    losses = [float(line.split('"loss": ')[1].split(",")[0]) for line in lines]
    assert losses[-1] < losses[0] - 0.5  # real (synthetic) text is learnable
    assert (tmp_path / "s1" / "config.json").is_file()
    assert any((tmp_path / "s1" / "tensorboard").iterdir())  # TensorBoard event file
    # how to compute (here: decoding's matmul) may differ from stage 1; what the model is may not
    cfg2 = config_lib.load("tiny", {**STEPS, "train.stage": 2, "train.steps": 4, "model.decode_matmul": "pallas"})
    s2 = train(cfg2, data, tmp_path / "s2", init_from=tmp_path / "s1", progress=False, checkpoint_every=2)
    assert s2["step"] == 4 and np.isfinite(s2["loss"])
    with pytest.raises(ValueError, match="trained another model"):
        train(config_lib.load("tiny", {**STEPS, "train.stage": 2, "model.mlp_dim": 64}), data, tmp_path / "s2b",
              init_from=tmp_path / "s1", progress=False)
    with pytest.raises(ValueError, match="starts from a stage-1 checkpoint"):
        train(cfg2, data, tmp_path / "s2c", progress=False)


def test_resume_after_sigkill_is_exact(data, tmp_path):
    def cmd(workdir):
        return [sys.executable, "-m", "m3jax.cli", "train", "--config=tiny", f"--data_dir={data}", f"--workdir={workdir}",
                "--checkpoint_every=4", "--config.train.steps=12", "--config.train.batch_size=8",
                "--config.train.warmup_steps=2", "--config.train.lr=0.003"]
    killed = subprocess.run(cmd(tmp_path / "killed"), env={**os.environ, "M3JAX_KILL_AT_STEP": "10"},
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    resumed = subprocess.run(cmd(tmp_path / "killed"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run(cmd(tmp_path / "straight"), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    for a, b in zip(jax.tree.leaves(final_params(tmp_path / "killed")), jax.tree.leaves(final_params(tmp_path / "straight"))):
        np.testing.assert_array_equal(a, b)  # bit-identical


def test_divergence_stops_with_the_last_good_checkpoint(data, tmp_path):
    cfg = config_lib.load("tiny", {**STEPS, "train.lr": 1e30, "train.clip_norm": 1e30, "train.warmup_steps": 0})
    with pytest.raises(TrainingDiverged, match="the last good checkpoint is step"):
        train(cfg, data, tmp_path / "run", progress=False, checkpoint_every=1)


def test_data_that_does_not_fit_the_config(data, tmp_path):
    with pytest.raises(ValueError, match="does not fit the config: sequences of 128 tokens, config data.seq_len=64"):
        train(config_lib.load("tiny", {**STEPS, "data.seq_len": 64}), data, tmp_path / "run", progress=False)


def test_demo_pipeline_through_the_cli(data, tmp_path):
    """What `make demo` runs after `data prepare`: stage 1, bank with stage-1 weights, stage 2, losses."""
    def run(*args):
        out = subprocess.run([sys.executable, "-m", "m3jax.cli", "--config=tiny", f"--data_dir={data}",
                              "--config.train.batch_size=8", "--config.train.warmup_steps=2", *args],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout

    run("train", f"--workdir={tmp_path / 'stage1'}", "--config.train.steps=6")
    run("memory", "build", f"--checkpoint={tmp_path / 'stage1'}", f"--references={data}", f"--bank={tmp_path / 'bank'}")
    run("train", f"--workdir={tmp_path / 'stage2'}", f"--init_from={tmp_path / 'stage1'}", "--config.train.stage=2",
        "--config.train.steps=4")
    report = run("demo", f"--workdir={tmp_path}")
    assert "stage 1 (warmup) weights" in report and "stage 2 (continual) weights" in report
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The Moon is\n\nA dictionary is\nWater\n")  # the blank line is skipped
    generate = ["generate", f"--checkpoint={tmp_path / 'stage1'}", f"--bank={tmp_path / 'bank'}", "--max_new_tokens=5"]
    shown = run(*generate, "--prompt=First", f"--prompts_file={prompts}", "--generate_batch=2",
                f"--output={tmp_path / 'generated.json'}")
    rows = json.loads((tmp_path / "generated.json").read_text())["generations"]
    assert [r["prompt"] for r in rows] == ["First", "The Moon is", "A dictionary is", "Water"]
    assert all(f"{r['prompt']} \u2192 {r['completion']}" in shown for r in rows)
    (tmp_path / "empty.txt").write_text("\n \n")
    empty = subprocess.run([sys.executable, "-m", "m3jax.cli", "--config=tiny", f"--data_dir={data}", *generate,
                            f"--prompts_file={tmp_path / 'empty.txt'}"], capture_output=True, text=True)
    assert empty.returncode == 2 and "holds no prompt" in empty.stderr
    other = subprocess.run([sys.executable, "-m", "m3jax.cli", "demo", "--config=tiny", f"--data_dir={data}",
                            f"--workdir={tmp_path}", f"--bank={tmp_path / 'nothing'}"], capture_output=True, text=True)
    assert other.returncode == 2 and "no memory bank" in other.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_process_train(common, workdir, logs, env, deadline_s):
    """`m3jax train --distributed` as processes 0 and 1 on a fresh port. Returns (outcome, stderr of both): "ok",
    "rendezvous" (jax.distributed failed, or the deadline passed: worth a retry) or "failed" (an error in m3jax)."""
    port = _free_port()  # another program may take it before the coordinator does: a rendezvous failure, retried
    procs, errs, killed = [], [], set()
    for i in range(2):  # the coordinator (process 0) first
        # stderr to files, not pipes: a process blocked on a full pipe nobody reads would stall its peer's collectives
        errs.append(open(logs / f"process{i}.stderr", "w+"))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "m3jax.cli", "train", "--distributed", *common, f"--workdir={workdir}"],
            stdout=subprocess.DEVNULL, stderr=errs[-1],
            env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                 "M3JAX_COORDINATOR": f"127.0.0.1:{port}", "M3JAX_NUM_PROCESSES": "2", "M3JAX_PROCESS_ID": str(i),
                 "M3JAX_DISTRIBUTED_TIMEOUT": "60"}))  # a lost peer is an error well inside the deadline
    end = time.monotonic() + deadline_s
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < end:
            if any(p.returncode not in (None, 0) for p in procs):
                break  # one failed: the other would only wait out its timeouts
            time.sleep(0.5)
    finally:
        for p in procs:  # SIGKILL: jax's preemption notifier catches SIGTERM
            if p.poll() is None:
                p.kill()
                killed.add(p)
            p.wait()
    texts = []
    for f in errs:
        f.seek(0)
        texts.append(f.read())
        f.close()
    stderr = "\n".join(f"--- process {i} (exit {p.returncode}{', killed' if p in killed else ''}):"
                       f"\n{text[-6000:]}" for i, (p, text) in enumerate(zip(procs, texts)))
    if all(p.returncode == 0 for p in procs):
        return "ok", stderr
    # A failed rendezvous ends in jax's native code, by a signal: SIGABRT after a timeout, SIGSEGV when the port was
    # taken. An error in m3jax prints a traceback or "m3jax train: error" (and may abort later, in jax's exit barrier).
    python_error = any("Traceback (most recent call last)" in t or "m3jax train: error" in t for t in texts)
    return ("failed" if python_error or any(p.returncode > 0 for p in procs) else "rendezvous"), stderr


def test_two_processes_agree_with_one(data, tmp_path):
    """`m3jax train --distributed` in two CPU processes (one device each, jax.distributed on localhost) equals
    one process with two devices: same mesh, same global batch, each process feeding its own rows."""
    from m3jax.train.loop import restore_params

    common = ["--config=tiny", f"--data_dir={data}", "--config.train.steps=3", "--config.train.batch_size=8",
              "--checkpoint_every=3"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # A failed rendezvous gets one more try on a fresh port and workdir; an error in m3jax, or results that differ,
    # fail at once. The deadline kills whatever is left, so CI never hangs here.
    for attempt in range(2):
        outcome, stderr = _two_process_train(common, tmp_path / f"two{attempt}", tmp_path, env, deadline_s=240)
        if outcome != "rendezvous":
            break
    assert outcome == "ok", f"two-process training {outcome} (attempt {attempt + 1} of 2):\n{stderr}"
    one = subprocess.run([sys.executable, "-m", "m3jax.cli", "train", *common, f"--workdir={tmp_path / 'one'}"],
                         capture_output=True, text=True, timeout=240,
                         env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert one.returncode == 0, one.stderr
    cfg = config_lib.load("tiny", {"train.steps": 3, "train.batch_size": 8})
    _, two_params = restore_params(cfg, tmp_path / f"two{attempt}")
    _, one_params = restore_params(cfg, tmp_path / "one")
    for a, b in zip(jax.tree.leaves(two_params), jax.tree.leaves(one_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
