"""Logical axis names -> device mesh axes.

Every parameter and activation carries logical axis names; one rule table maps them onto the mesh
axes `(data, fsdp, tensor)`. Parameters and activations use different names (`embed` vs `act_embed`)
so that FSDP can shard weights along the model dimension while activations shard along the batch.
"""
from __future__ import annotations

import contextlib
import contextvars

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_mem_length", None),
)

# Activation names used in the model code, written without the `act_` prefix for readability.
_ACTIVATION = {"batch", "length", "embed", "heads", "kv_heads", "mlp", "vocab", "mem_length"}
_context: contextvars.ContextVar = contextvars.ContextVar("m3jax_sharding", default=None)  # (mesh, rules)


def rules_with(overrides) -> tuple:
    """DEFAULT_RULES with some logical names mapped differently, e.g. (("embed", None),) for no FSDP."""
    table = dict(DEFAULT_RULES)
    for name, axes in overrides:
        if name not in table:
            raise KeyError(f"no logical axis {name!r} to override (known: {', '.join(table)})")
        table[name] = tuple(axes) if isinstance(axes, list) else axes
    return tuple(table.items())


def logical_to_spec(axes, rules=DEFAULT_RULES) -> P:
    table = dict(rules)
    unknown = [a for a in axes if a is not None and a not in table]
    if unknown:
        raise KeyError(f"no sharding rule for logical axes {unknown}")
    return P(*(None if a is None else table[a] for a in axes))


@contextlib.contextmanager
def constraints(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
    """Within this context (also inside a jitted function), activations get sharding constraints."""
    token = _context.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _context.reset(token)


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
    """Outside jit: the mesh, the rules for parameter specs (nnx) and the activation constraints."""
    with constraints(mesh, rules), jax.set_mesh(mesh), nnx.logical_axis_rules(list(rules)):
        yield


def current():
    """(mesh, rules) while traced under `constraints`, else None: kernels that XLA cannot partition
    (Pallas calls) run under `shard_map` then."""
    return _context.get()


def mesh_axes(mesh, rules, name: str, size: int):
    """The mesh axes the logical activation axis `name` maps to, if they divide `size`; else None."""
    axes = dict(rules).get(name)
    if axes is None:
        return None
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    count = 1
    for a in names:
        count *= mesh.shape[a]
    return axes if size % count == 0 else None


def constrain(x, axes):
    """Sharding constraint for an activation with logical `axes`; a no-op outside `constraints`."""
    context = _context.get()
    if context is None:
        return x
    mesh, rules = context
    names = tuple(None if a is None else (f"act_{a}" if a in _ACTIVATION else a) for a in axes)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))


def make_mesh(shape=(1, -1, 1), axes=MESH_AXES, devices=None) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all); one entry of `shape` may be -1 to take the rest."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)}: at most one axis may be -1")
    known = 1
    for s in shape:
        known *= s if s != -1 else 1
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {tuple(shape)} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    total = 1
    for s in shape:
        total *= s
    if total != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {total} devices, have {len(devices)}")
    auto = (jax.sharding.AxisType.Auto,) * len(axes)
    return jax.make_mesh(tuple(shape), tuple(axes), axis_types=auto, devices=devices)


def param_specs(state):
    """PartitionSpecs of an nnx State under the active rules (call inside `activate`)."""
    return nnx.get_partition_spec(state)
