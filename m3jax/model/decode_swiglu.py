"""SwiGLU's first half for decoding, `silu(x @ w_gate) * (x @ w_up)`, as one Pallas Triton kernel (GPU).

With the gate and up products as one split-K product (decode_matmul), XLA runs the partial sums'
addition and the SiLU product as a kernel of its own, one per layer per token. Here each program
multiplies a block of gate columns and the same block of up columns over the whole reduction axis, so
it holds both sums and writes the SiLU product: no split-K (its programs are narrow column blocks
instead), no partial sums, no extra kernel.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from m3jax.model import decode_matmul as dm


class Tiling(NamedTuple):
    block_n: int = 32  # gate (and up) columns per program: 3,200 / 32 = 100 programs for m3_2p4b
    block_k: int = 64  # reduction rows per loop step
    num_warps: int = 4
    num_stages: int = 5


def pick_tiling(m: int, k: int, n: int, tiling: Tiling | None = None) -> Tiling | None:
    """The tiling for x (m, k) and gate/up (k, 2, n), or None when the kernel does not take the shape."""
    t = tiling or Tiling()
    if dm.dot_rows(m) > dm.MAX_ROWS or n % t.block_n or k % t.block_k:
        return None
    return t


def _silu_product(gate, up, dtype):
    """In f32 from the products rounded to `dtype` (as XLA's path sees them), rounded once."""
    g, u = gate.astype(dtype).astype(jnp.float32), up.astype(dtype).astype(jnp.float32)
    return (g * jax.nn.sigmoid(g) * u).astype(dtype)


def _kernel(x_ref, w_ref, o_ref, *, block_k: int, steps: int):
    from jax.experimental import pallas as pl

    precision = dm.float32_precision(x_ref.dtype)

    def body(i, accs):
        ks = pl.ds(i * block_k, block_k)
        x = x_ref[:, ks]
        return tuple(acc + jnp.dot(x, w_ref[ks, half, :], preferred_element_type=jnp.float32, precision=precision)
                     for half, acc in enumerate(accs))

    zeros = jnp.zeros(o_ref.shape, jnp.float32)
    gate, up = jax.lax.fori_loop(0, steps, body, (zeros, zeros))
    o_ref[...] = _silu_product(gate, up, o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("tiling", "interpret"))
def _pallas_swiglu(x, w, tiling: Tiling, interpret: bool):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    m, k = x.shape
    n = w.shape[2]
    rows = dm.dot_rows(m)
    if rows != m:
        x = jnp.pad(x, ((0, rows - m), (0, 0)))
    bn = tiling.block_n
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=tiling.block_k, steps=k // tiling.block_k),
        grid=(n // bn,),
        in_specs=[pl.BlockSpec((rows, k), lambda j: (0, 0)), pl.BlockSpec((k, 2, bn), lambda j: (0, 0, j))],
        out_specs=pl.BlockSpec((rows, bn), lambda j: (0, j)),
        out_shape=jax.ShapeDtypeStruct((rows, n), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name="decode_swiglu",
    )(x, w.astype(x.dtype))
    return out[:m]


def swiglu_gate(x, w_gate_up, impl: str, tiling: Tiling | None = None):
    """x: (m, k), w_gate_up: (k, 2, n) (gate and up kernels stacked) -> silu(x @ gate) * (x @ up), (m, n) in
    x's dtype. impl: "xla" (decode_matmul's product, then the SiLU product), or "pallas" (this kernel where
    its tiling fits, else the same as "xla"; off GPU it runs in Pallas' interpreter, for tests)."""
    if x.ndim != 2 or w_gate_up.ndim != 3 or w_gate_up.shape[:2] != (x.shape[1], 2):
        raise ValueError(f"swiglu_gate multiplies (m, k) by (k, 2, n), got {x.shape} and {w_gate_up.shape}")
    if impl not in ("xla", "pallas"):
        raise ValueError(f"unknown decode matmul {impl!r}; expected 'xla' or 'pallas'")
    tiling = pick_tiling(*x.shape, w_gate_up.shape[2], tiling) if impl == "pallas" else None
    if tiling is None:
        gate_up = dm.decode_matmul(x, w_gate_up, impl, out_dtype=jnp.float32)
        return _silu_product(gate_up[:, 0], gate_up[:, 1], x.dtype)
    return _pallas_swiglu(x, w_gate_up, tiling, jax.default_backend() != "gpu")
