#!/usr/bin/env bash
# The small-scale replication on one GPU in one call: unpack the prepared `small` data, run
# `m3jax replicate` (stage 1 -> bank -> stage 2, control, ablation; evaluation of every arm), and
# leave the results and loss curves in RESULTS_DIR. Everything else (checkpoints, bank) stays in WORK.
#
#   PACKED=runs/small_packed RESULTS_DIR=$OUT launch/replicate_gpu.sh [--steps1=N --steps2=N ...]
#
# Make PACKED beforehand with `m3jax data prepare --config=small` and `m3jax data pack` (~35 MiB).
set -euo pipefail
PACKED=${PACKED:-runs/small_packed}
RESULTS_DIR=${RESULTS_DIR:-runs/replicate}
WORK=${WORK:-/tmp/m3jax_replicate}
PYTHON=${PYTHON:-python3}
TASKS=${TASKS:-arc_easy,arc_challenge,sciq,piqa}
mkdir -p "$RESULTS_DIR" "$WORK"
"$PYTHON" -m m3jax.cli data unpack --packed_dir="$PACKED" --data_dir="$WORK/data"
status=0
"$PYTHON" -m m3jax.cli replicate --config=small --data_dir="$WORK/data" --workdir="$WORK/run" \
  --tasks="$TASKS" --limit="${LIMIT:-200}" --output="$RESULTS_DIR/replication.json" "$@" || status=$?
for arm in stage1 two_stage control ablation; do  # loss curves, also from a run cut short
  if [ -f "$WORK/run/$arm/metrics.jsonl" ]; then cp "$WORK/run/$arm/metrics.jsonl" "$RESULTS_DIR/$arm.metrics.jsonl"; fi
done
exit "$status"
