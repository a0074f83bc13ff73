#!/usr/bin/env bash
# One GPU lease, in stages that each fit a 10-minute device call (the `device` tool's limit).
#
# Run from the repository root on the GPU machine (torch + triton preinstalled, no registry):
#
#   bash bench/gpu_session.sh STAGE [STAGE ...]
#
# Stages, in the order a session should take them (each prints a short table last and writes its
# full log and results under $OUT — or ./gpu-out when OUT is unset — as at most a few files, since
# the device tool brings back 8 files at most):
#
#   env           GPU, driver, torch/triton versions; the two ceilings METHOD.md asks for first: a
#                 device-to-device copy (GB/s, bytes read + written) and a bf16 8192³ matmul
#                 (TFLOP/s), on random data, CUDA events after warm-up; builds csrc (cpu + cuda)
#   tests         pytest -m gpu (every Triton and CUDA kernel vs the reference, fp32/bf16/fp16)
#   verify        medattn-fast verify on cuda (every fused path vs the reference, one table)
#   bench-ops     bench.run --quick for every op family on cuda (the issues' GPU rows)
#   bench-models  bench.run --quick for the whole networks on cuda
#   loss-curves   bench.loss_curves at the networks' real sizes on cuda
#
# Build outputs go to ./build/medattn (ignored by git; kept on a warm machine between calls), so
# later stages reuse the extensions the `env` stage built.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MEDATTN_BUILD_DIR="$PWD/build/medattn"
PY="${PYTHON:-python3}"
STATUS=0

results_tarball() {  # $1: stage, $2: results directory, bundled into one file under $OUT
    local stage="$1" dir="$2"
    if compgen -G "$dir/*" > /dev/null; then
        tar -czf "$OUT/$stage-results.tgz" -C "$dir" .
        echo "results: $OUT/$stage-results.tgz ($(ls "$dir" | wc -l) files)"
    fi
}

stage_env() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
    "$PY" - <<'EOF'
import torch, triton
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
p = torch.cuda.get_device_properties(0)
print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")

def timed(fn, reps=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record(); fn(); end.record(); torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2] / 1e3

src = torch.randn(2**28, device="cuda")  # 1 GiB float32, far over L2
dst = torch.empty_like(src)
t = timed(lambda: dst.copy_(src))
print(f"copy ceiling: {2 * src.numel() * 4 / t / 1e9:.0f} GB/s (read + write, median of 20)")
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
t = timed(lambda: a @ b)
print(f"bf16 matmul ceiling: {2 * 8192**3 / t / 1e12:.0f} TFLOP/s (8192^3, median of 20)")
a, b = a.float(), b.float()
torch.backends.cuda.matmul.allow_tf32 = False
t = timed(lambda: a @ b, reps=5)
print(f"fp32 matmul (no TF32): {2 * 8192**3 / t / 1e12:.1f} TFLOP/s")
EOF
    MEDATTN_BUILD_VERBOSE=0 "$PY" -m medattn_fast.cli build || STATUS=1
    "$PY" -m medattn_fast.cli info || STATUS=1
    return $STATUS
}

stage_tests() {
    "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" -rfE || STATUS=1
    return $STATUS
}

stage_verify() {
    "$PY" -m medattn_fast.cli verify --device cuda || STATUS=1
    return $STATUS
}

bench_families() {  # $1: stage, then the case families (bench/cases_<family>.py) to run on cuda
    local stage="$1" dir="$PWD/build/gpu-results/$1"
    shift
    mkdir -p "$dir"
    for op in "$@"; do
        "$PY" -m bench.run --op "$op" --device cuda --quick --out "$dir" --tag gpu || STATUS=1
    done
    results_tarball "$stage" "$dir"
    return $STATUS
}

stage_bench_ops() {
    bench_families bench-ops position channel attention_gate gaussian_axial window external
}

stage_bench_models() {
    bench_families bench-models models mtunet_model attention_unet_model
}

stage_loss_curves() {
    local dir="$PWD/build/gpu-results/loss"
    mkdir -p "$dir"
    "$PY" -m bench.loss_curves --device cuda --size real --steps 20 --out "$dir" || STATUS=1
    results_tarball loss-curves "$dir"
    return $STATUS
}

if [ $# -eq 0 ]; then
    sed -n '2,22p' "$0"
    exit 2
fi
for stage in "$@"; do
    case "$stage" in
        env|tests|verify|bench-ops|bench-models|loss-curves) ;;
        *) echo "gpu_session.sh: unknown stage '$stage' (env, tests, verify, bench-ops, bench-models, loss-curves)" >&2
           exit 2 ;;
    esac
    echo "=== $stage ($(date -u +%H:%M:%S))"
    # a pipeline runs the stage in a subshell: its status comes back through pipefail
    "stage_${stage//-/_}" 2>&1 | tee "$OUT/$stage.log" || STATUS=1
done
exit $STATUS
