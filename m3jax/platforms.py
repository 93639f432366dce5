"""Which JAX backends the `m3jax` command starts on a host without accelerators.

libtpu is a dependency (for `m3jax compile`: TPU slices compiled ahead of time on any host), and JAX tries
it as a backend at start-up wherever it is installed. On a host without TPU chips that try fails quietly,
but libtpu first prints warnings and an error about the TPU metadata it cannot find, once per command. So
on a host with neither TPU chips nor an accelerator plugin (a CPU machine: `make demo`), the command
starts the CPU backend only. JAX_PLATFORMS, when set, always decides; so does anything unsure here.
"""
from __future__ import annotations

import pkgutil
from importlib import metadata

import jax


def _configured() -> str:
    """The platforms asked for (JAX_PLATFORMS, or set in code); empty when JAX is to choose."""
    return jax.config.jax_platforms or ""


def _tpu_chips() -> int:
    try:
        from jax._src import hardware_utils  # JAX's own probe (PCI device ids), the one its TPU start-up uses
        return hardware_utils.num_available_tpu_chips_and_device_id()[0]
    except Exception:  # noqa: BLE001 - a JAX without it: assume a TPU may be there, and change nothing
        return 1


def _accelerator_plugins() -> bool:
    """Whether a PJRT plugin (CUDA, ROCm, ...) is installed: JAX finds them by entry point or namespace package."""
    if list(metadata.entry_points(group="jax_plugins")):
        return True
    try:
        import jax_plugins
    except ImportError:
        return False
    return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def cpu_only_here() -> bool:
    """Whether the command should start the CPU backend only (see the module's doc)."""
    return not _configured() and _tpu_chips() == 0 and not _accelerator_plugins()


def choose() -> None:
    """Call before JAX starts its backends (the first computation or device query)."""
    if cpu_only_here():
        jax.config.update("jax_platforms", "cpu")
