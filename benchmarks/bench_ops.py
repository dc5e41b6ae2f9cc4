"""lorafuse.ops (fused C) vs NumPy composition, torch F.linear (base alone) and the PEFT-style
unfused torch path — forward and forward+backward, same thread count, interleaved, medians.
NumPy's composition is timed in a group of its own (its OpenBLAS pool spin-waits between calls
and slowed every other candidate when interleaved with them).
Then: does lorafuse's thread pool slow torch (or the reverse) when calls alternate?

    python benchmarks/bench_ops.py [--threads 2] [--rounds 7] [--quick]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import lorafuse
from lorafuse import ops
from timing import header, interleaved, plan_label, set_threads

SHAPES = [  # n tokens, k in, m out, r
    (8, 576, 576, 16),
    (512, 576, 576, 16),
    (512, 1024, 1024, 16),
    (2048, 2048, 2048, 16),
]


def numpy_forward(x, W, b, A, B, s):
    return x @ W.T + b + s * ((x @ A.T) @ B.T)


def bench_shape(n, k, m, r, rounds, torch):
    rng = np.random.default_rng(0)
    f = lambda *sh: rng.standard_normal(sh, dtype=np.float32)  # noqa: E731
    x, W, b, A, B, g = f(n, k), f(m, k), f(m), f(r, k) * 0.1, f(m, r) * 0.1, f(n, m)
    s = 2.0
    y, u = ops.lora_forward(x, W, A, B, s, b)
    fused = {
        "lorafuse fwd": lambda: ops.lora_forward(x, W, A, B, s, b, out=y, u_out=u),
        "lorafuse fwd+bwd": lambda: (ops.lora_forward(x, W, A, B, s, b, out=y, u_out=u),
                                     ops.lora_backward(g, x, u, W, A, B, s)),
    }
    # NumPy's own BLAS (OpenBLAS) has a thread pool of its own that spin-waits after each call:
    # timed in a group of its own, so that it cannot slow the torch and lorafuse calls
    t = interleaved({**fused, "numpy fwd": lambda: numpy_forward(x, W, b, A, B, s)}, rounds=rounds)
    if torch is not None:
        import torch.nn.functional as F

        time.sleep(0.5)  # let OpenBLAS's workers go to sleep
        tx, tW, tb, tA, tB, tg = (torch.from_numpy(a) for a in (x, W, b, A, B, g))

        def torch_unfused_fwd_bwd():
            xx = tx.detach().requires_grad_(True)
            a_ = tA.detach().requires_grad_(True)
            b_ = tB.detach().requires_grad_(True)
            yy = F.linear(xx, tW, tb) + s * F.linear(F.linear(xx, a_), b_)
            yy.backward(tg)

        t_torch = interleaved({**fused,
                               "torch F.linear base fwd": lambda: F.linear(tx, tW, tb),
                               "torch unfused fwd": lambda: F.linear(tx, tW, tb) + s * F.linear(F.linear(tx, tA), tB),
                               "torch unfused fwd+bwd": torch_unfused_fwd_bwd}, rounds=rounds)
        t = {**{f"{name} (vs numpy)" if name in fused else name: sec for name, sec in t.items()}, **t_torch}
    flops = 2 * n * (k * m + r * (k + m))
    print(f"\n## n={n} k={k} m={m} r={r}  ({flops / 1e9:.3f} GFLOP fwd)  "
          f"lorafuse plan: fwd+bwd {plan_label(fused['lorafuse fwd+bwd'])}")
    for name, sec in t.items():
        print(f"  {name:28s} {sec * 1e3:9.3f} ms")
    fwd_vs_numpy = t.get("lorafuse fwd (vs numpy)", t["lorafuse fwd"])
    print(f"  ratio lorafuse/numpy fwd          {fwd_vs_numpy / t['numpy fwd']:.3f}"
          "   (NumPy group: OpenBLAS's spinning workers share the cores)")
    if torch is not None:
        print(f"  ratio lorafuse/F.linear base fwd  {t['lorafuse fwd'] / t['torch F.linear base fwd']:.3f}")
        print(f"  ratio lorafuse/torch unfused fwd  {t['lorafuse fwd'] / t['torch unfused fwd']:.3f}")
        print(f"  ratio lorafuse/torch unfused f+b  {t['lorafuse fwd+bwd'] / t['torch unfused fwd+bwd']:.3f}")


def bench_interference(rounds, torch):
    """Alternate a torch matmul and a lorafuse GEMM of the same size: each timed alone and
    alternating. With two spin-waiting pools on 2 cores the alternating times would balloon."""
    n = 512
    a = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    ta = torch.from_numpy(a)
    out = np.empty_like(a)
    lf = lambda: ops.sgemm(a, a, out=out)  # noqa: E731
    tm = lambda: torch.mm(ta, ta)  # noqa: E731

    def alternate():
        tm()
        lf()

    t = interleaved({"torch alone": tm, "lorafuse alone": lf, "alternating pair": alternate}, rounds=rounds)
    alone = t["torch alone"] + t["lorafuse alone"]
    print(f"\n## thread-pool interference ({n}x{n}x{n} GEMMs)")
    for name, sec in t.items():
        print(f"  {name:28s} {sec * 1e3:9.3f} ms")
    print(f"  ratio alternating / (torch alone + lorafuse alone)  {t['alternating pair'] / alone:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="two small shapes, 3 rounds")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        torch = None
    set_threads(args.threads)
    header("bench_ops: lorafuse.ops vs NumPy / torch", args.threads)
    shapes = SHAPES[:2] if args.quick else SHAPES
    rounds = 3 if args.quick else args.rounds
    for shape in shapes:
        bench_shape(*shape, rounds, torch)
    if torch is not None:
        bench_interference(rounds, torch)


if __name__ == "__main__":
    main()
