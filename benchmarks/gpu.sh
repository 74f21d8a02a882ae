#!/usr/bin/env bash
# The GPU checks, in one call on a machine with an NVIDIA GPU (issue 9, item 6):
#   1. the GPU tests (pytest -m gpu: tests/test_cuda.py and tests/test_engine.py's);
#   2. benchmarks/run.py --device cuda at CIFAR shape, 500 runs: the card's code on the
#      GPU, then exact, fast and auto;
#   3. benchmarks/gpu_profile.py: each precision warm, timed 3 times, and profiled.
# Logs go to $OUT (or ./gpu-out). Where the machine lacks this project's dependencies and
# has no network, put their wheels in .whl/ first; they are installed into /tmp/site.
#
#     bash benchmarks/gpu.sh                # everything
#     GPU_BENCH_RUNS=100 bash benchmarks/gpu.sh   # a smaller benchmark
#     GPU_TESTS_ONLY=1 bash benchmarks/gpu.sh     # the tests alone
#     GPU_BENCH_BUDGET=16GiB bash benchmarks/gpu.sh   # as for the README's H100 figures
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD/src
else
    export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 ENSEMBLE_KERNEL_CACHE_DIR=/tmp/ek-cache
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv \
    || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

# The engine's budget on this GPU: GPU_BENCH_BUDGET, else the engine's own default (half of
# the GPU's free memory). The README's H100 figures used GPU_BENCH_BUDGET=16GiB.
BUDGET=${GPU_BENCH_BUDGET:-$($PY -c "from ensemble_kernel.core._plan import default_memory_budget
print(default_memory_budget('cuda'))" 2>/dev/null || echo 1GiB)}

echo "== pytest -m gpu"
timeout "${GPU_TEST_TIMEOUT:-240}" $PY -m pytest -m gpu -q -rs -p no:cacheprovider \
    tests/test_cuda.py tests/test_engine.py 2>&1 | tee "$OUT/pytest-gpu.log"
tests=$?
if [ -n "${GPU_TESTS_ONLY:-}" ]; then exit $tests; fi

echo "== benchmarks/run.py --device cuda"
timeout "${GPU_BENCH_TIMEOUT:-300}" $PY benchmarks/run.py --device cuda \
    --runs "${GPU_BENCH_RUNS:-500}" --cases reference,exact,fast,auto \
    --budget "$BUDGET" --probe-seconds 1 --case-timeout 120 \
    --data-dir /tmp/ek-data --out-dir "$OUT" 2>&1 | tee "$OUT/bench-gpu.log"
bench=$?

echo "== benchmarks/gpu_profile.py"
timeout "${GPU_PROFILE_TIMEOUT:-200}" $PY benchmarks/gpu_profile.py \
    --runs "${GPU_BENCH_RUNS:-500}" --budget "$BUDGET" --data-dir /tmp/ek-data \
    --out-dir "$OUT" 2>&1 \
    | tee "$OUT/profile.log"
profile=$?
echo "pytest exit $tests, benchmark exit $bench, profile exit $profile"
exit $(( tests || bench || profile ))
