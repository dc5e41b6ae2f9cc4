"""lorafuse's packed sgemm vs torch.matmul (MKL/oneDNN) on the LoRA shapes, against this CPU's
measured fp32 peak (benchmarks/fma_peak.c: register-only FMA loop, 1 and N threads).

    python benchmarks/bench_gemm.py [--threads 2] [--rounds 9] [--quick] [--dtype fp32|bf16|fp16]

--dtype bf16 / fp16: ops.hgemm on bf16 / fp16 tensors vs torch.matmul on the same tensors (torch
returns bf16 / fp16, lorafuse fp32), each row labelled with the path measured (_C.hgemm_path:
'amx_bf16' = AMX tdpbf16ps tiles on the amx_bf16 ISA, 'bf16_pairs' = vdpbf16ps on the avx512_bf16 ISA,
'widened' = converted to fp32 while packing, the fp32 kernels; '/w_rows': run transposed, W's rows read in
place (hgemm_path's orientation); for bf16 every path the CPU has is
timed, each with its ISA forced: amx_bf16, avx512_bf16, avx512), against the measured peak of its
instruction (fma_peak.c amx / bf16 / zmm modes; ymm on CPUs without AVX-512). fma_peak.c is x86 AVX2 code: on
other CPUs (lorafuse's ISA 'generic') the peak is not measured and the '% peak' column reads '—'.
"""
from __future__ import annotations

import os
import subprocess
import tempfile

import numpy as np
import torch

from lorafuse import ops
from timing import arguments, begin, interleaved

SHAPES = [  # M (tokens) × K (in) × N (out): y = x·Wᵀ
    (512, 576, 576), (512, 1024, 1024),
    (2048, 2048, 2048), (1024, 4096, 4096), (256, 4096, 14336), (256, 14336, 4096),
]

HERE = os.path.dirname(os.path.abspath(__file__))


def fma_width() -> str | None:
    """The widest FMA this CPU runs: "zmm" where lorafuse found AVX-512, "ymm" with AVX2, None elsewhere (not
    x86-64, or no AVX2: fma_peak.c cannot run)."""
    from lorafuse import _C

    isa = _C.cpu_isa()
    return "zmm" if isa in ("avx512", "avx512_bf16", "amx_bf16") else None if isa == "generic" else "ymm"


def share_of(gflops: float, peak: float | None) -> str:
    """gflops as a percentage of peak (5 columns), or '—' where the peak was not measured."""
    return f"{100 * gflops / peak:5.1f}%" if peak else f"{'—':>6}"


def fma_peak(threads: int, modes: tuple) -> dict:
    """GFLOP/s of the FMA-only loop for each mode (zmm, ymm; bf16: vdpbf16ps; amx), 1 thread and
    `threads` threads: the best of 3 runs each, since on a shared VM one descheduled thread halves
    a single run. Modes the CPU lacks fault (SIGILL): callers pass only what cpu_isa reports."""
    exe = os.path.join(tempfile.gettempdir(), "lorafuse_fma_peak")
    subprocess.run(["gcc", "-O2", "-mavx2", "-mfma", "-pthread", os.path.join(HERE, "fma_peak.c"), "-o", exe],
                   check=True)
    res = {}
    for width in modes:
        for t in sorted({1, threads}):
            runs = [subprocess.run([exe, str(t), width], capture_output=True, text=True, check=True)
                    for _ in range(3)]
            res[(width, t)] = max(float(out.stdout) for out in runs)
    return res


def main() -> None:
    ap = arguments(__doc__, quick="the first three shapes")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    args = ap.parse_args()
    if args.dtype != "fp32":
        return half_main(args, begin(args, f"bench_gemm: lorafuse hgemm vs torch.matmul, {args.dtype}"))
    rounds = begin(args, "bench_gemm: lorafuse sgemm vs torch.matmul")
    wide = fma_width()
    peak = fma_peak(args.threads, (wide, "ymm") if wide == "zmm" else ("ymm",)) if wide else {}
    for (width, t), g in peak.items():
        print(f"# FMA-only loop {width} x{t} thread(s): {g:.1f} GFLOP/s")
    peak_n = None
    if wide:
        p1, pn = peak[(wide, 1)], peak[(wide, args.threads)]
        print(f"# scaling {args.threads} threads / 1 = {pn / p1:.2f} "
              f"({'independent cores' if pn / p1 > 0.9 * args.threads else 'shared FMA units (SMT?)'})")
        peak_n = max(peak[(wide, args.threads)], peak[("ymm", args.threads)])
    else:
        print("# FMA peak not measured: fma_peak.c needs x86-64 with AVX2 (lorafuse's ISA here: generic)")
    print(f"\n{'M':>6} {'K':>6} {'N':>6} | {'lorafuse GF/s':>13} {'torch GF/s':>10} | "
          f"{'ours/torch':>10} | {'% peak':>6}")
    rng = np.random.default_rng(0)
    for M, K, N in (SHAPES[:3] if args.quick else SHAPES):
        x = rng.standard_normal((M, K), dtype=np.float32)
        w = rng.standard_normal((N, K), dtype=np.float32)
        out = np.empty((M, N), np.float32)
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        tout = torch.empty(M, N)
        t = interleaved({"ours": lambda: ops.sgemm(x, w.T, out=out),
                         "torch": lambda: torch.matmul(tx, tw.t(), out=tout)},
                        rounds=rounds)
        fl = 2.0 * M * N * K
        g_ours, g_torch = fl / t["ours"] / 1e9, fl / t["torch"] / 1e9
        print(f"{M:6d} {K:6d} {N:6d} | {g_ours:13.1f} {g_torch:10.1f} | {t['torch'] / t['ours']:10.3f} | "
              f"{share_of(g_ours, peak_n)}")
    packing_share(rounds)


def half_main(args, rounds: int) -> None:
    """ops.hgemm vs torch.matmul on bf16 / fp16 operands (see the module's docstring), ``rounds`` rounds."""
    from lorafuse import _C

    order = ["amx_bf16", "avx512_bf16", "avx512"]  # the bf16 paths, best first, by the ISA that runs them
    isas = order[order.index(_C.cpu_isa()):] if args.dtype == "bf16" and _C.cpu_isa() in order[:2] else [_C.get_isa()]
    modes = {"amx_bf16": "amx", "avx512_bf16": "bf16"}  # fma_peak.c mode of each native path
    wide = fma_width()
    peak = fma_peak(args.threads, (wide,) + tuple(modes[i] for i in isas if i in modes)) if wide else {}
    names = {"amx": "tdpbf16ps (4 tiles)", "bf16": "vdpbf16ps zmm", "zmm": "FMA zmm", "ymm": "FMA ymm"}
    for (mode, t), g in peak.items():
        print(f"# {names[mode]}-only loop x{t} thread(s): {g:.1f} GFLOP/s")
    print(f"# torch: mkldnn bf16 {torch.backends.mkldnn.is_available()}, AMX-capable CPU "
          f"{'amx_bf16' in open('/proc/cpuinfo').read() if os.path.exists('/proc/cpuinfo') else '?'}")
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    before = _C.get_isa()
    print(f"\n{'M':>6} {'K':>6} {'N':>6} | {'path (isa)':>31} | {'lorafuse GF/s':>13} {'torch GF/s':>10} | "
          f"{'ours/torch':>10} | {'% peak':>6}")
    rng = np.random.default_rng(0)
    try:
        for M, K, N in (SHAPES[:3] if args.quick else SHAPES):
            x = torch.from_numpy(rng.standard_normal((M, K), dtype=np.float32)).to(dt)
            w = torch.from_numpy(rng.standard_normal((N, K), dtype=np.float32)).to(dt)
            out, tout = np.empty((M, N), np.float32), torch.empty(M, N, dtype=dt)
            cands = {"torch": lambda: torch.matmul(x, w.t(), out=tout)}
            for isa in isas:
                cands[isa] = lambda isa=isa: (_C.set_isa(isa), ops.hgemm(x, w.t(), out=out))
            t = interleaved(cands, rounds=rounds)
            fl = 2.0 * M * N * K
            for isa in isas:
                _C.set_isa(isa)
                path, _, _, orient = _C.hgemm_path(x, w.t())
                pk = peak.get(({"amx_bf16": "amx", "bf16_pairs": "bf16"}.get(path, wide), args.threads))
                g, gt = fl / t[isa] / 1e9, fl / t["torch"] / 1e9
                label = path + ("/w_rows" if orient == "w_rows" else "") + f" ({isa})"
                print(f"{M:6d} {K:6d} {N:6d} | {label:>31} | {g:13.1f} {gt:10.1f} | "
                      f"{t['torch'] / t[isa]:10.3f} | {share_of(g, pk)}")
    finally:
        _C.set_isa(before)
    print("# % peak: of the tdpbf16ps loop for amx_bf16 rows, of the vdpbf16ps loop for bf16_pairs rows, "
          f"of the {wide or 'FMA (not measured here)'} loop for widened ones")


def packing_share(rounds: int) -> None:
    """How much a cache of W's packed panels could save: with M = 12 (one row panel) the GEMM
    is almost only the packing of W (k·m floats); compare with the full call at n tokens."""
    print("\n# W-packing share (what caching packed W across calls could save)")
    print(f"{'k':>6} {'m':>6} {'n':>5} | {'M=12 call ms':>12} {'full call ms':>12} | {'share':>6} | packed W MiB")
    rng = np.random.default_rng(1)
    for k, m, n in ((576, 576, 512), (1024, 1024, 512), (4096, 4096, 1024)):
        w = rng.standard_normal((m, k), dtype=np.float32)
        x12, xn = rng.standard_normal((12, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32)
        t = interleaved({"12": lambda: ops.sgemm(x12, w.T), "n": lambda: ops.sgemm(xn, w.T)}, rounds=rounds)
        compute12 = t["n"] * 12 / n  # the arithmetic of 12 rows at the full call's rate
        pack = max(t["12"] - compute12, 0.0)
        print(f"{k:6d} {m:6d} {n:5d} | {t['12'] * 1e3:12.3f} {t['n'] * 1e3:12.3f} | {100 * pack / t['n']:5.1f}% | "
              f"{k * m * 4 / 2**20:.1f}")


if __name__ == "__main__":
    main()
