#!/usr/bin/env bash
# Train on a SLURM cluster of GPU nodes: one task per node, each driving all of its GPUs;
# jax.distributed.initialize() reads the SLURM environment.
#   launch/slurm.sh --nodes 4 --gpus-per-node 8 --partition gpu --config configs/m3_2p4b.py \
#     --data /shared/data --workdir /shared/runs/stage1 [--time 24:00:00] [--dry-run]
set -euo pipefail
source "$(dirname "$0")/_common.sh"
NODES=1 GPUS=8 PARTITION="" TIME="24:00:00" CONFIG="" DATA="" WORKDIR=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --gpus-per-node) GPUS="$2"; shift 2 ;;
    --partition) PARTITION="$2"; shift 2 ;;
    --time) TIME="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) die "unknown argument $1" ;;
  esac
done
for v in PARTITION CONFIG DATA WORKDIR; do [[ -n "${!v}" ]] || die "--${v,,} is required"; done
SCRIPT=$(cat <<BATCH
#!/usr/bin/env bash
#SBATCH --job-name=m3jax
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPUS
#SBATCH --partition=$PARTITION
#SBATCH --time=$TIME
export NCCL_NVLS_ENABLE=0
srun .venv/bin/m3jax train --distributed --config=$CONFIG --data_dir=$DATA --workdir=$WORKDIR
BATCH
)
if [[ "$DRY_RUN" == 1 ]]; then
  printf '%s\n' "$SCRIPT"
  echo "sbatch <the script above>"
else
  sbatch <<<"$SCRIPT"
fi
