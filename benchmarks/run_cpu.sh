#!/usr/bin/env bash
# Every CPU benchmark behind benchmarks/RESULTS.md, in one go (≈ 10 minutes on 2 cores).
# Run on a quiet machine: another process on the same cores skews every ratio.
#   bash benchmarks/run_cpu.sh [LOG]      (default log: benchmarks/results_cpu.log)
set -euo pipefail
cd "$(dirname "$0")"
log=${1:-results_cpu.log}
{
  echo "## machine"; lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Core|L1d|L2|L3'; uptime
  python -c "import lorafuse; lorafuse.show_config(); import torch; print('torch', torch.__version__); lorafuse.show_config()"
  python bench_gemm.py --threads 2
  python bench_layer.py --threads 2
  python bench_ops.py --threads 2
  python bench_overhead.py --threads 2
  python bench_train.py
} 2>&1 | tee "$log"
