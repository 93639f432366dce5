#!/usr/bin/env bash
# Train with several JAX processes on this machine (e.g. one per GPU, or CPU processes for testing):
# process i gets M3JAX_PROCESS_ID=i and all share a coordinator on localhost.
#   launch/local.sh --processes 2 --config configs/tiny.py --data runs/demo/data --workdir runs/local [--dry-run]
set -euo pipefail
source "$(dirname "$0")/_common.sh"
PROCESSES=2 PORT=12355 CONFIG="" DATA="" WORKDIR=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes) PROCESSES="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) die "unknown argument $1" ;;
  esac
done
for v in CONFIG DATA WORKDIR; do [[ -n "${!v}" ]] || die "--${v,,} is required"; done
PIDS=()
for ((i = 0; i < PROCESSES; i++)); do
  if [[ "$DRY_RUN" == 1 ]]; then
    run env M3JAX_COORDINATOR="localhost:$PORT" M3JAX_NUM_PROCESSES="$PROCESSES" M3JAX_PROCESS_ID="$i" \
      .venv/bin/m3jax train --distributed --config="$CONFIG" --data_dir="$DATA" --workdir="$WORKDIR"
  else
    M3JAX_COORDINATOR="localhost:$PORT" M3JAX_NUM_PROCESSES="$PROCESSES" M3JAX_PROCESS_ID="$i" \
      .venv/bin/m3jax train --distributed --config="$CONFIG" --data_dir="$DATA" --workdir="$WORKDIR" &
    PIDS+=($!)
  fi
done
for pid in "${PIDS[@]}"; do wait "$pid"; done
