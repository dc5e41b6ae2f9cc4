#!/usr/bin/env bash
# lorafuse GPU check: build with CUDA, run the CUDA tests, benchmark Llama-8B-like LoRA projections.
#
# Runs as is on a GPU machine that has torch (CUDA build), peft, transformers and nvcc, with no network:
#     bash benchmarks/gpu_check.sh [LOG]        (LOG defaults to benchmarks/gpu_check.log)
# Steps (each under its own timeout; ~3 minutes in all on an H200, well under 8):
#   1. what the build finds (python setup_cuda.py), then LORAFUSE_CUDA=1 pip install --no-build-isolation .
#   2. pytest tests/test_cuda_build.py tests/test_cuda.py        (a failure is reported, the bench still runs)
#   3. benchmarks/bench_gpu.py: tokens 8192; 4096→4096, 4096→1024, 4096→14336, 14336→4096; r = 16; bf16
# Exit status: non-zero if the build, the tests or the benchmark failed.
set -euo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-benchmarks/gpu_check.log}
mkdir -p "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - T0 ))s] $*"; }

step "machine"
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || echo "nvidia-smi failed"
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, 'CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU')"
"$PY" -c "import peft, transformers; print('peft', peft.__version__, '| transformers', transformers.__version__)"
(command -v nvcc >/dev/null && nvcc --version | tail -n 2) || echo "nvcc not on PATH (setup_cuda.py also looks in CUDA_HOME and /usr/local/cuda)"
git log -1 --format='commit %h %s' 2>/dev/null || true

step "what the CUDA build finds"
"$PY" setup_cuda.py

step "build: LORAFUSE_CUDA=1 pip install --no-build-isolation --no-deps ."
LORAFUSE_CUDA=1 timeout 300 "$PY" -m pip install --no-build-isolation --no-deps --no-cache-dir -v . \
    > /tmp/lorafuse_gpu_check_build.log 2>&1 || { tail -n 60 /tmp/lorafuse_gpu_check_build.log; echo "BUILD FAILED"; exit 1; }
grep -E "lorafuse: |nvcc|error|warning: " /tmp/lorafuse_gpu_check_build.log | tail -n 20 || true
cd /tmp  # import the installed package, not the source tree
"$PY" - <<'PYEOF'
import lorafuse, lorafuse.cuda as lc
lorafuse.show_config()
if not lc.is_available():
    raise SystemExit(f"lorafuse CUDA support is not usable: {lc.cuda_info()}")
PYEOF
cd - >/dev/null

step "tests: tests/test_cuda_build.py tests/test_cuda.py"
set +e
timeout 240 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda_build.py tests/test_cuda.py
TEST_RC=$?
set -e
echo "pytest exit status: $TEST_RC"

step "benchmark (bf16, tokens 8192, r 16)"
set +e
timeout 240 "$PY" benchmarks/bench_gpu.py --tokens 8192 --rank 16 \
    --shapes 4096x4096,4096x1024,4096x14336,14336x4096 --json "$(dirname "$LOG")/gpu_bench.json"
BENCH_RC=$?
set -e

step "done: tests rc=$TEST_RC, bench rc=$BENCH_RC (log: $LOG)"
[ "$TEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
