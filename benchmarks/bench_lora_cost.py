"""What the LoRA term costs on top of the GEMM, per call, at the issue-6 small shapes: lorafuse's
fused forward — "no_grad" (`need_u=False`, what the layer runs under `torch.no_grad`) and "grad"
(`need_u=True`, u kept for the backward) — against lorafuse's own sgemm of the base alone and torch's
`F.linear` of the base alone; fp32, same threads, interleaved in rotated order, medians. Every call
allocates its output (lorafuse's through its output cache; the no_grad forward also with the cache off,
`lorafuse.set_output_cache_limit(0)`). Explains the small-shape rows of bench_layer.py:
lf/base = (sgemm/F.linear)·(fwd/sgemm).

    python benchmarks/bench_lora_cost.py [--threads 2] [--rounds 9]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench_layer import SHAPES
from lorafuse import ops
from timing import Candidate, interleaved, plan_label, start


def main() -> None:
    args = start(__doc__, "bench_lora_cost: the rank-r term on top of the GEMM (fp32)")
    print(f"\n{'n':>5} {'k':>6} {'m':>6} {'r':>3} | {'sgemm/F.linear':>14} | {'no_grad/sgemm':>13} {'grad/sgemm':>10} "
          f"| {'no_grad/F.linear':>16} {'cache off':>9} | plan: no_grad ; grad")
    torch.manual_seed(0)
    for n, k, m, r in SHAPES["small"]:
        x, W, b = torch.randn(n, k), torch.randn(m, k), torch.randn(m)
        A, B = torch.randn(r, k), torch.randn(m, r)
        cands = {
            "sgemm": Candidate(lambda: ops.sgemm(x, W.T, 1.0, b)),
            "F.linear": Candidate(lambda: F.linear(x, W, b)),
            "no_grad": Candidate(lambda: ops.lora_forward(x, W, A, B, 2.0, b, need_u=False)),
            "grad": Candidate(lambda: ops.lora_forward(x, W, A, B, 2.0, b)),
        }
        cands["cache off"] = cands["no_grad"].cache_off()
        t = interleaved(cands, rounds=args.rounds, prime=True)
        print(f"{n:5d} {k:6d} {m:6d} {r:3d} | {t['sgemm'] / t['F.linear']:14.3f} | {t['no_grad'] / t['sgemm']:13.3f} "
              f"{t['grad'] / t['sgemm']:10.3f} | {t['no_grad'] / t['F.linear']:16.3f} "
              f"{t['cache off'] / t['F.linear']:9.3f} | {plan_label(cands['no_grad'])} ; {plan_label(cands['grad'])}")


if __name__ == "__main__":
    main()
