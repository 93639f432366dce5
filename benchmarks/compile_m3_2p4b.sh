#!/usr/bin/env bash
# Memory3-2.4B on a v5p slice with the paper's ~4M-token global batch (2048 sequences of 2048 tokens),
# compiled ahead of time on this CPU host (needs libtpu, no TPU): does each step fit the chips' HBM, and
# with which remat policy? Prints `m3jax compile`'s report for each policy tried; the weaker policies come
# first to show where the limit is. A full run takes ~10-20 minutes on a 2-core CPU (a few minutes a step).
#   benchmarks/compile_m3_2p4b.sh [SLICE] [REMAT ...]     (default: v5p-128, nothing_saveable)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
SLICE="${1:-v5p-128}"
shift || true
POLICIES=("${@:-nothing_saveable}")
M3JAX="${M3JAX:-.venv/bin/m3jax}"
for remat in "${POLICIES[@]}"; do
  echo "== m3_2p4b on $SLICE, batch 2048 x 2048 tokens, remat $remat"
  JAX_PLATFORMS=cpu "$M3JAX" compile --config=m3_2p4b --topology="$SLICE" \
    --config.train.batch_size=2048 --config.train.accum_steps=1 --config.model.remat="$remat" 2>&1 \
    | grep -v -E '^(WARNING|E0000|=== Source|learning/|Failed to find host bounds)'
  echo "exit status ${PIPESTATUS[0]}"
done
