"""Cloud TPU slice names (`v5p-128`, `v5e-16`, `v4-32`, `v6e-64`) -> topologies and per-chip HBM.

Slice names count TensorCores for v4 and v5p (two per chip, used as one "megacore" device) and chips
for v5e and v6e. The chip grid grows by doubling one side at a time, the last of the shortest sides,
which reproduces Google's published shapes (v5p-128 = 4x4x4, v5p-256 = 4x4x8, v5e-32 = 4x8).
`get_topology_desc` needs libtpu (the `jax[tpu]` extra) but no TPU: it gives compile-only devices.
"""
from __future__ import annotations

import dataclasses
import os
import re

GiB = 2 ** 30


class TopologyUnavailable(RuntimeError):
    """No TPU topology description here (libtpu missing or too old)."""


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str  # as in topology strings: v4, v5p, v5e, v6e
    dims: int  # 3D torus (v4, v5p) or 2D (v5e, v6e)
    cores_per_chip_in_name: int  # what one unit of the slice name counts
    hbm_bytes: int  # per chip
    peak_bf16_tflops: float  # per chip
    chip_config: str | None = None  # get_topology_desc's chip_config_name


GENERATIONS = {g.name: g for g in (
    Generation("v4", 3, 2, 32 * GiB, 275.0, "megacore"),
    Generation("v5p", 3, 2, 95 * GiB, 459.0),
    Generation("v5e", 2, 1, 16 * GiB, 197.0),
    Generation("v6e", 2, 1, 32 * GiB, 918.0),
)}
_ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # as given, e.g. v5p-128
    generation: Generation
    grid: tuple[int, ...]  # chips along each side

    @property
    def chips(self) -> int:
        n = 1
        for d in self.grid:
            n *= d
        return n

    @property
    def topology(self) -> str:
        """The string `get_topology_desc(topology_name=...)` takes, e.g. `v5p:4x4x4`."""
        return f"{self.generation.name}:{'x'.join(map(str, self.grid))}"


def chip_grid(chips: int, dims: int) -> tuple[int, ...]:
    """The chip grid of a slice of `chips` chips (a power of two)."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"a TPU slice has a power-of-two number of chips, not {chips}")
    grid = [1] * dims
    while _product(grid) < chips:
        short = min(grid)
        last = max(i for i, d in enumerate(grid) if d == short)
        grid[last] *= 2
    return tuple(sorted(grid)) if dims == 2 else _torus_order(grid)


def _torus_order(grid):
    # 3D slices list their sides ascending (2x2x4, 4x4x8) except 2x2x1, the one-host slice
    return (2, 2, 1) if sorted(grid) == [1, 2, 2] else tuple(sorted(grid))


def _product(xs) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


def parse(name: str) -> Slice:
    """`v5p-128`, `v5litepod-16`, `v6e-8`, `v4-32`, or a topology string `v5p:4x4x4`."""
    m = re.fullmatch(r"(v\d+[a-z]*|v\d+litepod):(\d+(?:x\d+)+)", name)
    if m:
        gen = _generation(m.group(1), name)
        grid = tuple(int(d) for d in m.group(2).split("x"))
        if len(grid) != gen.dims:
            raise ValueError(f"{name}: {gen.name} topologies have {gen.dims} sides")
        return Slice(name, gen, grid)
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name)
    if not m:
        raise ValueError(f"unknown TPU slice {name!r}: expected e.g. v5p-128, v5e-16, v4-32, v6e-64 or v5p:4x4x4")
    gen = _generation(m.group(1), name)
    units = int(m.group(2))
    if units % gen.cores_per_chip_in_name:
        raise ValueError(f"{name}: {gen.name} slice names count TensorCores, {gen.cores_per_chip_in_name} per chip")
    return Slice(name, gen, chip_grid(units // gen.cores_per_chip_in_name, gen.dims))


def _generation(prefix: str, name: str) -> Generation:
    prefix = _ALIASES.get(prefix, prefix)
    if prefix not in GENERATIONS:
        raise ValueError(f"{name}: unknown TPU generation {prefix!r} (known: {', '.join(GENERATIONS)})")
    return GENERATIONS[prefix]


def devices(tpu_slice: Slice):
    """Compile-only TPU devices of the slice (needs libtpu, no TPU)."""
    from jax.experimental import topologies

    # libtpu takes /tmp/libtpu_lockfile so that one process owns the TPU; compile-only use owns none, and
    # without this a second compile (or a test run beside one) fails with "multi-process lockfile".
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {"chip_config_name": tpu_slice.generation.chip_config} if tpu_slice.generation.chip_config else {}
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=tpu_slice.topology, **kwargs).devices
    except Exception as e:  # libtpu missing, or a topology it does not know
        raise TopologyUnavailable(f"cannot describe TPU topology {tpu_slice.topology} ({e}); compiling for TPUs needs "
                                  "libtpu: pip install 'jax[tpu]' (for jax 0.10.2: libtpu==0.0.42.*)") from e
