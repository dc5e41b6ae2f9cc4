#!/usr/bin/env bash
# lorafuse GPU check: build with CUDA, run the CUDA tests (kernels, plan, PEFT parity on a Llama config in
# bf16 with PEFT's fp32 adapters and under autocast, CPU-kernel parity), benchmark the Llama-8B projections
# and a 2-layer Llama-8B-shaped training step against PEFT.
#
# Runs as is on a GPU machine that has torch (CUDA build), peft, transformers, nvcc and the nvidia-cublas
# wheel, with no network:
#     bash benchmarks/gpu_check.sh [OUTDIR]        (OUTDIR defaults to benchmarks/results)
# Writes OUTDIR/gpu_<device>_<UTC time>.log, ..._layers.json, ..._dora.json and ..._train.json: a second run never
# overwrites the first. Steps (each under its own timeout; ~4 minutes in all on an H200, at most 8):
#   1. what the build finds (python setup_cuda.py), then LORAFUSE_CUDA=1 pip install --no-build-isolation .
#      (sm_90 only, unless LORAFUSE_CUDA_ARCHS says otherwise: the default build adds sm_80)
#   2. pytest tests/test_cuda_build.py tests/test_cuda.py          (a failure is reported, the benches still run)
#   3. benchmarks/bench_gpu.py: tokens 8192; 4096→4096, 4096→1024, 4096→14336, 14336→4096; r = 16; bf16 base,
#      PEFT's default fp32 adapters
#   4. the same with --dora --adapter-dtype bf16 on 4096→4096 and 4096→14336 (DoRA, adapters and magnitude in bf16)
#   5. benchmarks/bench_gpu_train.py: 2-layer Llama-8B-shaped model, bf16, batch 4 × 2048, r = 16 on all
#      seven projections, AdamW step
# Exit status: non-zero if the build, the tests or a benchmark failed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-benchmarks/results}
mkdir -p "$OUTDIR"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr -cd 'A-Za-z0-9' | tr 'A-Z' 'a-z' | sed "s/^nvidia//" || true)
STEM="$OUTDIR/gpu_${GPU:-unknown}_$(date -u +%Y%m%dT%H%M%SZ)"
LOG="$STEM.log"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
export LORAFUSE_CUDA_ARCHS=${LORAFUSE_CUDA_ARCHS:-90}
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
nproc

step "what the CUDA build finds"
"$PY" setup_cuda.py

step "build: LORAFUSE_CUDA=1 pip install --no-build-isolation --no-deps . (archs $LORAFUSE_CUDA_ARCHS)"
LORAFUSE_CUDA=1 MAX_JOBS=$(nproc) timeout 180 "$PY" -m pip install --no-build-isolation --no-deps --no-cache-dir -v . \
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
env -u LORAFUSE_CUDA_ARCHS timeout 150 "$PY" -m pytest -q -rs -p no:cacheprovider --durations=8 tests/test_cuda_build.py tests/test_cuda.py
TEST_RC=$?
set -e
echo "pytest exit status: $TEST_RC"

step "layer benchmark (bf16 base, fp32 adapters, tokens 8192, r 16)"
set +e
timeout 100 "$PY" benchmarks/bench_gpu.py --tokens 8192 --rank 16 \
    --shapes 4096x4096,4096x1024,4096x14336,14336x4096 --json "${STEM}_layers.json"
BENCH_RC=$?
set -e

step "DoRA layer benchmark (bf16 base, bf16 adapters and magnitude: the DoRA lorafuse fuses on CUDA)"
set +e
timeout 60 "$PY" benchmarks/bench_gpu.py --dora --adapter-dtype bf16 --tokens 8192 --rank 16 \
    --shapes 4096x4096,4096x14336 --json "${STEM}_dora.json"
DORA_RC=$?
set -e

step "training-step benchmark (2-layer Llama-8B-shaped, bf16, fp32 adapters)"
set +e
timeout 120 "$PY" benchmarks/bench_gpu_train.py --json "${STEM}_train.json"
TRAIN_RC=$?
set -e

step "done: tests rc=$TEST_RC, layer bench rc=$BENCH_RC, DoRA bench rc=$DORA_RC, train bench rc=$TRAIN_RC (log: $LOG)"
[ "$TEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ] && [ "$DORA_RC" -eq 0 ] && [ "$TRAIN_RC" -eq 0 ]
