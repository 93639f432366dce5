#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (unless it exists), set up m3jax on every worker, run
# `m3jax train` on all workers at once (one JAX process per host; jax.distributed finds its peers).
#   launch/tpu_vm.sh --name m3 --zone us-east5-a --type v5p-128 --config configs/m3_2p4b.py \
#     --data gs://bucket/data --workdir gs://bucket/runs/stage1 --repo GIT_URL [--create] [--dry-run]
#     [--skip-preflight] [-- extra train flags]
# Before anything else, `m3jax compile` checks on this host that the steps fit the slice (pre-flight).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
NAME="" ZONE="" TYPE="" VERSION="v2-alpha-tpuv5" CONFIG="" DATA="" WORKDIR="" CREATE=0 REPO=""
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --repo) REPO="$2"; shift 2 ;;
    --create) CREATE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --skip-preflight) SKIP_PREFLIGHT=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument $1" ;;
  esac
done
for v in NAME ZONE TYPE CONFIG DATA WORKDIR REPO; do [[ -n "${!v}" ]] || die "--${v,,} is required"; done

OVERRIDES=()
for arg in "${EXTRA[@]}"; do [[ "$arg" == --config.* ]] && OVERRIDES+=("$arg"); done
preflight "$CONFIG" "$TYPE" "${OVERRIDES[@]}"
if [[ "$CREATE" == 1 ]]; then
  run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$TYPE" --version="$VERSION"
fi
SETUP="test -d m3jax || git clone $REPO m3jax; cd m3jax && git pull --ff-only && make setup"
TRAIN="cd m3jax && .venv/bin/m3jax train --distributed --config=$CONFIG --data_dir=$DATA --workdir=$WORKDIR ${EXTRA[*]}"
run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$SETUP"
run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$TRAIN"
