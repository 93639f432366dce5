#!/usr/bin/env bash
# Shared by the launchers: --dry-run handling. Each launcher builds its commands as arrays and hands
# them to `run`, which prints them (dry run) or executes them.
DRY_RUN=0
SKIP_PREFLIGHT=0

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q' "$1"
    shift
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# Pre-flight for TPU launchers: compile the sharded steps for the slice on this host (needs libtpu, no
# TPU) and stop before any TPU is created or used when they do not fit. Usage: preflight CONFIG TYPE
# [--config.x=y ...]; --skip-preflight skips it.
preflight() {
  [[ "$SKIP_PREFLIGHT" == 1 ]] && return 0
  local config="$1" type="$2"
  shift 2
  run env JAX_PLATFORMS=cpu .venv/bin/m3jax compile --config="$config" --topology="$type" "$@" \
    || die "pre-flight: $config does not compile or fit on $type (see above); --skip-preflight to go on anyway"
}
