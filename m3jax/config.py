"""Configuration: the base ConfigDict every config file starts from, validation, and loading.

Config files in `configs/` call `base_config()` and override fields. `validate()` rejects impossible
shapes with a message naming the field, before any array is built. Decisions the paper leaves open
(SPEC "free choice") are documented next to their field.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re

import ml_collections

from m3jax.model.decode_attention import IMPLS as DECODE_ATTENTION_IMPLS
from m3jax.model.decode_matmul import IMPLS as DECODE_MATMUL_IMPLS

REMAT_POLICIES = (
    "none",  # no rematerialisation
    "nothing_saveable",  # full remat: recompute the whole layer in the backward pass
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "save_attention_projections",  # keep q/k/v/o projections, recompute the rest
)
ATTENTION_IMPLS = ("auto", "exact", "xla", "cudnn", "splash", "xla_split", "cudnn_split")
DTYPES = ("float32", "bfloat16", "float16")
HEAD_COMBINE = ("sum", "max")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def base_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.name = "base"

    m = cfg.model = ml_collections.ConfigDict()
    m.vocab_size = 60299  # real tokens
    m.vocab_multiple = 128  # embedding / LM head rows padded to a multiple of this (60299 -> 60416)
    m.num_layers = 44
    m.hidden_size = 3200
    m.num_heads = 40
    m.num_kv_heads = 8
    m.head_dim = 80
    m.mlp_dim = 3200
    m.rope_theta = 10000.0  # free choice (SPEC 2)
    m.norm_eps = 1e-5
    m.tie_embeddings = False  # free choice; untied like Llama, so export is a pure mapping
    m.init_std = 0.02
    m.dtype = "bfloat16"  # compute dtype
    m.param_dtype = "float32"
    m.remat = "nothing_saveable"
    m.scan_layers = True
    m.attention = "auto"  # auto: splash on TPU, cudnn_split on GPU (half precision), exact elsewhere
    m.decode_matmul = "auto"  # decoding's weight products; auto: split-K Pallas kernel on GPU, XLA elsewhere
    m.decode_attention = "auto"  # decoding's cache attention; auto: Pallas kernel on GPU, XLA elsewhere
    m.bos_id = 1
    m.pad_id = 0

    mem = cfg.memory = ml_collections.ConfigDict()
    # Memory layers are the contiguous range [layer_start, layer_start + num_layers). The paper uses
    # the first half (0..21 of 44); Remark 4 suggests the middle, which this range also expresses.
    mem.layer_start = 0
    mem.num_layers = 22
    mem.chunk_len = 64  # context tokens per retrieval chunk
    mem.refs_per_chunk = 5  # memories each chunk reads at inference
    mem.tokens_per_head = 8  # tokens kept per layer and KV head (sparsification)
    mem.reference_len = 128  # max tokens of a reference; also the shared position interval of memories
    # `<s>Reference:` as token ids: m3jax's SentencePiece vocabulary has `<s>` = 1 and the piece
    # `Reference:` = 4 (m3jax/data/tokenizer.py). It starts every reference and, followed by the plain
    # `<s>`, every context (the attention sink, SPEC 4).
    mem.reference_prefix_ids = (1, 4)
    mem.head_combine = "sum"  # free choice: how the query heads of one KV group combine their scores
    mem.train_refs_per_chunk = 1  # stage 2: each chunk retrieves 1 reference ...
    mem.train_window = 5  # ... and reads the memories of chunks c-4..c
    mem.grad_through_references = True
    # Leakage filter (SPEC 5): drop a retrieved reference whose overlap with the text exceeds this.
    mem.leak_threshold_train = 0.9
    mem.leak_threshold_eval = 2 / 3
    mem.vq_factory = "OPQ20x80-Residual2x14-PQ8x10"  # FAISS factory for quantized banks
    # Reference count of the paper's bank. The paper writes 1.1e8; its three bank sizes
    # (7.17 PiB / 45.9 TiB / 4.02 TiB) all imply 1.12e8, which is what is kept here.
    mem.bank_references = 112_000_000

    t = cfg.train = ml_collections.ConfigDict()
    t.stage = 1  # 1: warmup, plain LM; 2: continual train with memory (starts from a stage-1 checkpoint)
    t.stage2_memory = True  # False: stage 2's data and schedule without memory (the replication's control)
    t.data_start_step = 0  # read batches from this step of the data order on (continue past what stage 1 read)
    t.steps = 1000
    t.batch_size = 8  # global, in sequences
    t.accum_steps = 1  # micro-batches per step (gradient accumulation inside the step)
    t.lr = 6e-4  # peak; the paper: ~6-8e-4 in stage 1, ~5e-5 in stage 2
    t.warmup_steps = 100
    t.decay_fraction = 0.1  # warmup-stable-decay: the last 10% of steps decay linearly
    t.min_lr_ratio = 0.1
    t.b1, t.b2, t.eps = 0.9, 0.95, 1e-8
    t.weight_decay = 0.1
    t.decay_norms_and_embeddings = False
    t.clip_norm = 1.0
    t.mesh = (1, -1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices: FSDP by default
    t.sharding_rules = ()  # overrides of m3jax.sharding.DEFAULT_RULES, e.g. (("embed", None),) for no FSDP
    t.peak_tflops = 0.0  # bf16 peak per chip for MFU; 0: look the chip up (no MFU on unknown chips)
    t.seed = 0

    d = cfg.data = ml_collections.ConfigDict()
    d.seq_len = 2048
    d.heldout_fraction = 0.01  # of corpus documents, by a stable hash of the document id
    d.continual_sequences = None  # training sequences that get retrieved references for stage 2 (None: all)
    d.max_corpus_documents = None  # a prefix of the corpus (None: all); small configs use less
    d.max_knowledge_documents = None  # wiki summaries first, then dictionary entries (None: all)
    d.tokenizer_sentences = 2_000_000  # lines sampled to train the SentencePiece vocabulary
    d.seed = 0
    return cfg


def padded_vocab_size(model_cfg) -> int:
    k = model_cfg.vocab_multiple
    return -(-model_cfg.vocab_size // k) * k


def memory_layer_range(cfg) -> range:
    return range(cfg.memory.layer_start, cfg.memory.layer_start + cfg.memory.num_layers)


def sink_len(cfg) -> int:
    """Tokens in front of every context: `<s>Reference:` then the plain `<s>`."""
    return len(cfg.memory.reference_prefix_ids) + 1


def _positive(cfg, path: str) -> None:
    value = cfg
    for part in path.split("."):
        value = value[part]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{path} must be a positive integer, got {value!r}")


def validate(cfg) -> ml_collections.ConfigDict:
    """Raise ConfigError naming the field if `cfg` cannot build a working model; return cfg."""
    for section in ("model", "memory", "data", "train"):
        if section not in cfg:
            raise ConfigError(f"config has no '{section}' section")
    m, mem = cfg.model, cfg.memory
    for f in ("vocab_size", "vocab_multiple", "num_layers", "hidden_size", "num_heads", "num_kv_heads",
              "head_dim", "mlp_dim"):
        _positive(cfg, f"model.{f}")
    for f in ("chunk_len", "refs_per_chunk", "tokens_per_head", "reference_len", "train_refs_per_chunk",
              "train_window"):
        _positive(cfg, f"memory.{f}")
    _positive(cfg, "data.seq_len")
    tr = cfg.train
    if tr.stage not in (1, 2):
        raise ConfigError(f"train.stage must be 1 (warmup) or 2 (continual train with memory), got {tr.stage!r}")
    for f in ("steps", "batch_size", "accum_steps"):
        _positive(cfg, f"train.{f}")
    if tr.batch_size % tr.accum_steps:
        raise ConfigError(f"train.accum_steps ({tr.accum_steps}) must divide train.batch_size ({tr.batch_size})")
    if len(tuple(tr.mesh)) != 3:
        raise ConfigError(f"train.mesh must have 3 axes (data, fsdp, tensor), got {tuple(tr.mesh)}")
    if not 0 <= tr.decay_fraction <= 1 or tr.lr <= 0 or tr.warmup_steps < 0:
        raise ConfigError("train.lr must be > 0, train.warmup_steps >= 0, train.decay_fraction in [0, 1]")
    if not 0 < cfg.data.heldout_fraction < 1:
        raise ConfigError(f"data.heldout_fraction must be in (0, 1), got {cfg.data.heldout_fraction}")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(f"model.num_heads ({m.num_heads}) must be divisible by model.num_kv_heads "
                          f"({m.num_kv_heads}): each KV head serves a whole group of query heads")
    if m.head_dim % 2:
        raise ConfigError(f"model.head_dim ({m.head_dim}) must be even for RoPE")
    if m.rope_theta <= 0 or m.norm_eps <= 0 or m.init_std <= 0:
        raise ConfigError("model.rope_theta, model.norm_eps and model.init_std must be positive")
    for f, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES), ("remat", REMAT_POLICIES),
                       ("attention", ATTENTION_IMPLS), ("decode_matmul", DECODE_MATMUL_IMPLS),
                       ("decode_attention", DECODE_ATTENTION_IMPLS)):
        if m[f] not in allowed:
            raise ConfigError(f"model.{f} is {m[f]!r}; expected one of {', '.join(allowed)}")
    for f in ("leak_threshold_train", "leak_threshold_eval"):
        if not 0 < mem[f] <= 1:
            raise ConfigError(f"memory.{f} must be in (0, 1], got {mem[f]}")
    if mem.head_combine not in HEAD_COMBINE:
        raise ConfigError(f"memory.head_combine is {mem.head_combine!r}; expected one of {HEAD_COMBINE}")
    if mem.layer_start < 0 or mem.num_layers < 0:
        raise ConfigError("memory.layer_start and memory.num_layers must be >= 0")
    if mem.layer_start + mem.num_layers > m.num_layers:
        raise ConfigError(f"memory layers {mem.layer_start}..{mem.layer_start + mem.num_layers - 1} "
                          f"(memory.layer_start={mem.layer_start}, memory.num_layers={mem.num_layers}) "
                          f"go beyond the stack of model.num_layers={m.num_layers}")
    if cfg.data.seq_len % mem.chunk_len:
        raise ConfigError(f"memory.chunk_len ({mem.chunk_len}) must divide data.seq_len "
                          f"({cfg.data.seq_len})")
    if mem.tokens_per_head > mem.reference_len:
        raise ConfigError(f"memory.tokens_per_head ({mem.tokens_per_head}) exceeds memory.reference_len "
                          f"({mem.reference_len})")
    opq = re.match(r"OPQ\d+[x_](\d+)", mem.vq_factory)
    if opq and int(opq.group(1)) != m.head_dim:
        raise ConfigError(f"memory.vq_factory {mem.vq_factory!r} rotates {opq.group(1)}-dim vectors, but memory "
                          f"vectors have model.head_dim={m.head_dim}")
    ids = tuple(mem.reference_prefix_ids)
    if not ids or ids[0] != m.bos_id:
        raise ConfigError(f"memory.reference_prefix_ids {ids} must start with model.bos_id ({m.bos_id})")
    for name, tok in [("model.bos_id", m.bos_id), ("model.pad_id", m.pad_id)] + [
            (f"memory.reference_prefix_ids[{i}]", t) for i, t in enumerate(ids)]:
        if not 0 <= tok < m.vocab_size:
            raise ConfigError(f"{name} = {tok} is outside the vocabulary [0, {m.vocab_size})")
    return cfg


def load(path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """Load `get_config()` from a config file (or a name in configs/), apply overrides, validate."""
    file = resolve_path(path)
    spec = importlib.util.spec_from_file_location(f"_m3jax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    for key, value in (overrides or {}).items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"unknown config field {key!r}")
        node[leaf] = value
    return validate(cfg)


def configs_dir() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parent.parent / "configs"


def resolve_path(path: str) -> pathlib.Path:
    """A config file path, or a bare name of a file in configs/ (`tiny`, `m3_2p4b`)."""
    p = pathlib.Path(path)
    if p.is_file():
        return p
    named = configs_dir() / (p.name if p.suffix == ".py" else p.name + ".py")
    if named.is_file():
        return named
    names = sorted(f.stem for f in configs_dir().glob("*.py") if not f.stem.startswith("_"))
    raise ConfigError(f"no config file {path!r}; built-in configs: {', '.join(names)}")


def to_json(cfg) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)


def save_resolved(cfg, directory: str | os.PathLike) -> pathlib.Path:
    out = pathlib.Path(directory) / "config.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # per process: all processes of a multi-process run write it
    tmp.write_text(to_json(cfg))
    tmp.replace(out)  # atomic: a crash never leaves a half-written config
    return out
