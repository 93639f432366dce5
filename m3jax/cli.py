"""`m3jax` command line: `m3jax <command> --config=<file or name> [--config.section.field=value ...]`.

Commands:
  info   parameter counts, memory size per reference, sparsity and bank sizes of a config
  demo   what runs end to end today: write memories with a random-weight model and read them
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from m3jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (or a name in configs/: tiny, small, "
                                          "m3_0p92b, m3_2p4b); override fields with --config.model.x=y.")
flags.DEFINE_integer("seed", 0, "Random seed (demo).")

COMMANDS = {}


def command(fn):
    COMMANDS[fn.__name__] = fn
    return fn


@command
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


@command
def demo(cfg) -> None:
    """Write memories for random references and read them, with a random-weight model."""
    from m3jax.demo import run_demo

    run_demo(cfg, seed=flags.FLAGS.seed)


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
    logging.set_verbosity(logging.WARNING)  # keep JAX's backend-probing INFO lines off the console
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: m3jax <{'|'.join(COMMANDS)}> --config=<file or name> [--config.x=y]")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required (a file, or one of: tiny, small, m3_0p92b, m3_2p4b)")
    try:
        cfg = config_lib.validate(_CONFIG.value)
        COMMANDS[argv[1]](cfg)
    except (config_lib.ConfigError, ValueError) as e:
        print(f"m3jax {argv[1]}: error: {e}", file=sys.stderr)
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
