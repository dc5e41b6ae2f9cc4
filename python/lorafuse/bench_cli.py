"""`lorafuse bench`: one LoRA layer, lorafuse vs torch ``F.linear`` vs torch + PEFT.

For each shape (n tokens × k in_features × m out_features, rank r) the same frozen
``nn.Linear`` (with bias) is timed three ways:

- ``F.linear``  -- torch's base matmul alone, no adapter: the floor any LoRA layer pays;
- ``PEFT``      -- ``peft.tuners.lora.Linear`` wrapping that ``nn.Linear`` (the thing we replace);
- ``lorafuse``  -- ``lorafuse.FusedLinear`` (PEFT's layer, fused) wrapping the same ``nn.Linear``, with PEFT's adapter
  weights copied in (``B`` is random, not zero, so the adapter does real work).

Two passes: ``fwd`` (inference, ``torch.no_grad``) and ``fwd+bwd`` (training: ``x`` needs
its gradient, the base weight is frozen, the adapter gets ``dA``/``dB``). The three run
interleaved (round-robin within each repeat, the order rotating) with the same thread count
for torch and lorafuse; each cell is the median over repeats of the mean time per call.
A table with the ratios goes to stdout; ``bench.png`` (bar chart) and ``bench.json`` to ``--out``.

Timings are wall-clock on a machine that may be shared: compare ratios from one run, and see
``benchmarks/RESULTS.md`` for the recorded numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

QUICK_SHAPES = [(256, 576, 576, 16), (512, 1024, 1024, 16)]
FULL_SHAPES = [(256, 576, 576, 16), (2048, 576, 576, 16), (512, 1024, 1024, 16), (1024, 2048, 2048, 16),
               (512, 4096, 4096, 8), (1024, 1024, 4096, 64)]
IMPLS = ("F.linear", "PEFT", "lorafuse")
PASSES = ("fwd", "fwd+bwd")


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    """``"n,k,m,r;n,k,m,r"`` -> list of 4-tuples of positive ints."""
    shapes = []
    for part in text.split(";"):
        if not part.strip():
            continue
        dims = tuple(int(v) for v in part.split(","))
        if len(dims) != 4 or min(dims) < 1:
            raise argparse.ArgumentTypeError(f"shape {part!r}: expected n,k,m,r with positive integers")
        shapes.append(dims)
    if not shapes:
        raise argparse.ArgumentTypeError("no shapes given")
    return shapes


def _make_layers(n: int, k: int, m: int, r: int, seed: int):
    """The base ``nn.Linear``, PEFT's and lorafuse's LoRA layers around it, and the inputs."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.lora import Linear as PeftLinear
    from torch import nn

    from .peft_fused import FusedLinear

    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(k, m)
    with torch.no_grad():
        base.weight.copy_(torch.randn(m, k, generator=gen) / k ** 0.5)
        base.bias.copy_(torch.randn(m, generator=gen))
    base.requires_grad_(False)
    alpha = 2 * r
    config = PeftLoraConfig(r=r, lora_alpha=alpha)
    peft_layer = PeftLinear(base, "default", config=config, r=r, lora_alpha=alpha)
    fused = FusedLinear(base, "default", config=config, r=r, lora_alpha=alpha)  # the same base module, shared
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(torch.randn(r, k, generator=gen) / k ** 0.5)
        peft_layer.lora_B["default"].weight.copy_(torch.randn(m, r, generator=gen) / r ** 0.5)
        fused.lora_A["default"].weight.copy_(peft_layer.lora_A["default"].weight)
        fused.lora_B["default"].weight.copy_(peft_layer.lora_B["default"].weight)
    x = torch.randn(n, k, generator=gen)
    g = torch.randn(n, m, generator=gen)
    return base, peft_layer, fused, x, g


def _calls(base, peft_layer, fused, x, g) -> dict[tuple[str, str], Callable[[], Any]]:
    import torch
    import torch.nn.functional as F

    modules = {"F.linear": lambda t: F.linear(t, base.weight, base.bias), "PEFT": peft_layer, "lorafuse": fused}
    xg = x.detach().clone().requires_grad_(True)
    params = [p for mod in (peft_layer, fused) for p in mod.parameters() if p.requires_grad]

    def fwd(fn):
        def call():
            with torch.no_grad():
                return fn(x)
        return call

    def fwd_bwd(fn):
        def call():
            xg.grad = None
            for p in params:
                p.grad = None
            fn(xg).backward(g)
        return call

    out = {}
    for name, fn in modules.items():
        out[(name, "fwd")] = fwd(fn)
        out[(name, "fwd+bwd")] = fwd_bwd(fn)
    return out


def _check_parity(peft_layer, fused, x) -> float:
    import torch

    with torch.no_grad():
        return (peft_layer(x) - fused(x)).abs().max().item()


def plan_label(fn: Callable[[], Any]) -> str:
    """The kernel paths one call of fn takes: 'u/y' of its last lora_forward, then 'vb/dA/dx' of its
    last lora_backward if it ran one (kernels/cpu/lora.c; e.g. 'skinny/augmented +
    skinny/skinny/augmented'); 'torch' if it ran no fused CPU kernel (PEFT's or torch's own path)."""
    from . import _C

    _C.clear_last_plans()
    fn()
    plans = [p for p in (_C.last_forward_plan(), _C.last_backward_plan()) if p is not None]
    return " + ".join("/".join(p) for p in plans) or "torch"


def _time(call: Callable[[], Any], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        call()
    return (time.perf_counter() - start) / inner


def bench_shape(shape, repeats: int, target_s: float, seed: int) -> dict[str, Any]:
    """Median seconds per call for every (impl, pass) on one shape, measured interleaved."""
    n, k, m, r = shape
    base, peft_layer, fused, x, g = _make_layers(n, k, m, r, seed)
    calls = _calls(base, peft_layer, fused, x, g)
    inner = {}
    for key, call in calls.items():  # warm-up, and how many calls make one ~target_s measurement
        call()
        inner[key] = max(1, min(1000, int(target_s / max(_time(call, 1), 1e-7))))
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    keys = list(calls)
    for rep in range(repeats):
        rotated = keys[rep % len(keys):] + keys[:rep % len(keys)]
        for key in rotated:
            samples[key].append(_time(calls[key], inner[key]))
    return {"shape": list(shape), "max_abs_diff_vs_peft": _check_parity(peft_layer, fused, x),
            "median_s": {f"{impl}|{p}": statistics.median(samples[(impl, p)]) for impl, p in keys},
            "lorafuse_plan": {p: plan_label(calls[("lorafuse", p)]) for p in PASSES}}


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["n×k×m, r", "pass", "F.linear ms", "PEFT ms", "lorafuse ms", "lorafuse/PEFT", "lorafuse/F.linear",
              "lorafuse plan"]
    lines = []
    for row in rows:
        n, k, m, r = row["shape"]
        for p in PASSES:
            t = {impl: row["median_s"][f"{impl}|{p}"] for impl in IMPLS}
            lines.append([f"{n}×{k}×{m}, r={r}", p, f"{1e3 * t['F.linear']:.3f}", f"{1e3 * t['PEFT']:.3f}",
                          f"{1e3 * t['lorafuse']:.3f}", f"{t['lorafuse'] / t['PEFT']:.2f}x",
                          f"{t['lorafuse'] / t['F.linear']:.2f}x", row["lorafuse_plan"][p]])
    widths = [max(len(c[i]) for c in [header] + lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) if i < 2 or i == 7 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
           for row in [header] + lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PASSES), figsize=(5 + 1.6 * len(rows), 4.2), squeeze=False)
    colors = {"F.linear": "tab:gray", "PEFT": "tab:orange", "lorafuse": "tab:blue"}
    labels = ["{}×{}×{}\nr={}".format(*row["shape"]) for row in rows]
    width = 0.8 / len(IMPLS)
    for ax, p in zip(axes[0], PASSES):
        for j, impl in enumerate(IMPLS):
            # time relative to F.linear of the same shape and pass: 1.0 is the bare base matmul
            values = [row["median_s"][f"{impl}|{p}"] / row["median_s"][f"F.linear|{p}"] for row in rows]
            ax.bar([i + (j - 1) * width for i in range(len(rows))], values, width, label=impl, color=colors[impl])
        ax.axhline(1.0, color="black", lw=0.6)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(p)
        ax.set_ylabel("time / torch F.linear (lower is better)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser):
    """Arguments of ``lorafuse bench``; returns the handler (the `lorafuse.cli` registry protocol)."""
    parser.add_argument("--quick", action="store_true", help="two small shapes, fewer repeats (under a minute)")
    parser.add_argument("--shapes", type=parse_shapes, default=None, metavar="n,k,m,r;...",
                        help="shapes to run instead of the defaults")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per cell (default 7, quick 5)")
    parser.add_argument("--threads", type=int, default=None, help="threads for torch and lorafuse (default: torch's)")
    parser.add_argument("--out", metavar="DIR", default="./lorafuse-bench", help="where bench.png and bench.json go")
    parser.add_argument("--seed", type=int, default=0)
    return run_bench


def run_bench(args: argparse.Namespace) -> int:
    """Handler of ``lorafuse bench``."""
    import torch

    import lorafuse

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    lorafuse.set_num_threads(threads)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    repeats = args.repeats or (5 if args.quick else 7)
    target_s = 0.02 if args.quick else 0.1
    from ._C import cpu_isa

    machine = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs".replace("  ", " ")
    title = (f"lorafuse {lorafuse.__version__} ({cpu_isa()}), torch {torch.__version__}, {threads} threads, "
             f"{machine}; median of {repeats}")
    print(f"lorafuse bench: {title}")
    print("float32, base nn.Linear with bias, frozen; fwd = no_grad forward; fwd+bwd = forward + backward "
          "to x, A, B\n")
    from .demo import busy_warning

    busy = busy_warning()
    if busy:
        print(busy + "\n")
    rows = []
    for shape in shapes:
        started = time.perf_counter()
        rows.append(bench_shape(shape, repeats, target_s, args.seed))
        print("  {}×{}×{} r={}: {:.1f} s".format(*shape, time.perf_counter() - started), file=sys.stderr)
    print(format_table(rows))
    worst = max(row["max_abs_diff_vs_peft"] for row in rows)
    print(f"\nlorafuse vs PEFT outputs, max |diff| over all shapes: {worst:.2e}")
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "bench.png")
    plot(rows, png, title)
    with open(os.path.join(args.out, "bench.json"), "w") as handle:
        json.dump({"title": title, "threads": threads, "repeats": repeats, "rows": rows}, handle, indent=1)
    print(f"chart: {png}")
    return 0
