#!/usr/bin/env bash
# The prepared device check of issue 26: one JSON line per part, each part under its own
# timeout, so one failure or hang does not lose the others. On one H100, from a fresh machine
# with the repository (and its .venv) carried, the whole script stays under 8 minutes:
# the per-part limits below add up to 450 s plus start-up.
#
#   benchmarks/gpu_check.sh [--tiny] [--out FILE]     (default FILE: gpu_check.jsonl)
#
# --tiny: a few images and small models on the CPU, in seconds (tests/test_gpu_check.py
# runs it in CI). Parts: cuda_tests, pgd, absld, compile, aa, nccl, ort, resume.
set -u
cd "$(dirname "$0")/.."
TINY=""
OUT="gpu_check.jsonl"
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY="--tiny"; shift ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "usage: benchmarks/gpu_check.sh [--tiny] [--out FILE]" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
TORCHRUN="$(dirname "$PY")/torchrun"
[ -x "$TORCHRUN" ] || TORCHRUN="$PY -m torch.distributed.run"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
: > "$OUT"

# part NAME LIMIT_S COMMAND...: run it under `timeout`; a part that dies without printing its
# JSON line gets one written for it (exit code, timeout or not).
part() {
  local name="$1" limit="$2"; shift 2
  local log; log="$(mktemp)"
  timeout --kill-after=10 "$limit" "$@" > "$log" 2> "$log.err"
  local rc=$?
  local line; line="$(grep '^{' "$log" | tail -n 1)"
  if [ -n "$line" ]; then
    echo "$line" >> "$OUT"
  else
    local why="exit $rc"; [ "$rc" = 124 ] || [ "$rc" = 137 ] && why="timed out after ${limit}s"
    local tail_err; tail_err="$(tail -c 300 "$log.err" | tr '\n"\\' '  /')"
    echo "{\"part\": \"$name\", \"ok\": false, \"error\": \"$why: $tail_err\"}" >> "$OUT"
  fi
  rm -f "$log" "$log.err"
}

# Limits (s) of: cuda_tests pgd absld compile aa nccl ort resume; 450 in all on a GPU.
if [ -n "$TINY" ]; then L=(60 60 60 60 60 60 60 60); else L=(100 50 80 80 50 30 30 30); fi

# The CUDA tests (skipped without CUDA) and the virtual-CUDA tests, summarised as one line.
cuda_tests() {
  local t0 summary rc
  t0=$(date +%s.%N)
  summary="$("$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tail -n 1)"
  rc=$?
  local seconds; seconds=$(echo "$(date +%s.%N) - $t0" | bc 2>/dev/null || echo null)
  local passed failed skipped
  passed=$(echo "$summary" | grep -o '[0-9]* passed' | grep -o '[0-9]*' || true)
  failed=$(echo "$summary" | grep -o '[0-9]* failed' | grep -o '[0-9]*' || true)
  skipped=$(echo "$summary" | grep -o '[0-9]* skipped' | grep -o '[0-9]*' || true)
  local ok=true; [ -n "$failed" ] && ok=false
  echo "{\"part\": \"cuda_tests\", \"ok\": $ok, \"passed\": ${passed:-0}, \"failed\": ${failed:-0}, \"skipped\": ${skipped:-0}, \"seconds\": ${seconds:-null}, \"summary\": \"$(echo "$summary" | tr '"' ' ')\"}"
}
export -f cuda_tests
export PY

part cuda_tests "${L[0]}" bash -c cuda_tests
part pgd        "${L[1]}" "$PY" benchmarks/gpu_check.py pgd $TINY
part absld      "${L[2]}" "$PY" benchmarks/gpu_check.py absld $TINY
part compile    "${L[3]}" "$PY" benchmarks/gpu_check.py compile $TINY
part aa         "${L[4]}" "$PY" benchmarks/gpu_check.py aa $TINY
part nccl       "${L[5]}" $TORCHRUN --nproc-per-node 1 --master-addr 127.0.0.1 --master-port 29533 \
                          benchmarks/gpu_check.py nccl $TINY
part ort        "${L[6]}" "$PY" benchmarks/gpu_check.py ort $TINY
part resume     "${L[7]}" "$PY" benchmarks/gpu_check.py resume $TINY

cat "$OUT"
# Exit 0 when every part reported ok.
! grep -q '"ok": false' "$OUT"
