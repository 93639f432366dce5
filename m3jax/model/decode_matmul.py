"""Matrix products with few rows (decoding: one token per sequence), as a Pallas Triton kernel on GPU.

A decoding step multiplies (batch, dim) activations by every weight matrix once, so its time is the
time to stream the weights from HBM. XLA's GEMMs reach ~1.5-1.9 TB/s of the H200's 4.8 at 32 rows
(benchmarks/RESULTS.md): an output of 3,200 columns in tiles of 128 gives 25 blocks for 132 SMs. This
kernel splits the reduction axis too (split-K), so every SM streams weights, and sums the f32 partial
products afterwards (XLA fuses that sum into whatever reads the product).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from m3jax.rounding import power_of_two_at_least

IMPLS = ("auto", "xla", "pallas")
MAX_ROWS = 64  # beyond this a GEMM is no longer weight-bound at batch sizes worth a custom kernel


class Tiling(NamedTuple):
    block_n: int  # output columns per block
    block_k: int  # reduction rows per loop step
    splits: int  # blocks along the reduction axis (partial sums added afterwards)
    num_warps: int = 4
    num_stages: int = 5


@functools.cache
def triton_available() -> bool:
    """Whether this JAX has Pallas' Triton backend, which the GPU kernels are written for (JAX is moving
    Pallas on GPU to Mosaic GPU; a release without Triton gets XLA's paths, not an ImportError mid-trace)."""
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, platform: str | None = None, what: str = "decode matmul") -> str:
    """`auto`: the Pallas kernel on GPU, XLA elsewhere (for the decode matmul and the decode attention)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown {what} {impl!r}; expected one of {IMPLS}")
    on_gpu = (platform or jax.default_backend()) == "gpu"
    if on_gpu and impl != "xla" and not triton_available():
        if impl == "pallas":
            raise ValueError(f"{what} 'pallas' needs Pallas' Triton backend (jax.experimental.pallas.triton), "
                             f"which this JAX {jax.__version__} lacks; use 'xla' or 'auto'")
        return "xla"
    if impl != "auto":
        return impl
    return "pallas" if on_gpu else "xla"


# Hopper's Programmatic Dependent Launch: XLA launches Pallas kernels with it, each waiting at its entry until
# the kernel before it has finished. A kernel that signals at its start lets the next kernel's blocks be
# scheduled while it runs (they still wait at their entry), so the next launch is hidden.
EARLY_LAUNCH = True


def early_launch(interpret: bool = False) -> bool:
    """Whether a decode kernel signals its dependents early: EARLY_LAUNCH, compiled (not `interpret`ed) for a GPU
    of compute capability 9.0 or later (griddepcontrol is Hopper's); read when a kernel is traced."""
    if interpret or not EARLY_LAUNCH or jax.default_backend() != "gpu" or not triton_available():
        return False
    try:
        return float(jax.devices()[0].compute_capability) >= 9.0
    except (AttributeError, TypeError, ValueError):
        return False


def launch_dependents():
    """Inside a kernel: `griddepcontrol.launch_dependents`. Returns 0.0 from the instruction: add it into an early
    value the kernel uses, so the instruction is kept and runs before that value is needed."""
    from jax.experimental.pallas import triton as plgpu

    (zero,) = plgpu.elementwise_inline_asm(
        "griddepcontrol.launch_dependents;\n\tmov.b32 $0, $1;", args=[jnp.zeros((16,), jnp.float32)],
        constraints="=f,f", pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct((16,), jnp.float32)])
    return jnp.sum(zero)


def dot_rows(m: int) -> int:
    """Rows a Triton kernel computes for m: a power of two >= 16 (Triton's tensor-core dot needs 16)."""
    return power_of_two_at_least(m, 16)


# Tilings timed inside a whole decoding step (benchmarks/decode_step_gpu.py, H200; RESULTS.md), keyed by
# (dot_rows(m), k, n); they beat the rule below there. m3_2p4b's fused q/k/v product at batch 32: 64
# columns a block (350 programs) instead of 128 (175: a second, partial wave on 132 SMs), ~1% of a step;
# with 2 warps and 4 stages, ~1% more (the other products lose with them).
TUNED = {(32, 3200, 4480): Tiling(64, 64, 5, num_warps=2, num_stages=4)}


def pick_tiling(m: int, k: int, n: int, blocks_wanted: int = 100, tuned: bool = True) -> Tiling | None:
    """A tiling for (m, k) @ (k, n), or None when the kernel does not fit the shape (XLA's dot then).

    blocks_wanted: the sweep of benchmarks/decode_matmul_gpu.py on an H200 (132 SMs) favoured 100-175
    blocks of 128 columns x 64-row steps: more splits cost more in partial sums than they gain.
    tuned: take a shape's measured tiling from TUNED where it has one.
    """
    if dot_rows(m) > MAX_ROWS:
        return None
    if tuned and (dot_rows(m), k, n) in TUNED:
        return TUNED[dot_rows(m), k, n]
    block_n = next((b for b in (128, 64, 32) if n % b == 0), None)
    block_k = next((b for b in (64, 32) if k % b == 0), None)
    if block_n is None or block_k is None:
        return None
    steps = k // block_k
    col_blocks = n // block_n
    # the fewest splits (fewest partial sums) that give enough blocks; splits divide the reduction steps
    divisors = [s for s in range(1, steps + 1) if steps % s == 0]
    splits = next((s for s in divisors if col_blocks * s >= blocks_wanted), divisors[-1])
    return Tiling(block_n, block_k, splits)


def power_of_two_parts(n: int) -> tuple[tuple[int, int], ...] | None:
    """(offset, size) power-of-two parts of n, each >= 16 (Triton's blocks are powers of two; its dot needs
    16); None when n is not a multiple of 16. 80 -> (0, 64), (64, 16)."""
    if n % 16 or n < 16:
        return None
    parts, offset = [], 0
    for bit in reversed(range(n.bit_length())):
        size = 1 << bit
        if n & size:
            parts.append((offset, size))
            offset += size
    return tuple(parts)


def float32_precision(dtype):
    """A decode product's precision for inputs of `dtype`: IEEE for float32 (the GPU default there is
    TF32, 10 mantissa bits, off by ~1e-3 from what float32 callers expect); the default for bf16."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _kernel(x_ref, w_ref, *refs, block_k: int, steps: int, signal: bool, ranges=(), programs: int = 0):
    from jax.experimental import pallas as pl

    from m3jax.model import l2_prefetch

    *next_refs, o_ref = refs
    precision = float32_precision(x_ref.dtype)

    def body(i, acc):
        ks = pl.ds(i * block_k, block_k)
        return acc + jnp.dot(x_ref[:, ks], w_ref[ks, :], preferred_element_type=jnp.float32, precision=precision)

    start = jnp.zeros(o_ref.shape, jnp.float32) + (launch_dependents() if signal else 0.0)
    acc = jax.lax.fori_loop(0, steps, body, start)
    if ranges:  # this program's share of a later product's first rows, once its own loads are done
        acc += l2_prefetch.prefetch(next_refs[0], ranges, programs, after=jnp.sum(acc))
    o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("tiling", "interpret", "ranges"))
def pallas_partials(x, w, tiling: Tiling, interpret: bool = False, prefetch=None, ranges=()):
    """x: (m, k) @ w: (k, n) as the kernel's f32 partial sums, (splits, dot_rows(m), n); rows past m are zero.
    interpret: run on any backend (tests on the CPU). prefetch, ranges: a 1-D array and (byte offset, bytes)
    ranges of it that the programs ask the L2 for as they finish (m3jax/model/l2_prefetch.py; Hopper only)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    from m3jax.model import l2_prefetch

    m, k = x.shape
    n = w.shape[1]
    rows = dot_rows(m)
    if rows != m:
        x = jnp.pad(x, ((0, rows - m), (0, 0)))
    bn, bk, s = tiling.block_n, tiling.block_k, tiling.splits
    part = k // s
    ranges, extra, extra_specs = l2_prefetch.operands(prefetch, ranges)
    return pl.pallas_call(
        functools.partial(_kernel, block_k=bk, steps=part // bk, signal=early_launch(interpret),
                          ranges=ranges, programs=(n // bn) * s),
        grid=(n // bn, s),
        in_specs=[pl.BlockSpec((rows, part), lambda j, i: (0, i)),
                  pl.BlockSpec((part, bn), lambda j, i: (i, j))] + extra_specs,
        out_specs=pl.BlockSpec((None, rows, bn), lambda j, i: (i, 0, j)),
        out_shape=jax.ShapeDtypeStruct((s, rows, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name="decode_matmul",
    )(x, w.astype(x.dtype), *extra)


@functools.partial(jax.jit, static_argnames=("tiling", "interpret", "out_dtype"))
def pallas_matmul(x, w, tiling: Tiling, interpret: bool = False, out_dtype=None):
    """x: (m, k) @ w: (k, n) -> (m, n) in out_dtype (default x's), accumulated in f32."""
    partials = pallas_partials(x, w, tiling, interpret)
    return partials.sum(axis=0)[:x.shape[0]].astype(out_dtype or x.dtype)


def partial_products(x, w, impl: str, next_weight=None):
    """x: (m, k) @ w: (k, n) as f32 partial sums (splits, rows >= m, n): summed over the first axis, rows
    [:m] are the product. The split-K kernel's sums are left to whatever reads the product (decode_norm
    adds them into the residual stream); XLA's dot gives one part. impl: as `decode_matmul`. next_weight:
    None, or the (k2, ...) weight of a product that reads this one's result next but one (after a small
    kernel): on Hopper the kernel's programs ask the L2 for its first rows as they finish (l2_prefetch)."""
    if x.ndim != 2 or w.ndim != 2 or w.shape[0] != x.shape[1]:
        raise ValueError(f"partial_products multiplies (m, k) by (k, n), got {x.shape} and {w.shape}")
    if impl not in ("xla", "pallas"):
        raise ValueError(f"unknown decode matmul {impl!r}; expected 'xla' or 'pallas'")
    tiling = pick_tiling(*x.shape, w.shape[1]) if impl == "pallas" else None
    if tiling is None:
        return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32,
                       precision=float32_precision(x.dtype))[None]
    from m3jax.model import l2_prefetch

    interpret = jax.default_backend() != "gpu"
    flat, ranges = l2_prefetch.plan(next_weight, x.shape[0], x.dtype, "product", interpret)
    return pallas_partials(x, w, tiling, interpret, flat, ranges)


def decode_matmul(x, w, impl: str, out_dtype=None, next_weight=None):
    """x: (..., k) @ w: (k, ...) -> (..., *w.shape[1:]) in out_dtype (default x's), f32 accumulation.

    impl: "xla" (jnp.dot), or "pallas" (the split-K kernel where its tiling fits the shape, XLA's dot
    otherwise; off GPU the kernel runs in Pallas' interpreter, for tests); resolve "auto" first.
    next_weight: as `partial_products`.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    if w.shape[0] != k:
        raise ValueError(f"cannot multiply (..., {k}) by {w.shape}")
    x2, w2 = x.reshape(-1, k), w.reshape(k, -1)
    y = partial_products(x2, w2, impl, next_weight).sum(axis=0)[:x2.shape[0]].astype(out_dtype or x.dtype)
    return y.reshape(*lead, *w.shape[1:])
