#!/usr/bin/env bash
# Train on a GKE TPU cluster through xpk: one workload, every host runs `m3jax train --distributed`.
#   launch/gke_xpk.sh --cluster c --workload m3-stage1 --type v5p-128 --slices 1 --image IMAGE \
#     --config configs/m3_2p4b.py --data gs://bucket/data --workdir gs://bucket/runs/stage1 [--dry-run]
#     [--skip-preflight]
# Before submitting, `m3jax compile` checks on this host that the steps fit one slice (pre-flight).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
CLUSTER="" WORKLOAD="" TYPE="" SLICES=1 IMAGE="" CONFIG="" DATA="" WORKDIR=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cluster) CLUSTER="$2"; shift 2 ;;
    --workload) WORKLOAD="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --slices) SLICES="$2"; shift 2 ;;
    --image) IMAGE="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --skip-preflight) SKIP_PREFLIGHT=1; shift ;;
    *) die "unknown argument $1" ;;
  esac
done
for v in CLUSTER WORKLOAD TYPE IMAGE CONFIG DATA WORKDIR; do [[ -n "${!v}" ]] || die "--${v,,} is required"; done
preflight "$CONFIG" "$TYPE"
run xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD" --tpu-type="$TYPE" --num-slices="$SLICES" \
  --docker-image="$IMAGE" \
  --command="m3jax train --distributed --config=$CONFIG --data_dir=$DATA --workdir=$WORKDIR"
