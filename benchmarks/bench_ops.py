"""lorafuse.ops (fused C) vs torch's unfused composition `F.linear(x, W, b) + s·F.linear(F.linear(x, A), B)` and
`F.linear` of the base alone, and vs NumPy's composition — same thread count, interleaved in rotated order,
medians. Every compared call allocates its outputs (lorafuse's through its output cache, also shown off:
"cache off", `lorafuse.set_output_cache_limit(0)`); one extra row, labelled, gives lorafuse's training forward
into preallocated `out=`/`u_out=` (torch's rows have no such variant). Three passes:

- forward (no_grad): lorafuse `need_u=False` (may add s·B·A to W's packed panels), torch under `torch.no_grad`;
- forward (grad): lorafuse `need_u=True` (u returned for the backward), torch with A and B requiring grad
  (the autograd graph built);
- fwd+bwd: that forward and the adapter-only backward (dx, dA, dB; autograd on the torch side).

NumPy's composition is timed in a group of its own, against lorafuse's forward (no_grad) (its OpenBLAS
pool spin-waits between calls and slowed every other candidate when interleaved with them).
Then: does lorafuse's thread pool slow torch (or the reverse) when calls alternate?

    python benchmarks/bench_ops.py [--threads 2] [--rounds 7] [--quick]
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from lorafuse import ops
from timing import PASSES, Candidate, arguments, begin, interleaved, plan_label

SHAPES = [  # n tokens, k in, m out, r
    (8, 576, 576, 16),
    (512, 576, 576, 16),
    (512, 1024, 1024, 16),
    (2048, 2048, 2048, 16),
]
SCALE = 2.0


def lorafuse_passes(x: np.ndarray, W: np.ndarray, b: np.ndarray, A: np.ndarray, B: np.ndarray,
                    g: np.ndarray) -> dict[str, Candidate]:
    """lorafuse.ops calls of each pass, outputs allocated by lorafuse. NumPy float32 operands: x (n, k),
    W (m, k), b (m,), A (r, k), B (m, r), the upstream gradient g (n, m)."""
    def train_step() -> tuple:
        _, u = ops.lora_forward(x, W, A, B, SCALE, b)
        return ops.lora_backward(g, x, u, W, A, B, SCALE)

    return {PASSES[0]: Candidate(lambda: ops.lora_forward(x, W, A, B, SCALE, b, need_u=False)),
            PASSES[1]: Candidate(lambda: ops.lora_forward(x, W, A, B, SCALE, b)),
            PASSES[2]: Candidate(train_step)}


def torch_passes(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 g: torch.Tensor) -> dict[str, Candidate]:
    """torch's unfused composition in each pass; shapes as in `lorafuse_passes`, A and B requiring grad."""
    def forward() -> torch.Tensor:
        return F.linear(x, W, b) + SCALE * F.linear(F.linear(x, A), B)

    def train_step() -> None:
        xx = x.detach().requires_grad_(True)
        A.grad = B.grad = None
        (F.linear(xx, W, b) + SCALE * F.linear(F.linear(xx, A), B)).backward(g)

    return {PASSES[0]: Candidate(forward, (torch.no_grad,)), PASSES[1]: Candidate(forward),
            PASSES[2]: Candidate(train_step)}


def numpy_forward(x: np.ndarray, W: np.ndarray, b: np.ndarray, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """y (n, m) = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ composed in NumPy (shapes as in `lorafuse_passes`)."""
    return x @ W.T + b + SCALE * ((x @ A.T) @ B.T)


def bench_shape(n: int, k: int, m: int, r: int, rounds: int) -> None:
    """Every pass of every side at n tokens × k in × m out, rank r; prints the table of the shape."""
    rng = np.random.default_rng(0)
    f = lambda *sh: rng.standard_normal(sh, dtype=np.float32)  # noqa: E731
    x, W, b, A, B, g = f(n, k), f(m, k), f(m), f(r, k) * 0.1, f(m, r) * 0.1, f(n, m)
    lf = lorafuse_passes(x, W, b, A, B, g)
    # NumPy's own BLAS (OpenBLAS) has a thread pool of its own that spin-waits after each call:
    # timed in a group of its own, so that it cannot slow the torch and lorafuse calls
    t_np = interleaved({"lorafuse": lf[PASSES[0]], "numpy": lambda: numpy_forward(x, W, b, A, B)}, rounds=rounds)
    time.sleep(0.5)  # let OpenBLAS's workers go to sleep
    tx, tW, tb, tA, tB, tg = (torch.from_numpy(a) for a in (x, W, b, A, B, g))
    tA.requires_grad_(True)
    tB.requires_grad_(True)
    tt = torch_passes(tx, tW, tb, tA, tB, tg)
    y, u = ops.lora_forward(x, W, A, B, SCALE, b)
    cands = {("torch F.linear base", PASSES[0]): Candidate(lambda: F.linear(tx, tW, tb), (torch.no_grad,)),
             ("lorafuse, preallocated out=/u_out=", PASSES[1]):
                 Candidate(lambda: ops.lora_forward(x, W, A, B, SCALE, b, out=y, u_out=u))}
    for p in PASSES:
        cands[("lorafuse", p)], cands[("lorafuse, cache off", p)] = lf[p], lf[p].cache_off()
        cands[("torch unfused", p)] = tt[p]
    t = interleaved(cands, rounds=rounds, prime=True)
    flops = 2 * n * (k * m + r * (k + m))
    print(f"\n## n={n} k={k} m={m} r={r}  ({flops / 1e9:.3f} GFLOP fwd)")
    print(f"  {'pass':17s} {'lorafuse ms':>11} {'cache off ms':>12} {'torch unfused ms':>16} | "
          f"{'lf/unfused':>10} {'cache off/unfused':>17} | lorafuse plan")
    for p in PASSES:
        lf_t, off_t, un_t = t[("lorafuse", p)], t[("lorafuse, cache off", p)], t[("torch unfused", p)]
        print(f"  {p:17s} {lf_t * 1e3:11.3f} {off_t * 1e3:12.3f} {un_t * 1e3:16.3f} | {lf_t / un_t:10.3f} "
              f"{off_t / un_t:17.3f} | {plan_label(lf[p])}")
    base_t, pre_t = t[("torch F.linear base", PASSES[0])], t[("lorafuse, preallocated out=/u_out=", PASSES[1])]
    print(f"  ratio lorafuse forward (no_grad) / F.linear base (no_grad, {base_t * 1e3:.3f} ms)   "
          f"{t[('lorafuse', PASSES[0])] / base_t:.3f}")
    print(f"  lorafuse forward (grad) into preallocated out=/u_out= {pre_t * 1e3:.3f} ms: "
          f"{pre_t / t[('lorafuse', PASSES[1])]:.3f} × the allocating call (no torch counterpart)")
    print(f"  ratio lorafuse/numpy forward (no_grad)  {t_np['lorafuse'] / t_np['numpy']:.3f}"
          "   (NumPy group: OpenBLAS's spinning workers share the cores)")


def bench_interference(rounds: int) -> None:
    """Alternate a torch matmul and a lorafuse GEMM of the same size: each timed alone and
    alternating. With two spin-waiting pools on 2 cores the alternating times would balloon."""
    n = 512
    a = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    ta = torch.from_numpy(a)
    lf = lambda: ops.sgemm(a, a)  # noqa: E731
    tm = lambda: torch.mm(ta, ta)  # noqa: E731

    def alternate() -> None:
        tm()
        lf()

    t = interleaved({"torch alone": tm, "lorafuse alone": lf, "alternating pair": alternate}, rounds=rounds)
    alone = t["torch alone"] + t["lorafuse alone"]
    print(f"\n## thread-pool interference ({n}x{n}x{n} GEMMs, both allocating)")
    for name, sec in t.items():
        print(f"  {name:28s} {sec * 1e3:9.3f} ms")
    print(f"  ratio alternating / (torch alone + lorafuse alone)  {t['alternating pair'] / alone:.3f}")


def main() -> None:
    args = arguments(__doc__, rounds=7, quick="two small shapes").parse_args()
    rounds = begin(args, "bench_ops: lorafuse.ops vs torch / NumPy")
    for shape in SHAPES[:2] if args.quick else SHAPES:
        bench_shape(*shape, rounds)
    bench_interference(rounds)


if __name__ == "__main__":
    main()
