"""Per-call overhead of each layer of the stack, on a shape so small that the arithmetic is
negligible (n=1, k=m=16, r=4): _C → ops → autograd.Function → FusedLinear module (PEFT's layer, fused), next to PEFT's
lora.Linear and a bare torch F.linear. What is left at decode sizes is this overhead.

"cold": the same path as it runs in a model, right after a large kernel has flushed the caches.
Each lorafuse kernel call is followed by a 512×1024×1024 LoRA forward (the "flush"; its own time
is measured and subtracted), and one runs before each timed call, so every Python segment
between kernels starts on cold caches. Printed for lorafuse's forward (no grad) and
forward+backward next to two floors every autograd user pays: a do-nothing
torch.autograd.Function and torch's own `x * 2` (forward, flush, backward, flush).

    python benchmarks/bench_overhead.py [--threads 2] [--rounds 9]
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict

import numpy as np
import torch
import torch.nn.functional as F

from bench_layer import make_layers
from lorafuse import _C, ops
from lorafuse.autograd import lora_linear
from timing import interleaved, start

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


def cold_medians(cands: Dict[str, tuple[Callable[[], Any], bool]], flush: Flusher, rounds: int) -> Dict[str, float]:
    """Median µs per call of each candidate (function, grad mode it runs in), run interleaved,
    flush time subtracted; grad mode is set before the untimed flush."""
    samples: Dict[str, list] = {name: [] for name in cands}
    for _ in range(rounds):
        for name, (fn, grad) in cands.items():
            torch.set_grad_enabled(grad)
            flush()
            flush.spent = 0
            t0 = time.perf_counter_ns()
            fn()
            samples[name].append((time.perf_counter_ns() - t0 - flush.spent) / 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def cold_section(lf: Any, x: torch.Tensor, g: torch.Tensor, rounds: int) -> None:
    flush = Flusher()
    W, b = lf.base_layer.weight.detach(), lf.base_layer.bias.detach()
    A, B = lf.lora_A["default"].weight.detach(), lf.lora_B["default"].weight.detach()

    def c_fwd() -> None:
        torch.from_numpy(_C.lora_forward(x, W, A, B, 2.0, b, None, None, 0.0, 0, False, False, None)[0])
        flush()

    def layer_fwd() -> None:
        lf(x)

    def layer_fb() -> None:
        lf(x.detach().requires_grad_(True)).backward(g)

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
        t = cold_medians({"_C.lora_forward + torch.from_numpy": (c_fwd, False),
                          "FusedLinear forward (no grad)": (layer_fwd, False),
                          "FusedLinear forward+backward": (layer_fb, True),
                          "no-op autograd.Function f+b": (noop_fb, True),
                          "torch x*2 forward+backward": (mul_fb, True)}, flush, rounds)
    finally:
        ops._C = real_c
        torch.set_grad_enabled(True)
    print(f"\ncold (after a {'×'.join(map(str, FLUSH_SHAPE[:3]))} kernel; median of {rounds}):")
    for name, us in t.items():
        print(f"  {name:38s} {us:8.1f} µs")


def main() -> None:
    args = start(__doc__, "bench_overhead: per-call cost of each layer (n=1, k=m=16, r=4)")
    n, k, m, r = 1, 16, 16, 4
    lf, _, pf, base = make_layers(k, m, r)
    x, g = torch.randn(n, k), torch.randn(n, m)
    W, b = base.weight.detach(), base.bias.detach()
    A, B = lf.lora_A["default"].weight.detach(), lf.lora_B["default"].weight.detach()
    xn, Wn, bn, An, Bn = (t.numpy() for t in (x, W, b, A, B))
    y, u = np.empty((n, m), np.float32), np.empty((n, r), np.float32)
    with torch.no_grad():
        t = interleaved({
            "_C.lora_forward (preallocated out)": lambda: _C.lora_forward(xn, Wn, An, Bn, 2.0, bn, y, u),
            "ops.lora_forward": lambda: ops.lora_forward(xn, Wn, An, Bn, 2.0, bn),
            "autograd lora_linear": lambda: lora_linear(x, W, b, A, B, 2.0),
            "lorafuse FusedLinear module": lambda: lf(x),
            "PEFT lora.Linear module": lambda: pf(x),
            "torch F.linear (base only)": lambda: F.linear(x, W, b),
        }, rounds=args.rounds, min_time=0.05)
    print("\nwarm (back-to-back calls):")
    for name, sec in t.items():
        print(f"  {name:38s} {sec * 1e6:8.2f} µs")
    cold_section(lf, x, g, rounds=args.rounds * 20)


if __name__ == "__main__":
    main()
