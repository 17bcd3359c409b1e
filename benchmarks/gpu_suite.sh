#!/usr/bin/env bash
# The GPU suite: what a session lent one H100/H200 runs first, in one call, in < 8 minutes.
#
#   benchmarks/gpu_suite.sh            # on the GPU machine, from anywhere
#   benchmarks/gpu_suite.sh --smoke    # CPU (JAX_PLATFORMS=cpu), toy shapes, < 2 minutes
#   OUT=/some/dir benchmarks/gpu_suite.sh
#
# Steps, each with its own timeout and log file in the output folder:
#   preflight    jax version and devices; on a GPU run, fails (and skips the rest) if JAX
#                does not see a GPU
#   pallas_check benchmarks/pallas_check.py: Pallas GPU kernels (block-sparse matmul, its
#                compact-weight products and attention) against their dense masked oracles,
#                values and gradients, fp32 and bf16 -> pallas_check.md
#   bsmm_bench   benchmarks/block_sparse_matmul.py at M=16384 K=N=4096 B=128, densities
#                1.0,0.25,0.125,0.1, bf16, dense and compact layouts (compact n/a at 0.1,
#                whose columns hold unequal counts) -> block_sparse_matmul.txt
#   step_speed   benchmarks/step_speed.py, gpt2-small dense vs sparse_pretrain 87.5% (both layouts)
#                -> step_speed.md (reported as skipped if the script does not exist)
# A failing step does not stop the next one. The output folder is $OUT if set, else
# benchmarks/results/gpu_<date>/ (smoke: $TMPDIR/gpu_suite_smoke_<date>/); it gets one
# <step>.log per step and summary.md. Exit status 0 only if every step that ran passed
# (a timeout is a failure; a skipped step is not).
#
# Environment overrides (a rerun can trim a step that ran out of time):
#   PYTHON (python), SUITE_TIMEOUT_CHECK / _BENCH / _STEP (150 s each), SUITE_DEADLINE
#   (465 s for the whole suite; a step gets at most what is left of it),
#   SUITE_BSMM_BACKENDS (masked,pallas_gpu,xla), SUITE_BSMM_REPS (5), SUITE_STEPS (10),
#   SUITE_SKIP (comma list of steps to skip, e.g. step_speed).
set -u

SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument '$arg' (use --smoke or nothing)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATE="$(date +%Y-%m-%d)"
if [ -n "${OUT:-}" ]; then
  OUT_DIR="$OUT"
elif [ "$SMOKE" = 1 ]; then
  OUT_DIR="${TMPDIR:-/tmp}/gpu_suite_smoke_$DATE"
else
  OUT_DIR="$ROOT/benchmarks/results/gpu_$DATE"
fi
mkdir -p "$OUT_DIR" || { echo "gpu_suite.sh: cannot create $OUT_DIR" >&2; exit 2; }
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$ROOT" || exit 2

PY="${PYTHON:-python}"
T_CHECK="${SUITE_TIMEOUT_CHECK:-150}"
T_BENCH="${SUITE_TIMEOUT_BENCH:-150}"
T_STEP="${SUITE_TIMEOUT_STEP:-150}"
DEADLINE="${SUITE_DEADLINE:-465}"   # the whole suite, seconds: under 8 minutes
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
if [ "$SMOKE" = 1 ]; then
  export JAX_PLATFORMS=cpu
  # Toy programs: compile time dominates, and optimisation level 0 compiles faster.
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
  SMOKE_FLAG=(--smoke)
else
  # Allocate on demand: the reference products and the kernels run in one process, and a
  # failed allocation should name its size rather than hit a 75% pre-allocated pool.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  SMOKE_FLAG=()
fi

NAMES=() STATUS=() RCS=() SECS=()
FAILED=0

# run_step NAME TIMEOUT_S CMD...: runs CMD with a timeout, logs to $OUT_DIR/NAME.log.
run_step() {
  local name="$1" limit="$2"; shift 2
  local log="$OUT_DIR/$name.log" t0 rc status left
  # Never past the suite's deadline: a step gets what is left of it (less the kill grace).
  left=$(( DEADLINE - ($(date +%s) - START) - 5 ))
  if [ "$left" -lt 15 ]; then
    NAMES+=("$name"); STATUS+=("FAIL: no time left (SUITE_DEADLINE=${DEADLINE}s)")
    RCS+=("-"); SECS+=("0"); FAILED=1
    echo "[gpu_suite] $name: no time left"; return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "[gpu_suite] $name (timeout ${limit}s): $(printf '%s ' "$@" | tr '\n' ' ' | cut -c1-200)"
  t0=$(date +%s)
  { echo "\$ $*"; echo; } > "$log"
  timeout -k 5 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  case "$rc" in
    0) status="ok" ;;
    124|137) status="TIMEOUT after ${limit}s"; FAILED=1 ;;
    *) status="FAIL"; FAILED=1 ;;
  esac
  NAMES+=("$name"); STATUS+=("$status"); RCS+=("$rc"); SECS+=("$(( $(date +%s) - t0 ))")
  echo "[gpu_suite] $name: $status (rc $rc, ${SECS[-1]} s, log $log)"
}

# wanted NAME: false (and records the skip) if NAME is in $SUITE_SKIP.
wanted() {
  case ",${SUITE_SKIP:-}," in
    *",$1,"*) skip_step "$1" "in SUITE_SKIP"; return 1 ;;
  esac
}

skip_step() {
  NAMES+=("$1"); STATUS+=("skipped: $2"); RCS+=("-"); SECS+=("0")
  echo "[gpu_suite] $1: skipped: $2"
}

START=$(date +%s)
echo "[gpu_suite] output folder $OUT_DIR ($([ "$SMOKE" = 1 ] && echo smoke || echo GPU) run)"

# 1. Preflight: versions and devices; a GPU run without a GPU would only time out later.
if [ "$SMOKE" = 1 ]; then WANT=cpu; else WANT=gpu; fi
if [ "$SMOKE" = 0 ] && command -v nvidia-smi > /dev/null; then
  nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1
fi
run_step preflight 60 "$PY" -c "
import jax, sys
print('jax', jax.__version__, 'backend', jax.default_backend(), 'devices', jax.devices())
print('device_kind', jax.devices()[0].device_kind)
if jax.default_backend() != '$WANT':
    sys.exit('JAX sees no $WANT device (backend %s): install jax[cuda12] or check the driver.'
             % jax.default_backend())
"
PREFLIGHT_OK=$([ "${RCS[-1]}" = 0 ] && echo 1 || echo 0)

if [ "$PREFLIGHT_OK" = 1 ]; then
  # 2. Kernels against their oracles.
  wanted pallas_check && run_step pallas_check "$T_CHECK" "$PY" benchmarks/pallas_check.py ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"} \
    --out "$OUT_DIR/pallas_check.md"

  # 3. Block-sparse matmul speed (bf16 on GPU; the benchmark's own check runs against masked).
  if [ "$SMOKE" = 1 ]; then
    BENCH=(--m 64 --k 128 --n 128 --block-sizes 16 --densities 1.0,0.25
           --backends masked,xla,pallas_gpu,compact-pallas_gpu --interpret --reps 1)
  else
    BENCH=(--m 16384 --k 4096 --n 4096 --dtype bfloat16 --block-sizes 128
           --densities 1.0,0.25,0.125,0.1
           --backends "${SUITE_BSMM_BACKENDS:-masked,pallas_gpu,compact-pallas_gpu,xla}"
           --reps "${SUITE_BSMM_REPS:-5}")
  fi
  wanted bsmm_bench && run_step bsmm_bench "$T_BENCH" "$PY" benchmarks/block_sparse_matmul.py "${BENCH[@]}" \
    --out "$OUT_DIR/block_sparse_matmul.txt"

  # 4. Train-step time, dense vs the sparse_pretrain recipe (written by another issue).
  if ! wanted step_speed; then
    :
  elif [ ! -f benchmarks/step_speed.py ]; then
    skip_step step_speed "benchmarks/step_speed.py missing"
  elif [ "$SMOKE" = 1 ]; then
    run_step step_speed "$T_STEP" "$PY" benchmarks/step_speed.py --smoke \
      --out "$OUT_DIR/step_speed.md"
  else
    run_step step_speed "$T_STEP" "$PY" benchmarks/step_speed.py --preset gpt2-small \
      --arms dense,static87.5,compact-static87.5 --steps "${SUITE_STEPS:-10}" --batch 8 --seq 1024 \
      --out "$OUT_DIR/step_speed.md"
  fi
else
  for s in pallas_check bsmm_bench step_speed; do skip_step "$s" "preflight failed"; done
fi

# Summary: check verdicts and failures, result tables, tails of failed logs, and last (so
# that a clipped console tail still shows it) the table of steps.
TOTAL=$(( $(date +%s) - START ))
{
  echo "# GPU suite $([ "$SMOKE" = 1 ] && echo '(smoke, CPU)') $DATE"
  echo
  grep -h '^device_kind\|^jax ' "$OUT_DIR/preflight.log" 2>/dev/null | sed 's/^/    /'
  if [ -f "$OUT_DIR/pallas_check.md" ]; then
    echo
    echo "pallas_check: $(grep -h 'checks passed' "$OUT_DIR/pallas_check.md")"
    grep -h '^(unfinished' "$OUT_DIR/pallas_check.md"
    grep -h '^| .*| FAIL' "$OUT_DIR/pallas_check.md" | head -20 | cut -c1-300
  fi
  if [ -f "$OUT_DIR/block_sparse_matmul.txt" ]; then
    echo; echo '```'; cat "$OUT_DIR/block_sparse_matmul.txt"; echo '```'
  fi
  if [ -f "$OUT_DIR/step_speed.md" ]; then
    echo; head -c 3000 "$OUT_DIR/step_speed.md"; echo
  fi
  for i in "${!NAMES[@]}"; do
    case "${STATUS[$i]}" in
      ok|skipped*) ;;
      *) [ -f "$OUT_DIR/${NAMES[$i]}.log" ] || continue
         echo; echo "last lines of ${NAMES[$i]}.log:"; echo '```'
         tail -n 6 "$OUT_DIR/${NAMES[$i]}.log" | cut -c1-300; echo '```' ;;
    esac
  done
  echo
  echo "| step | status | rc | seconds |"
  echo "|---|---|---|---|"
  for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${RCS[$i]} | ${SECS[$i]} |"
  done
  echo
  echo "total ${TOTAL} s; output in $OUT_DIR; $([ "$FAILED" = 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED')"
} > "$OUT_DIR/summary.md"
echo
cat "$OUT_DIR/summary.md"
exit "$FAILED"
