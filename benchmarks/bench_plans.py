"""The kernels' plan thresholds, measured: every path that fits a shape, forced (`plan=` of
`lorafuse.ops.lora_forward` / `lora_backward`), timed interleaved on the same operands, next to the
path the plan chooses by itself (kernels/cpu/lora.c lf_plan_forward / lf_plan_backward, with the
numbers of kernels/cpu/tunables.c). Each group straddles one threshold: a row whose chosen path is
not the fastest (beyond noise) says that threshold is off on this machine.

    python benchmarks/bench_plans.py [--threads 2] [--rounds 9] [--quick] [--isa avx2]

fp32, NumPy operands (no torch), median ms per call; "×best" = time / the fastest path's time.
"""
from __future__ import annotations

import numpy as np

import lorafuse
from lorafuse import _C, ops
from timing import arguments, begin, interleaved

# group: (what it straddles, [(n, k, m, r, need_u)], the paths to force)
FORWARD_GROUPS = {
    "decode": ("n ≤ 8 (LF_ROWDOTS_MAX_N): dot products of rows vs GEMMs",
               [(1, 4096, 4096, 16, True), (8, 4096, 4096, 16, True), (9, 4096, 4096, 16, True)],
               [("rowdots", "decode"), ("skinny", "few_tokens"), ("skinny", "augmented")]),
    "few tokens": ("8 < n ≤ few_tokens_max_n, m·k ≥ few_tokens_min_w: W read in place vs packed",
                   [(17, 4096, 4096, 16, True), (24, 4096, 4096, 16, True), (32, 4096, 4096, 16, True),
                    (48, 4096, 4096, 16, True), (24, 1024, 1024, 16, True), (24, 576, 576, 16, True)],
                   [("skinny", "few_tokens"), ("skinny", "augmented")]),
    "inference": ("need_u = False: W + s·B·A merged into W's panels (merged_is_cheaper) vs u formed",
                  [(512, 896, 128, 16, False), (512, 576, 576, 16, False), (512, 1024, 1024, 16, False)],
                  [("none", "merged"), ("skinny", "augmented"), ("gemm", "augmented")]),
}
BACKWARD_SHAPES = [(512, 1024, 1024, 16), (512, 1024, 1024, 64), (2048, 2048, 2048, 16)]
BACKWARD_PATHS = [("skinny", "skinny", "augmented"), ("gemm", "skinny", "augmented"),
                  ("skinny", "gemm", "augmented"), ("gemm", "gemm", "augmented")]


def operands(n: int, k: int, m: int, r: int):
    rng = np.random.default_rng(0)
    f = lambda *sh: rng.standard_normal(sh, dtype=np.float32)  # noqa: E731
    return f(n, k), f(m, k), f(r, k) * 0.1, f(m, r) * 0.1, f(m), f(n, m)


def fitting(cands: dict) -> dict:
    """The candidates whose forced plan fits these operands (a plan that does not raises ValueError)."""
    out = {}
    for plan, fn in cands.items():
        try:
            fn()
        except ValueError:
            continue
        out[plan] = fn
    return out


def report(label: str, times: dict, chosen: tuple) -> None:
    best = min(times.values())
    cells = "  ".join(f"{'/'.join(p)} {t * 1e3:8.3f} ms {t / best:5.2f}×best" for p, t in times.items())
    mark = "" if times[chosen] <= 1.05 * best else "   <- the chosen path is not the fastest"
    print(f"{label:26s} chosen {'/'.join(chosen):20s} | {cells}{mark}", flush=True)


def forward_group(shapes, paths, rounds: int) -> None:
    for n, k, m, r, need_u in shapes:
        x, W, A, B, b, _ = operands(n, k, m, r)
        ops.lora_forward(x, W, A, B, 2.0, b, need_u=need_u)
        chosen = _C.last_forward_plan()
        cands = {p: (lambda p=p: ops.lora_forward(x, W, A, B, 2.0, b, need_u=need_u, plan=p)) for p in paths}
        report(f"{n}×{k}×{m} r{r}{'' if need_u else ' no u'}", interleaved(fitting(cands), rounds=rounds), chosen)


def backward_group(shapes, rounds: int) -> None:
    for n, k, m, r in shapes:
        x, W, A, B, _, g = operands(n, k, m, r)
        _, u = ops.lora_forward(x, W, A, B, 2.0)
        ops.lora_backward(g, x, u, W, A, B, 2.0)
        chosen = _C.last_backward_plan()
        cands = {p: (lambda p=p: ops.lora_backward(g, x, u, W, A, B, 2.0, plan=p)) for p in BACKWARD_PATHS}
        report(f"{n}×{k}×{m} r{r}", interleaved(fitting(cands), rounds=rounds), chosen)


def main() -> None:
    ap = arguments(__doc__, quick="the first shape of each group")
    ap.add_argument("--isa", choices=["generic", "avx2", "avx512", "avx512_bf16"], help="force the micro-kernel ISA")
    args = ap.parse_args()
    if args.isa:
        _C.set_isa(args.isa)
    rounds = begin(args, "bench_plans: each plan path forced, vs the path the plan chooses (fp32)")
    pick = (lambda s: s[:1]) if args.quick else (lambda s: s)
    for name, (what, shapes, paths) in FORWARD_GROUPS.items():
        print(f"\n## forward, {name}: {what}")
        forward_group(pick(shapes), paths, rounds)
    print("\n## backward: v/dB and dA streamed (skinny, r ≤ 64) vs GEMMs")
    backward_group(pick(BACKWARD_SHAPES), rounds)
    print(f"\nlorafuse {lorafuse.__version__}: plans measured")


if __name__ == "__main__":
    main()
