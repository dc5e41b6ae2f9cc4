"""Per-call overhead of each layer of the stack, on a shape so small that the arithmetic is
negligible (n=1, k=m=16, r=4): _C → ops → autograd.Function → LoraLinear module, next to PEFT's
lora.Linear and a bare torch F.linear. What is left at decode sizes is this overhead.

    python benchmarks/bench_overhead.py [--threads 2]
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bench_layer import make_layers
from lorafuse import _C, ops
from lorafuse.autograd import lora_linear
from timing import interleaved, start


def main() -> None:
    args = start(__doc__, "bench_overhead: per-call cost of each layer (n=1, k=m=16, r=4)")
    n, k, m, r = 1, 16, 16, 4
    lf, pf, base = make_layers(k, m, r)
    x = torch.randn(n, k)
    W, b = base.weight.detach(), base.bias.detach()
    A, B = lf.lora_A["default"].weight.detach(), lf.lora_B["default"].weight.detach()
    xn, Wn, bn, An, Bn = (t.numpy() for t in (x, W, b, A, B))
    y, u = np.empty((n, m), np.float32), np.empty((n, r), np.float32)
    with torch.no_grad():
        t = interleaved({
            "_C.lora_forward (preallocated out)": lambda: _C.lora_forward(xn, Wn, An, Bn, 2.0, bn, y, u),
            "ops.lora_forward": lambda: ops.lora_forward(xn, Wn, An, Bn, 2.0, bn),
            "autograd lora_linear": lambda: lora_linear(x, W, b, A, B, 2.0),
            "lorafuse LoraLinear module": lambda: lf(x),
            "PEFT lora.Linear module": lambda: pf(x),
            "torch F.linear (base only)": lambda: F.linear(x, W, b),
        }, rounds=args.rounds, min_time=0.05)
    for name, sec in t.items():
        print(f"  {name:38s} {sec * 1e6:8.2f} µs")


if __name__ == "__main__":
    main()
