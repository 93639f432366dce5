"""The `m3jax` command starts the CPU backend only where there is no TPU and no accelerator plugin, so that
libtpu (installed for `m3jax compile`) does not start and print warnings about a TPU that is not there."""
import os
import subprocess
import sys

import pytest

from m3jax import platforms


@pytest.mark.parametrize("configured,chips,plugins,want", [
    ("", 0, False, True),  # a CPU machine: the CPU backend only
    ("cuda", 0, False, False),  # JAX_PLATFORMS decides
    ("", 4, False, False),  # a TPU host: JAX's own choice
    ("", 0, True, False),  # a CUDA (or other) plugin: JAX's own choice
])
def test_cpu_only_where_nothing_else_can_run(monkeypatch, configured, chips, plugins, want):
    monkeypatch.setattr(platforms, "_configured", lambda: configured)
    monkeypatch.setattr(platforms, "_tpu_chips", lambda: chips)
    monkeypatch.setattr(platforms, "_accelerator_plugins", lambda: plugins)
    assert platforms.cpu_only_here() == want


# a command that starts JAX's backends, run as `m3jax probe` through the command line's entry point
PROBE = """
import sys
import jax
from m3jax import cli
cli.COMMANDS["probe"] = lambda cfg: print("backend", jax.default_backend())
cli.NO_CONFIG.add("probe")
sys.argv = ["m3jax", "probe"]
cli.run()
"""


def test_the_command_starts_no_tpu_runtime_on_a_cpu_machine():
    if platforms._tpu_chips() or platforms._accelerator_plugins():
        pytest.skip("this host has a TPU or an accelerator plugin: JAX chooses its backends itself")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # as a newcomer runs it
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "backend cpu" in out.stdout
    assert "TPU" not in out.stderr and "E0000" not in out.stderr, out.stderr
