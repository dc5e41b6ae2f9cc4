#!/usr/bin/env bash
# Callgrind profile of one LoRA layer's fwd+bwd (default 512x1024x1024, r=16), lorafuse and PEFT
# side by side: instructions and simulated cache misses grouped into GEMM micro-kernel, packing,
# rank-r kernels, elementwise ops, Python (benchmarks/profile_layer.py). Needs valgrind
# (apt-get install valgrind); ~6 minutes, both sides in parallel. Extra arguments go to
# profile_layer.py (--n --k --m --r --steps). Output files stay in $OUT (default: a temp dir).
# Caches simulated as this CPU's L1 (32 KiB, 8-way) and a 32 MiB 16-way last level.
set -euo pipefail
cd "$(dirname "$0")"
command -v valgrind >/dev/null || { echo "profile_layer.sh: valgrind not found (apt-get install valgrind)" >&2; exit 2; }
PY=$(python -c 'import sys; print(sys.executable)')  # the real interpreter: valgrind would trace a pyenv shim
OUT=${OUT:-$(mktemp -d)}
pids=()
for side in lf peft; do
    valgrind --tool=callgrind --cache-sim=yes --I1=32768,8,64 --D1=32768,8,64 --LL=33554432,16,64 \
        --instr-atstart=no --callgrind-out-file="$OUT/$side.callgrind" \
        "$PY" profile_layer.py --side "$side" "$@" > "$OUT/$side.log" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
for side in lf peft; do
    echo "== $side: $(grep profiled "$OUT/$side.log")"
    "$PY" profile_layer.py --summarize "$OUT/$side.callgrind"
done
echo "(callgrind files in $OUT)"
