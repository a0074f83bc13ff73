#!/usr/bin/env bash
# All the GPU truth of medattn-fast from ONE device call: every kernel tested, the headline rows
# timed, every compiled kernel's registers/spills/shared memory listed, a summary written last.
#
#   OUT=dir bash bench/gpu_check.sh
#
# Runs from a plain checkout on a bare GPU machine (torch + triton + pytest-xdist preinstalled, no
# package registry, PYTHONPATH=. is set here). It keeps itself inside GPU_CHECK_LIMIT_S seconds
# (default 450: one 10-minute device call with room to spare, and time left in a 15-minute lease to
# rerun it once), and leaves at most 8 files under $OUT, each written as its results come in, so a
# kill loses nothing already measured:
#
#   env.txt         GPU name, driver, clocks, torch / CUDA / triton versions
#   build.log       the CUDA extension build and Triton's cache warm-up (both in the background)
#   tests.log       pytest -m gpu, Triton kernels, xdist workers (-v: one line per test as it ends)
#   cuda_tests.log  pytest -m gpu, the cuda backend, once its build is done
#   headline.csv    python -m bench.run --gpu-check (bench/harness.py, the rows of each
#                   bench/cases_<family>.py gpu_check_cases): the timing rows, one flushed line each
#   headline.log    its output
#   kernels.csv     bench/gpu_report.py kernels: registers, spills, shared memory per compiled kernel
#   summary.txt     written last: tests per op and dtype, skips by reason, collection errors, the op
#                   families reached and not reached, timing ratios, spills, what did not fit
#
# Knobs (environment): GPU_CHECK_LIMIT_S (450), GPU_CHECK_WORKERS (xdist workers, 8),
# GPU_CHECK_TEST_TIMEOUT_S (per test, 150; needs pytest-timeout), GPU_CHECK_TESTS_K (a pytest -k
# expression ANDed to the selection), PYTHON (python3).
# Dry run without a GPU (the CPU test suite runs one, tests/test_gpu_check_script.py):
# MEDATTN_GPU_TEST_DEVICE=cpu — the Triton kernels interpreted, toy timing shapes, no xdist. There
# tests/conftest.py runs the float16 cases first, one file at a time (the interpreter refuses them:
# skipped at once with the backend's reason; on a GPU they run and a refusal fails), then the first
# test of each file without one, then the rest in order: every op family is reached before the
# limit however slow one family's shapes are there.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/gpu-check-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
LIMIT="${GPU_CHECK_LIMIT_S:-450}"
START=$(date +%s)
DEADLINE=$((START + LIMIT))
WORK="${GPU_CHECK_WORK:-$ROOT/build/gpu_check}"
mkdir -p "$WORK"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="$WORK/triton-cache"
# the extensions are built afresh on the GPU machine; the CPU dry run reuses the caller's C++ builds
# (MEDATTN_BUILD_DIR or its default): the timing stage's auto rows measure the cpp backend, and
# building four extensions there (30-60 s each) would eat that stage's time
[ "${MEDATTN_GPU_TEST_DEVICE:-cuda}" = cpu ] || export MEDATTN_BUILD_DIR="$WORK/extensions"
# auto measures its candidates on the first call per shape (the timing rows' untimed first call); a cache
# of this run's own, so a pick left by another run or torch/triton version cannot decide an auto row
export MEDATTN_CACHE_DIR="$WORK/autotune-cache"
rm -rf "$MEDATTN_CACHE_DIR"
DRY=0
if [ "${MEDATTN_GPU_TEST_DEVICE:-cuda}" = cpu ]; then
    DRY=1
    export TRITON_INTERPRET=1
fi
WORKERS="${GPU_CHECK_WORKERS:-8}"
[ "$DRY" = 1 ] && WORKERS="${GPU_CHECK_WORKERS:-0}"
K="${GPU_CHECK_TESTS_K:-}"
NOTES=()

# Time plan, as shares of the limit: Triton tests until 40%, cuda tests until 50%, timings until
# the last 8% (kernel list and summary). Each stage starts as soon as the one before ends.
at() { echo $((START + LIMIT * $1 / 100)); }
TESTS_END=$(at 40)
CUDA_END=$(at 50)
HEADLINE_END=$(at 92)
left() { local s=$(($1 - $(date +%s))); [ "$s" -lt 1 ] && s=1; echo "$s"; }
stamp() { echo "=== $1 at +$(($(date +%s) - START)) s"; }

# ---- environment -------------------------------------------------------------------------------
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "command: OUT=$OUT GPU_CHECK_LIMIT_S=$LIMIT bash bench/gpu_check.sh (commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.limit,temperature.gpu \
            --format=csv 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    timeout 60 "$PY" -m bench.gpu_report env 2>&1
} > "$OUT/env.txt"
cat "$OUT/env.txt"

# ---- background: the CUDA extension build, and Triton's cache warm-up ---------------------------
stamp "background build + warm-up"
timeout -k 5 "$(left "$CUDA_END")" "$PY" - > "$OUT/build.log" 2>&1 <<'EOF' &
import time
from medattn_fast import _build

start = time.time()
for family in _build.families("cuda"):
    reason = _build.unavailable_reason("cuda", family)
    print(f"cuda {family}: {'built' if reason is None else 'NOT BUILT: ' + reason} ({time.time() - start:.0f} s)",
          flush=True)
EOF
BUILD_PID=$!
WARM_PID=
if [ "$DRY" = 0 ]; then
    # one process group, killed whole below: timeout leads a group of its own (it calls setpgid
    # unless --foreground) and the warm-up and its sed run inside it, so $! (timeout's PID) is the
    # group's id. Before, $! of `a | sed &` was sed's PID and killing it left the warm-up running.
    # MEDATTN_AUTOTUNE=0: auto's picks are measured by the timing stage, not beside the tests
    MEDATTN_AUTOTUNE=0 timeout -k 5 "$(left "$TESTS_END")" bash -c '"$0" -m bench.run --gpu-check --warm --deadline "$1" 2>&1 \
        | sed -u "s/^/[warm] /"' "$PY" "$TESTS_END" >> "$OUT/build.log" 2>&1 &
    WARM_PID=$!
fi

# ---- the Triton tests --------------------------------------------------------------------------
# -rfEs: failures, errors and skips (each with its reason) in pytest's short summary; one file that
# cannot be collected is counted as such in the summary and does not stop the others
PYTEST=(-m pytest -m gpu -v -p no:cacheprovider -rfEs --continue-on-collection-errors)
"$PY" -c "import xdist" 2> /dev/null && [ "$WORKERS" != 0 ] && PYTEST+=(-n "$WORKERS")
"$PY" -c "import pytest_timeout" 2> /dev/null && PYTEST+=(--timeout "${GPU_CHECK_TEST_TIMEOUT_S:-150}")
select_k() { echo "$1${K:+ and ($K)}"; }
stamp "Triton tests (until +$((TESTS_END - START)) s)"
COLUMNS=400 timeout -k 10 "$(left "$TESTS_END")" "$PY" "${PYTEST[@]}" -k "$(select_k "not cuda")" tests \
    > "$OUT/tests.log" 2>&1
echo "Triton tests: exit $? ($(grep -c ' PASSED' "$OUT/tests.log") passed," \
    "$(grep -cE ' (FAILED|ERROR)' "$OUT/tests.log") failed, $(grep -c ' SKIPPED' "$OUT/tests.log") skipped)"
if [ -n "$WARM_PID" ]; then   # timings must not share the GPU with the warm-up: end its whole group
    kill -TERM -- "-$WARM_PID" 2> /dev/null
    wait "$WARM_PID" 2> /dev/null
fi

# ---- the cuda-backend tests, once the build is done ---------------------------------------------
stamp "waiting for the CUDA build"
wait "$BUILD_PID"
BUILD_STATUS=$?
cat "$OUT/build.log" | grep -v '^\[warm\]' || true
if grep -q "^cuda .*: built" "$OUT/build.log"; then
    stamp "cuda tests (until +$((CUDA_END - START)) s)"
    COLUMNS=400 timeout -k 10 "$(left "$CUDA_END")" "$PY" "${PYTEST[@]}" -k "$(select_k cuda)" tests \
        > "$OUT/cuda_tests.log" 2>&1
    echo "cuda tests: exit $?"
else
    NOTES+=("cuda-backend tests not run: the CUDA extension did not build (exit $BUILD_STATUS; see build.log)")
fi

# ---- the headline timings ------------------------------------------------------------------------
stamp "timings (until +$((HEADLINE_END - START)) s)"
TINY=()
[ "$DRY" = 1 ] && TINY=(--tiny)
timeout -k 10 "$(left "$HEADLINE_END")" "$PY" -m bench.run --gpu-check --csv "$OUT/headline.csv" \
    --deadline "$HEADLINE_END" "${TINY[@]}" > "$OUT/headline.log" 2>&1
HEADLINE_STATUS=$?
[ "$HEADLINE_STATUS" = 0 ] || NOTES+=("timings stopped with exit $HEADLINE_STATUS (124: the time limit; see headline.log)")

# ---- compiled kernels and the summary -------------------------------------------------------------
stamp "kernel resources"
timeout -k 5 "$(left $((DEADLINE - 5)))" "$PY" -m bench.gpu_report kernels "$TRITON_CACHE_DIR" \
    --out "$OUT/kernels.csv" 2>&1 || NOTES+=("kernel list incomplete (exit $?)")
[ "$DRY" = 1 ] && NOTES+=("dry run: Triton interpreted, so no compiled kernels to list; toy shapes, timings meaningless")
stamp "summary"
if ! timeout -k 5 60 "$PY" -m bench.gpu_report summary "$OUT" "${NOTES[@]}"; then
    { echo "# gpu_check summary (the summary step failed; raw notes)"; printf '%s\n' "${NOTES[@]}"; } > "$OUT/summary.txt"
fi
stamp "done"
