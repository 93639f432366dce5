"""`m3jax compile`: compile the sharded steps for a TPU slice on this (CPU) host and say whether they fit.

For each step (stage-1 train, stage-2 train, generation) the model and train state are built
abstractly (shapes and shardings only), the jitted step is lowered for the slice's compile-only
devices and compiled by libtpu's XLA, and its per-chip memory and FLOPs are read from the compiled
executable. Nothing runs and no array is allocated. A step that does not fit fails to compile on
TPU (XLA's "ran out of memory in hbm"); that is reported as a verdict, not as a crash.

The generation step is one decoding step (`Memory3.decode_step`: one token per row against a KV cache
of a full sequence, reading `refs_per_chunk` memories) when the model has it; otherwise a forward pass
over a full sequence with memory stands in for it, and the report says so.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding

from m3jax import config as config_lib
from m3jax import sharding
from m3jax.aot import topology
from m3jax.generate.generator import cache_len
from m3jax.model.attention import resolve_impl
from m3jax.model.lm import Memory3, MemoryInputs
from m3jax.train.metrics import flops_per_token
from m3jax.train.optimizer import make_optimizer
from m3jax.train.step import make_train_step


@dataclasses.dataclass
class StepReport:
    name: str
    fits: bool
    arguments: int = 0  # bytes per chip
    outputs: int = 0  # not aliased to (donated) arguments
    temporaries: int = 0
    code: int = 0
    flops: float = 0.0  # per chip, XLA's cost analysis: a scanned (while-loop) layer is counted once
    model_flops: float = 0.0  # per step, all chips: 6 x dense parameters x tokens + attention (train steps)
    seconds: float = 0.0  # compile time
    note: str = ""

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries + self.code


def target_config(cfg, tpu_slice: topology.Slice, stage: int):
    """A copy of cfg for one stage on TPU: `auto` attention resolved for TPU (the host is a CPU)."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.train.stage = stage
    cfg.model.attention = resolve_impl(cfg.model.attention, cfg.model.dtype, "tpu")
    return config_lib.validate(cfg)


def _abstract(shape, dtype, sh):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)


def _train_args(cfg, mesh):
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Memory3(cfg, rngs=nnx.Rngs(0))))
    tx, schedule = make_optimizer(cfg.train, params)
    step_fn, state_sh, batch_sh = make_train_step(cfg, graphdef, params, tx, schedule, mesh)
    shapes = jax.eval_shape(lambda: {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)})
    state = jax.tree.map(lambda x, s: _abstract(x.shape, x.dtype, s), shapes, state_sh)
    b, t, mem = cfg.train.batch_size, cfg.data.seq_len, cfg.memory
    batch = {"tokens": _abstract((b, t), jnp.int32, batch_sh)}
    if cfg.train.stage == 2:
        chunks = t // mem.chunk_len
        batch["ref_tokens"] = _abstract((b, chunks, mem.reference_len), jnp.int32, batch_sh)
        batch["ref_lengths"] = _abstract((b, chunks), jnp.int32, batch_sh)
    return step_fn, (state, batch)


def _by_rank(mesh, rules, names_by_rank):
    """A sharding function for arrays whose axes are named by rank (layers, batch, ... as the cache)."""
    def sh(x):
        return NamedSharding(mesh, sharding.logical_to_spec(names_by_rank[x.ndim], rules))
    return sh


def _inference_args(cfg, mesh, batch: int):
    """The generation step and its abstract arguments; (fn, args, note)."""
    rules = sharding.rules_with(cfg.train.sharding_rules)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Memory3(cfg, rngs=nnx.Rngs(0))))
    with sharding.activate(mesh, rules):
        param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), nnx.get_partition_spec(params))
    state = jax.tree.map(lambda x, s: _abstract(x.shape, x.dtype, s), params, param_sh)
    m, mem, t = cfg.model, cfg.memory, cfg.data.seq_len
    rows = NamedSharding(mesh, sharding.logical_to_spec(("act_batch",), rules))
    refs, k = mem.refs_per_chunk, mem.tokens_per_head
    kv_names = {1: ("act_batch",), 2: ("act_batch", None), 3: ("act_batch", None, None),
                5: ("layers", "act_batch", None, "act_kv_heads", None),
                7: ("act_batch", None, None, None, "act_kv_heads", None, None),
                8: ("act_batch", None, None, None, None, "act_kv_heads", None, None)}
    sh = _by_rank(mesh, rules, kv_names)
    if hasattr(Memory3, "decode_step") and hasattr(Memory3, "prefill"):
        positions = cache_len(cfg, t, 0)  # a whole context, prompt and new tokens, as Generator allocates it
        tokens = jax.ShapeDtypeStruct((batch, t), jnp.int32)
        cache = jax.eval_shape(lambda p, x: nnx.merge(graphdef, p).prefill(x, cache_len=positions,
                                                                          memory_slots=refs * k)[1], params, tokens)
        cache = jax.tree.map(lambda x: _abstract(x.shape, x.dtype, sh(x)), cache)
        mem_kv = _abstract((batch, refs, mem.num_layers, 2, m.num_kv_heads, k, m.head_dim), jnp.dtype(m.dtype),
                           sh(jax.ShapeDtypeStruct((0,) * 7, jnp.int8)))
        mem_valid = _abstract((batch, refs, k), jnp.bool_, rows)

        def decode(state, cache, token, write_at, mem_kv, mem_valid):
            with sharding.constraints(mesh, rules):
                model = nnx.merge(graphdef, state)
                cache, memory_valid = model.load_memory(cache, mem_kv, mem_valid)
                return model.decode_step(token, write_at, cache, memory_valid)

        args = (state, cache, _abstract((batch,), jnp.int32, rows), _abstract((batch,), jnp.int32, rows),
                mem_kv, mem_valid)
        fn = jax.jit(decode, donate_argnums=1)
        return fn, args, f"one decoding step, batch {batch}, KV cache of {positions} positions, {refs} memories"
    chunks = t // mem.chunk_len
    kv = _abstract((batch, chunks, refs, mem.num_layers, 2, m.num_kv_heads, k, m.head_dim), jnp.dtype(m.dtype),
                   sh(jax.ShapeDtypeStruct((0,) * 8, jnp.int8)))
    valid = _abstract((batch, chunks, refs, k), jnp.bool_, rows)

    def forward(state, tokens, kv, valid):
        with sharding.constraints(mesh, rules):
            return nnx.merge(graphdef, state)(tokens, memory=MemoryInputs(kv, valid))

    args = (state, _abstract((batch, t), jnp.int32, rows), kv, valid)
    return jax.jit(forward), args, f"a forward pass over {batch} x {t} tokens with memory (no decode step yet)"


def _compile(name, fn, args, note="") -> StepReport:
    start = time.perf_counter()
    try:
        compiled = fn.lower(*args).compile()
    except Exception as e:  # XLA:TPU refuses programs that exceed HBM at compile time
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
            first = next((line for line in text.splitlines() if "memory" in line.lower()), text.splitlines()[0])
            return StepReport(name, False, seconds=time.perf_counter() - start, note=first.strip()[:300])
        raise
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return StepReport(name, True, arguments=mem.argument_size_in_bytes,
                      outputs=mem.output_size_in_bytes - mem.alias_size_in_bytes, temporaries=mem.temp_size_in_bytes,
                      code=mem.generated_code_size_in_bytes, flops=float((cost or {}).get("flops", 0.0)),
                      seconds=time.perf_counter() - start, note=note)


def check(cfg, slice_name: str, *, steps=("stage1", "stage2", "generate"), decode_batch: int = 0):
    """Compile the steps for the slice; returns (slice, mesh, [StepReport])."""
    tpu_slice = topology.parse(slice_name)
    devices = topology.devices(tpu_slice)
    mesh = sharding.make_mesh(tuple(cfg.train.mesh), devices=devices)
    reports = []
    for name in steps:
        stage = 2 if name == "stage2" else 1
        step_cfg = target_config(cfg, tpu_slice, stage)
        if name == "generate":
            shards = _shards(mesh, sharding.rules_with(step_cfg.train.sharding_rules), "act_batch")
            batch = decode_batch or -(-32 // shards) * shards  # the paper's decoding batch of 32, or one row per shard
            fn, args, note = _inference_args(step_cfg, mesh, batch)
            reports.append(_compile(name, fn, args, note))
        else:
            fn, args = _train_args(step_cfg, mesh)
            t = step_cfg.train
            report = _compile(name, fn, args, f"batch {t.batch_size} x {step_cfg.data.seq_len} tokens, "
                                              f"{t.accum_steps} micro-batches, remat {step_cfg.model.remat}")
            report.model_flops = flops_per_token(step_cfg) * t.batch_size * step_cfg.data.seq_len
            reports.append(report)
    return tpu_slice, mesh, reports


def _shards(mesh, rules, logical: str) -> int:
    axes = dict(rules)[logical]
    names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    n = 1
    for a in names:
        n *= mesh.shape[a]
    return n


def _gib(n: float) -> str:
    return f"{n / topology.GiB:8.2f} GiB"


def report_lines(cfg, tpu_slice, mesh, reports) -> list[str]:
    hbm, peak = tpu_slice.generation.hbm_bytes, tpu_slice.generation.peak_bf16_tflops * 1e12
    rules = sharding.rules_with(cfg.train.sharding_rules)
    attention = resolve_impl(cfg.model.attention, cfg.model.dtype, "tpu")
    head = (f"{cfg.name} on {tpu_slice.name} ({tpu_slice.topology}, {tpu_slice.chips} chips, "
            f"{hbm / topology.GiB:.0f} GiB HBM per chip), attention {attention}")
    params = ", ".join(f"{k}->{v}" for k, v in rules if v is not None and not k.startswith("act_"))
    axes = ", ".join(f"{a}={n}" for a, n in mesh.shape.items())
    lines = [head, f"mesh {axes}; parameters: {params}; activations: batch->{dict(rules)['act_batch']}"]
    for r in reports:
        if not r.fits:
            lines.append(f"{r.name:9s} DOES NOT FIT: {r.note}")
            continue
        verdict = "fits" if r.total <= hbm else "DOES NOT FIT"
        lines.append(f"{r.name:9s} {verdict}: total {_gib(r.total)} of {hbm / topology.GiB:.0f} GiB per chip "
                     f"({100 * r.total / hbm:.0f}%) = arguments {_gib(r.arguments)} + outputs {_gib(r.outputs)} + "
                     f"temporaries {_gib(r.temporaries)} + code {_gib(r.code)}; compiled in {r.seconds:.0f} s")
        if r.model_flops:
            per_chip = r.model_flops / tpu_slice.chips
            lines.append(f"{'':9s} model FLOPs per step {r.model_flops / 1e15:.1f} PFLOP = {per_chip / 1e12:.0f} TFLOP "
                         f"per chip (6N + attention, the stage-1 count): >= {per_chip / peak:.2f} s per step at "
                         f"the chip's {peak / 1e12:.0f} TFLOP/s bf16 peak")
        lines.append(f"{'':9s} XLA cost analysis: {r.flops / 1e12:.2f} TFLOP per chip (a scanned layer counted once)")
        if r.note:
            lines.append(f"{'':9s} ({r.note})")
    return lines


def all_fit(tpu_slice, reports) -> bool:
    return all(r.fits and r.total <= tpu_slice.generation.hbm_bytes for r in reports)
