#!/usr/bin/env bash
# One device call that times and checks generation's prefill with the sink apart on one GPU: the attention
# call alone, decoding throughput with both prefills alternating, the jitted prefill both ways, then the
# GPU-only tests of its kernels (cuDNN + the memory merge). Each step is bounded so that
# the whole fits a 600 s call; what a step prints goes to $OUT/<step>.log (and decode.json), and a
# step's exit status is printed, so a late failure keeps the earlier figures.
#   benchmarks/sink_apart_gpu.sh            (OUT defaults to ./sink_apart_out)
# The GPU image lacks ml_collections, bm25s and pytest: carry their wheels in .whl/ and install them first,
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site:$PWD
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="$(mkdir -p "${OUT:-sink_apart_out}" && cd "${OUT:-sink_apart_out}" && pwd)"
PY="${PYTHON:-python}"
[[ "$PY" == */* ]] && PY="$(realpath "$PY")"  # the benchmarks run from benchmarks/

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, show its tail
  local name="$1" limit="$2"
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0)) s"
  grep -v -E '^(WARNING|E0000|I0000)' "$OUT/$name.log" | tail -n 12
}

export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
(cd benchmarks && step prefill_attention 60 "$PY" prefill_attention_gpu.py --lengths 128,136 --pad "")
(cd benchmarks && step decode 240 "$PY" decode_gpu.py --json "$OUT/decode.json" --compare_sink)
(cd benchmarks && step prefill 90 "$PY" prefill_gpu.py --memory --compare_sink)
# last: the GPU's compilations make these slow (over 150 s); -v names each result as it comes, should time run out
step tests "${TESTS_LIMIT:-200}" "$PY" -m pytest -v --tb=short -p no:cacheprovider -k "sink or split or recomputation" \
  tests/test_memory_merge.py tests/test_model.py tests/test_generate.py
