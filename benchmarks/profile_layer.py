"""Where one LoRA layer's fwd+bwd spends its instructions: a callgrind profile, lorafuse or PEFT.

Two modes:
  python benchmarks/profile_layer.py --side lf|peft [--n --k --m --r]
      the program to run under `valgrind --tool=callgrind --instr-atstart=no`: builds the layer
      (lorafuse.bench_cli.lora_layer: the same W, A, B on both sides), runs warm-up steps, then switches
      callgrind's instrumentation on (callgrind_control) for the measured steps only;
  python benchmarks/profile_layer.py --summarize FILE
      groups a callgrind output file's per-function counts (instructions, D1 read misses) into
      the parts of a LoRA step: GEMM micro-kernel, packing, rank-r kernels, elementwise ops,
      the Python interpreter, the rest.
`bash benchmarks/profile_layer.sh` runs both sides and prints both summaries (~6 minutes).

Caveat: valgrind emulates no AVX-512, so both lorafuse and MKL take their AVX2 paths, and it runs
the threads one at a time: the counts show the structure of the work, not this CPU's timing.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))

# (part, pattern on "file:function [object]"), first match wins
PARTS: List[Tuple[str, str]] = [
    ("GEMM micro-kernel", r"ukernel_|sgemm_kernel"),
    ("GEMM packing", r"pack_|lf_transpose|gemm_block|sgemm_.*copy|sgemm_.*pack"),
    ("rank-r kernels (u, v, dA, dB)", r"rowdot|rank_update|rank_add|dropout_span"),
    ("torch elementwise / reductions", r"at::native|VectorizedLoop|vectorized_loop|cpu_kernel"),
    ("thread runtime (libgomp, pool)", r"libgomp|gomp_|lf_pool|pthread"),
    ("Python interpreter", r"libpython|Python-3|ceval|dictobject|object\.c|typeobject"),
    ("memory (malloc, page zeroing, copies)", r"malloc|free|memcpy|memset|memmove"),
]


EVENTS = ("Ir", "D1mr", "ILmr", "DLmr")  # instructions; L1 data read misses; last-level instruction / data read misses
COUNT = r"([\d,]+|\.)\s+(?:\(\s*[\d.]+%\)\s+)?"
LINE = re.compile(r"^\s*" + COUNT * len(EVENTS) + r"(.*)$")


def summarize(path: str) -> Dict[str, List[int]]:
    """part → counts of EVENTS, from `callgrind_annotate --inclusive=no` (function lines only)."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--auto=no", "--show=" + ",".join(EVENTS),
                          "--threshold=100", path], capture_output=True, text=True, check=True).stdout
    parts: Dict[str, List[int]] = {}
    for line in out.splitlines():
        m = LINE.match(line)
        if not m or "PROGRAM TOTALS" in line or not m.group(len(EVENTS) + 1):
            continue
        counts = [0 if c == "." else int(c.replace(",", "")) for c in m.groups()[:len(EVENTS)]]
        part = next((name for name, pat in PARTS if re.search(pat, m.group(len(EVENTS) + 1))), "other")
        parts[part] = [a + b for a, b in zip(parts.get(part, [0] * len(EVENTS)), counts)]
    return parts


def print_summary(path: str) -> None:
    parts = summarize(path)
    totals = [sum(v[i] for v in parts.values()) or 1 for i in range(len(EVENTS))]
    heads = ("instructions", "L1 data rd miss", "LL instr miss", "LL data rd miss")
    print(f"{'part':40s}" + "".join(f" {h:>16} {'':>6}" for h in heads))
    for name, counts in sorted(parts.items(), key=lambda kv: -kv[1][0]):
        print(f"{name:40s}" + "".join(f" {c:16,d} {100 * c / t:5.1f}%" for c, t in zip(counts, totals)))
    print(f"{'total':40s}" + "".join(f" {t:16,d} {'':6s}" for t in totals))


def profile(side: str, n: int, k: int, m: int, r: int, steps: int) -> None:
    sys.path.insert(0, HERE)
    from timing import lora_layer, make_base, make_inputs, pass_candidates, set_threads

    set_threads(2)
    layer = lora_layer(make_base(k, m), r, "lorafuse" if side == "lf" else "peft")
    step = pass_candidates(layer, *make_inputs(n, k, m))["fwd+bwd"]
    for _ in range(2):
        step()
    subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], check=True, capture_output=True)
    for _ in range(steps):
        step()
    subprocess.run(["callgrind_control", "-i", "off", str(os.getpid())], check=True, capture_output=True)
    print(f"profiled {steps} fwd+bwd steps of {side} at {n}x{k}x{m} r={r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=["lf", "peft"])
    ap.add_argument("--summarize", metavar="FILE")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    if args.summarize:
        print_summary(args.summarize)
    elif args.side:
        profile(args.side, args.n, args.k, args.m, args.r, args.steps)
    else:
        ap.error("give --side (under valgrind) or --summarize FILE")


if __name__ == "__main__":
    main()
