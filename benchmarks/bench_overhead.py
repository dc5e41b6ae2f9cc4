"""Per-call overhead of each layer of the stack, on a shape so small that the arithmetic is
negligible (n=1, k=m=16, r=4): _C → ops → autograd.Function → FusedLinear module (PEFT's layer, fused), next to PEFT's
lora.Linear module, the base nn.Linear module and a bare torch F.linear — the modules' forward both under
`torch.no_grad` ("forward (no_grad)", eval mode) and with grad on ("forward (grad)", training mode). Only the
first row writes into preallocated outputs (labelled); every other call allocates. What is left at decode sizes
is this overhead.

"cold": the same path as it runs in a model, right after a large kernel has flushed the caches.
Each lorafuse kernel call is followed by a 512×1024×1024 LoRA forward (the "flush"; its own time
is measured and subtracted), and one runs before each timed call, so every Python segment
between kernels starts on cold caches. Printed for lorafuse's forward (no grad) and
forward+backward next to two floors every autograd user pays: a do-nothing
torch.autograd.Function and torch's own `x * 2` (forward, flush, backward, flush). Both sections run their
candidates interleaved, in an order rotated from round to round.

    python benchmarks/bench_overhead.py [--threads 2] [--rounds 9]
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Dict

import numpy as np
import torch
import torch.nn.functional as F

from lorafuse import _C, ops
from lorafuse.autograd import lora_linear
from timing import (PASSES, Candidate, interleaved, lora_layer, make_base, make_inputs, pass_candidates, pass_grid,
                    rotated, start)

FLUSH_SHAPE = (512, 1024, 1024, 16)  # n, k, m, r: issue 6's 512×1024×1024


class Flusher:
    """Runs the flush kernel and adds up its time, to be subtracted from the timed call."""

    def __init__(self) -> None:
        n, k, m, r = FLUSH_SHAPE
        self.args = (torch.randn(n, k), torch.randn(m, k), torch.randn(r, k), torch.randn(m, r), 2.0,
                     torch.randn(m), None, None, 0.0, 0, False, False, None)
        self.spent = 0

    def __call__(self) -> None:
        t0 = time.perf_counter_ns()
        _C.lora_forward(*self.args)
        self.spent += time.perf_counter_ns() - t0


class FlushingC:
    """`lorafuse._C` for `ops`, with a flush after every kernel call."""

    def __init__(self, flush: Flusher) -> None:
        self.flush = flush

    def __getattr__(self, name: str) -> Any:
        return getattr(_C, name)

    def lora_forward(self, *args: Any) -> Any:
        out = _C.lora_forward(*args)
        self.flush()
        return out

    def lora_backward(self, *args: Any) -> Any:
        out = _C.lora_backward(*args)
        self.flush()
        return out


class NoOp(torch.autograd.Function):
    """The floor of a custom autograd.Function: forward allocates y, backward returns None."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, flush: Flusher) -> torch.Tensor:
        ctx.flush = flush
        flush()
        return x.new_empty(x.shape)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        ctx.flush()
        return None, None


def cold_medians(cands: Dict[str, Candidate], flush: Flusher, rounds: int) -> Dict[str, float]:
    """Median µs per call of each candidate, run interleaved in rotated order, flush time subtracted;
    the candidate's contexts (grad mode) are entered before the untimed flush."""
    samples: Dict[str, list] = {name: [] for name in cands}
    for i in range(rounds):
        for name in rotated(list(cands), i):
            with cands[name].entered():
                flush()
                flush.spent = 0
                t0 = time.perf_counter_ns()
                cands[name].fn()
                samples[name].append((time.perf_counter_ns() - t0 - flush.spent) / 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def cold_section(lf: Any, x: torch.Tensor, g: torch.Tensor, rounds: int) -> None:
    flush = Flusher()
    W, b = lf.base_layer.weight.detach(), lf.base_layer.bias.detach()
    A, B = lf.lora_A["default"].weight.detach(), lf.lora_B["default"].weight.detach()

    def c_fwd() -> None:
        torch.from_numpy(_C.lora_forward(x, W, A, B, 2.0, b, None, None, 0.0, 0, False, False, None)[0])
        flush()

    def noop_fb() -> None:
        NoOp.apply(x.detach().requires_grad_(True), flush).backward(g)

    def mul_fb() -> None:
        y = x.detach().requires_grad_(True) * 2.0
        flush()
        y.backward(g)
        flush()

    real_c = ops._C
    ops._C = FlushingC(flush)
    try:
        layer = pass_candidates(lf, x, g)
        t = cold_medians({"_C.lora_forward + torch.from_numpy": Candidate(c_fwd, (torch.no_grad,)),
                          **{f"FusedLinear {p}": layer[p] for p in PASSES},
                          "no-op autograd.Function f+b": Candidate(noop_fb),
                          "torch x*2 forward+backward": Candidate(mul_fb)}, flush, rounds)
    finally:
        ops._C = real_c
    print(f"\ncold (after a {'×'.join(map(str, FLUSH_SHAPE[:3]))} kernel; median of {rounds}):")
    for name, us in t.items():
        print(f"  {name:48s} {us:8.1f} µs")


def main() -> None:
    args = start(__doc__, "bench_overhead: per-call cost of each layer (n=1, k=m=16, r=4)")
    n, k, m, r = 1, 16, 16, 4
    base = make_base(k, m)
    lf, pf = lora_layer(base, r), lora_layer(base, r, "peft")
    x, g = make_inputs(n, k, m)
    W, b = base.weight.detach(), base.bias.detach()
    A, B = lf.lora_A["default"].weight.detach(), lf.lora_B["default"].weight.detach()
    xn, Wn, bn, An, Bn = (t.numpy() for t in (x, W, b, A, B))
    y, u = np.empty((n, m), np.float32), np.empty((n, r), np.float32)
    no_grad = (torch.no_grad,)
    cands = {
        "_C.lora_forward (preallocated out)": Candidate(lambda: _C.lora_forward(xn, Wn, An, Bn, 2.0, bn, y, u)),
        "ops.lora_forward": Candidate(lambda: ops.lora_forward(xn, Wn, An, Bn, 2.0, bn)),
        "autograd lora_linear (no_grad)": Candidate(lambda: lora_linear(x, W, b, A, B, 2.0), no_grad),
        "torch F.linear (base only)": Candidate(lambda: F.linear(x, W, b), no_grad),
    }
    modules = pass_grid({"lorafuse FusedLinear module": lf, "PEFT lora.Linear module": pf,
                         "base nn.Linear module": base}, x, g)
    cands.update({f"{side}, {p}": cand for (side, p), cand in modules.items() if p != "fwd+bwd"})
    t = interleaved(cands, rounds=args.rounds, min_time=0.05)
    print("\nwarm (back-to-back calls):")
    for name, sec in t.items():
        print(f"  {name:48s} {sec * 1e6:8.2f} µs")
    cold_section(lf, x, g, rounds=args.rounds * 20)


if __name__ == "__main__":
    main()
