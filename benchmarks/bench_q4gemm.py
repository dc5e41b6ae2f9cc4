"""The fused 4-bit GEMM (quant.matmul_4bit, _C.q4gemm: W's NF4 codes dequantized inside the GEMM's packing)
against what QLoRA on the CPU does today — bitsandbytes' dequantize_4bit to bf16, then torch's bf16 matmul —
and against lorafuse's bf16 GEMM (ops.hgemm) and torch's on a W already held in bf16 (no dequantization:
the floor). y = x·Wᵀ with x (n, k) bf16, W (m, k) quantized by bnb's quantize_4bit (NF4, blocks of 64,
double-quantized scales); lorafuse returns fp32, torch bf16. Candidates interleaved in rotated order,
median of --rounds (timing.py), the same thread count for torch and lorafuse; each row names the tile
measured (_C.q4gemm_path / hgemm_path: amx_bf16, bf16_pairs or widened). --dx times dx = g·W instead.

    python benchmarks/bench_q4gemm.py [--threads 2] [--rounds 9] [--quick] [--dx]
"""
from __future__ import annotations

import numpy as np
import torch

from lorafuse import _C, ops, quant
from timing import arguments, begin, interleaved

SHAPES = [(512, 1024, 1024), (2048, 2048, 2048), (1, 4096, 4096), (8, 4096, 4096)]  # n × k × m
QUICK = [(64, 256, 256), (1, 512, 512)]


def stored(W: torch.Tensor):
    """(data, quant_state, bnb.functional or None): bnb's quantize_4bit when installed, else lorafuse's
    (the same bits)"""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        data, state = quant.quantize_weight(W, "nf4", block_size=64, double_quant=True)
        return data, state, None
    data, state = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    return data, state, bnbf


def main() -> None:
    ap = arguments(__doc__, quick="two small shapes")
    ap.add_argument("--dx", action="store_true", help="time dx = g·W (W not transposed) instead of y = x·Wᵀ")
    args = ap.parse_args()
    what = "dx = g·W" if args.dx else "y = x·Wᵀ"
    rounds = begin(args, f"bench_q4gemm: {what}, W 4-bit NF4 (B = 64, nested) vs bnb dequantize_4bit"
                          " + torch bf16 matmul")
    print(f"{'n':>5} {'k':>5} {'m':>5} | {'path':>9} | {'q4 fused':>9} {'bnb+torch':>9} {'hgemm bf16W':>11} "
          f"{'torch bf16W':>11} (ms) | {'bnb+torch / fused':>17} | {'fused / hgemm':>13}")
    torch.manual_seed(0)
    for n, k, m in QUICK if args.quick else SHAPES:
        Wb = (torch.randn(m, k) * 0.02).to(torch.bfloat16)
        data, state, bnbf = stored(Wb)
        Wd = quant.dequantize(data, state, dtype=torch.bfloat16)  # bnb's dequantize_4bit bits
        inner, outer = (m, k) if args.dx else (k, m)  # x (n, inner) · op(W) (inner, outer)
        x = torch.randn(n, inner).to(torch.bfloat16)
        opW = Wd if args.dx else Wd.t()
        out = torch.empty(n, outer)
        out_np = out.numpy()
        cands = {
            "q4": lambda: quant.matmul_4bit(x, data, state, transpose=not args.dx, out=out),
            "hgemm": lambda: ops.hgemm(x, opW, out=out_np),
            "torch": lambda: torch.matmul(x, opW),
        }
        if bnbf is not None:
            cands["bnb"] = lambda: torch.matmul(x, bnbf.dequantize_4bit(data, state) if args.dx
                                                else bnbf.dequantize_4bit(data, state).t())
        t = interleaved(cands, rounds=rounds)
        path = _C.q4gemm_path(x)[0]
        assert _C.hgemm_path(x, opW)[0] == path
        ms = {name: f"{v * 1e3:9.3f}" for name, v in t.items()}
        bnb = ms.get("bnb", f"{'-':>9}")
        ratio = f"{t['bnb'] / t['q4']:17.2f}" if "bnb" in t else f"{'-':>17}"
        print(f"{n:5d} {k:5d} {m:5d} | {path:>9} | {ms['q4']} {bnb} {ms['hgemm']:>11} {ms['torch']:>11}      | "
              f"{ratio} | {t['q4'] / t['hgemm']:13.2f}")
        np.testing.assert_array_equal(quant.matmul_4bit(x, data, state, transpose=not args.dx).numpy(),
                                      ops.hgemm(x, opW))  # the same bits: the rows time the same product
    print("q4 fused: one GEMM, W's codes dequantized while packed; bnb+torch: W materialised in bf16, then matmul")


if __name__ == "__main__":
    main()
