"""Where a LoRA layer's time goes on the GPU: torch.profiler's per-kernel CUDA time, lorafuse vs PEFT.

    python benchmarks/profile_gpu.py [--tokens 8192] [--shapes 4096x4096,4096x1024] [--rank 16] [--host-profile]

For each shape: the layers of benchmarks/bench_gpu.py (bf16 base, PEFT's default fp32 adapters, the same
weights), a few warm-up calls, then `--iters` fwd (no_grad) and `--iters` fwd+bwd calls of each side under
torch.profiler; prints each side's kernels by total CUDA time (µs per call) — the GEMMs, casts and
elementwise passes that make up the gap to the base GEMM.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
from typing import Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import build_layers, parse_shapes  # noqa: E402


def kernel_table(prof: profile, calls: int, top: int) -> str:
    """The `top` kernels by CUDA time, in µs per layer call."""
    rows = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    rows.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in rows)
    out = [f"    {'µs/call':>9} {'count/call':>10}  kernel  (all kernels: {total / calls:.1f} µs/call)"]
    for e in rows[:top]:
        out.append(f"    {e.device_time_total / calls:9.1f} {e.count / calls:10.1f}  {e.key[:110]}")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--shapes", default="4096x4096,4096x1024")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--host-profile", action="store_true", help="also cProfile ours fwd+bwd (host side)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_gpu: no CUDA GPU visible to torch", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    for k, m in parse_shapes(args.shapes):
        layers = build_layers(k, m, args.rank, 2.0 * args.rank, torch.bfloat16, True, dev, seed=0)
        x = torch.randn(args.tokens, k, device=dev, dtype=torch.bfloat16)
        xg = x.clone().requires_grad_(True)
        g = torch.randn(args.tokens, m, device=dev, dtype=torch.bfloat16)
        print(f"\n## {k}→{m}, n = {args.tokens}, r = {args.rank}; ours backend: {layers['ours'].backend}")
        for side in ("base", "peft", "ours"):
            mod = layers[side]

            def fwd() -> None:
                with torch.no_grad():
                    mod(x)

            def fwd_bwd() -> None:
                xg.grad = None
                mod(xg).backward(g)
            for name, fn in (("fwd (no_grad)", fwd), ("fwd+bwd", fwd_bwd)):
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(args.iters):
                        fn()
                    torch.cuda.synchronize()
                print(f"  {side} {name}:")
                print(kernel_table(prof, args.iters, args.top))
            if side == "ours" and args.host_profile:
                host_profile(fwd_bwd, args.iters * 4)
    return 0


def host_profile(fn, calls: int) -> None:
    """The Python functions behind `calls` calls of fn, by own time: the host side of a small layer."""
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
    print(f"  ours fwd+bwd host side ({calls} calls, cProfile):")
    print("\n".join("    " + line for line in out.getvalue().splitlines() if line.strip()))


if __name__ == "__main__":
    sys.exit(main())
