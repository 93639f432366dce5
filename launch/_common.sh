#!/usr/bin/env bash
# Shared by the launchers: --dry-run handling. Each launcher builds its commands as arrays and hands
# them to `run`, which prints them (dry run) or executes them.
DRY_RUN=0

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
