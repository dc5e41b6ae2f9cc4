"""What the LoRA term costs on top of the GEMM, per call, at the issue-6 small shapes: lorafuse's
fused forward (inference, `need_u=False`, and training, with u) against lorafuse's own sgemm of
the base alone and torch's `F.linear` of the base alone — fp32, same threads, interleaved,
medians. Explains the small-shape rows of bench_layer.py: lf/base = (sgemm/F.linear)·(fwd/sgemm).

    python benchmarks/bench_lora_cost.py [--threads 2] [--rounds 9]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafuse import _C
from bench_layer import SHAPES
from timing import interleaved, plan_label, start


def main() -> None:
    args = start(__doc__, "bench_lora_cost: the rank-r term on top of the GEMM (fp32)")
    print(f"\n{'n':>5} {'k':>6} {'m':>6} {'r':>3} | {'sgemm/F.linear':>14} | {'infer/sgemm':>11} {'with u/sgemm':>12} "
          f"| {'infer/F.linear':>14} | plan: infer ; with u")
    torch.manual_seed(0)
    for n, k, m, r in SHAPES["small"]:
        x, W, b, y = torch.randn(n, k), torch.randn(m, k), torch.randn(m), torch.empty(n, m)
        A, B = torch.randn(r, k), torch.randn(m, r)
        cands = {
            "sgemm": lambda: _C.sgemm(x, W.T, 1.0, b, y),
            "F.linear": lambda: F.linear(x, W, b),
            "infer": lambda: _C.lora_forward(x, W, A, B, 2.0, b, y, None, 0.0, 0, False, False),
            "with u": lambda: _C.lora_forward(x, W, A, B, 2.0, b, y),
        }
        t = interleaved(cands, rounds=args.rounds)
        print(f"{n:5d} {k:6d} {m:6d} {r:3d} | {t['sgemm'] / t['F.linear']:14.3f} | {t['infer'] / t['sgemm']:11.3f} "
              f"{t['with u'] / t['sgemm']:12.3f} | {t['infer'] / t['F.linear']:14.3f} | "
              f"{plan_label(cands['infer'])} ; {plan_label(cands['with u'])}")


if __name__ == "__main__":
    main()
