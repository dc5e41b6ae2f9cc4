"""Speed of the 4-bit data layer (lorafuse.quant): dequantizing an (m, k) NF4 weight with
double-quantized scales into fp32 and bf16, per ISA, against bitsandbytes' dequantize_4bit when it is
installed; and quantize_weight against bnb's quantize_4bit. Best of --rounds, one thread each. Each ISA level
the CPU has, forced (on avx512_bf16 and amx_bf16 a bf16 output takes the vpermw span where the CPU has AVX512-VBMI:
`lf_q4_span16_vbmi`); the whole W (64 MiB fp32, 32 MiB bf16) is written to memory, so the fast rows are bound by
that store bandwidth rather than by the dequantization.

    python benchmarks/bench_quant4.py [--size 4096] [--rounds 5]
"""
from __future__ import annotations

import argparse
import time

import torch

from lorafuse import _C, quant


def best(f, rounds: int) -> float:
    f()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        bnbf = None
    torch.set_num_threads(1)
    torch.manual_seed(0)
    W = torch.randn(args.size, args.size)
    data, state = quant.quantize_weight(W, "nf4", block_size=64, double_quant=True)
    isas = ["generic", "avx2", "avx512", "avx512_bf16", "amx_bf16"]
    isas = isas[: isas.index(_C.cpu_isa()) + 1] if _C.cpu_isa() in isas else isas
    print(f"dequantize {args.size}x{args.size} nf4, blocks of 64, double-quantized scales (ms, best of {args.rounds})")
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.empty(W.shape, dtype=dtype)
        row = []
        for isa in isas:
            _C.set_isa(isa)
            row.append(f"{isa} {best(lambda: quant.dequantize(data, state, dtype=dtype, out=out), args.rounds):.1f}")
        if bnbf is not None:
            state.dtype = dtype
            row.append(f"bitsandbytes {best(lambda: bnbf.dequantize_4bit(data, state), args.rounds):.1f}")
            state.dtype = W.dtype
        print(f"  {str(dtype):15s} " + " | ".join(row))
    line = f"quantize_weight: lorafuse {best(lambda: quant.quantize_weight(W), args.rounds):.0f} ms"
    if bnbf is not None:
        t = best(lambda: bnbf.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True), args.rounds)
        line += f", bitsandbytes {t:.0f} ms"
    print(line)


if __name__ == "__main__":
    main()
