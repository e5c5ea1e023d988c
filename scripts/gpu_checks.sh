#!/usr/bin/env bash
# Everything the project measures on a GPU, in one command (a lent GPU machine allows one 10-minute call at a time):
# build ops/ in place, report the built backends, run the CUDA tests (tests/test_cuda_emulated.py's kernel checks
# on the real kernels too), then the op, ODConv and model benchmarks.
# Each step has its own time limit and log; a failed step is reported and the next one still runs.
#
# Environment: PYTHON (default python3), OUT (results folder, default gpu_results), DEVICE (default cuda), BATCH
# (benchmark batch, default 64), ROUNDS (ODConv alternating rounds, default 5), SKIP_BUILD=1 to keep the built ops.
# Results: $OUT/summary.txt (one line per step: status and seconds) and one log or markdown table per step.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_results}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-64}
ROUNDS=${ROUNDS:-5}
mkdir -p "$OUT"

# step NAME LIMIT_SECONDS OUTPUT_FILE COMMAND...: runs COMMAND with stdout and stderr in $OUT/OUTPUT_FILE.
step() {
    local name=$1 limit=$2 file=$3 start rc
    shift 3
    start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$file" 2>&1
    rc=$?
    local status=ok
    [[ $rc -eq 124 ]] && status="timed out after ${limit}s"
    [[ $rc -ne 0 && $rc -ne 124 ]] && status="failed (exit $rc)"
    echo "$name: $status, $(( $(date +%s) - start ))s -> $OUT/$file" | tee -a "$OUT/summary.txt"
}

echo "gpu_checks $(date -u +%FT%TZ) on $DEVICE, batch $BATCH" | tee "$OUT/summary.txt"
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    step build 300 build.log "$PYTHON" setup.py build_ext --inplace
fi
step backends 60 backends.txt "$PYTHON" -m ops
if "$PYTHON" -c 'import pytest' 2> /dev/null; then
    step cuda-tests 240 cuda_tests.log "$PYTHON" -m pytest -q -rs -k cuda tests/test_ops.py tests/test_ddf.py \
        tests/test_odconv.py
    # the kernel checks the CI runs on the emulated kernels (k 1..13, dilation up to 8, four dtypes), on the GPU
    step cuda-kernels 240 cuda_kernels.log "$PYTHON" -m pytest -q -rs -k '[cuda' tests/test_cuda_emulated.py
else
    echo "cuda-tests: skipped (no pytest for $PYTHON)" | tee -a "$OUT/summary.txt"
fi
step ops-benchmark 120 benchmark_ops.md "$PYTHON" scripts/benchmark_ops.py --device "$DEVICE"
for dtype in fp32 bf16; do
    flag=()
    [[ $dtype == bf16 ]] && flag=(--bf16)
    step "odconv-$dtype" 150 "benchmark_odconv_$dtype.md" "$PYTHON" scripts/benchmark_odconv.py --table models \
        --device "$DEVICE" --batch-size "$BATCH" --rounds "$ROUNDS" --passes train infer --kernel-nums 1 4 \
        --formulations released ours "${flag[@]}"
done
step models-amp 150 models_amp.log "$PYTHON" scripts/benchmark_models.py --device "$DEVICE" -b "$BATCH" --amp \
    --families ddf,odconv,odconv_mbv2 --output "$OUT/models.md"
