"""`lorafuse bench`: one LoRA layer, lorafuse vs torch's base ``nn.Linear`` vs torch + PEFT — and the
timing harness it and every CPU script in ``benchmarks/`` (through ``benchmarks/timing.py``) share.

For each shape (n tokens × k in_features × m out_features, rank r) the same frozen ``nn.Linear``
(with bias) is timed as modules, each called the way a model calls it:

- ``nn.Linear``  -- the base layer alone, no adapter: the floor any LoRA layer pays;
- ``PEFT``       -- ``peft.tuners.lora.Linear`` wrapping that ``nn.Linear`` (the thing we replace);
- ``lorafuse``   -- ``lorafuse.FusedLinear`` (PEFT's layer, fused) wrapping the same ``nn.Linear``;
- ``lorafuse, cache off`` -- the same layer with lorafuse's output cache off
  (``lorafuse.set_output_cache_limit(0)``: every large output a fresh allocation, as torch's are).

Both LoRA layers come from their library's ``get_peft_model`` with the same adapter weights (``B``
random, not zero, so the adapter does real work). Three passes (`PASSES`): ``forward (no_grad)``
(eval mode under ``torch.no_grad``: lorafuse may fold s·B·A into W's packed panels), ``forward (grad)``
(training mode, the adapter requiring grad: lorafuse keeps u for the backward) and ``fwd+bwd`` (forward
and backward to x, A, B). Every (implementation, pass) runs interleaved with the others, the order
rotating from round to round, with the same thread count for torch and lorafuse; each cell is the
median over rounds of the mean time per call. A table with the ratios goes to stdout, with the path
each lorafuse row took (``lorafuse_path`` of the layer, and the C kernels' plan where they ran);
``bench.png`` (bar chart) and ``bench.json`` to ``--out``.

Timings are wall-clock on a machine that may be shared: compare ratios from one run, and see
``benchmarks/RESULTS.md`` for the recorded numbers.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, Sequence, TypeVar, Union

from ._runtime import set_num_threads as _set_lorafuse_threads
from ._runtime import set_output_cache_limit

QUICK_SHAPES = [(256, 576, 576, 16), (512, 1024, 1024, 16)]
FULL_SHAPES = [(256, 576, 576, 16), (2048, 576, 576, 16), (512, 1024, 1024, 16), (1024, 2048, 2048, 16),
               (512, 4096, 4096, 8), (1024, 1024, 4096, 64)]
IMPLS = ("nn.Linear", "PEFT", "lorafuse", "lorafuse, cache off")
PASSES = ("forward (no_grad)", "forward (grad)", "fwd+bwd")
T = TypeVar("T")


# ------------------------------------------------------------------------------------------- the harness

@dataclasses.dataclass(frozen=True)
class Candidate:
    """One timed side: ``fn()``, called with no arguments inside ``contexts`` (factories of context
    managers — grad and train/eval mode, the output cache off — entered around each timed batch of
    calls, outside the clock). Calling a Candidate runs ``fn`` once inside its contexts."""

    fn: Callable[[], Any]
    contexts: tuple[Callable[[], ContextManager[Any]], ...] = ()

    def __call__(self) -> Any:
        with self.entered():
            return self.fn()

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Inside every context of this candidate."""
        with contextlib.ExitStack() as stack:
            for make in self.contexts:
                stack.enter_context(make())
            yield

    def cache_off(self) -> Candidate:
        """The same call with lorafuse's output cache off (`output_cache_off`)."""
        return dataclasses.replace(self, contexts=self.contexts + (output_cache_off,))


@contextlib.contextmanager
def output_cache_off() -> Iterator[None]:
    """lorafuse's output cache (`lorafuse.set_output_cache_limit`) at 0 inside, its limit restored after:
    every large kernel output is then a fresh allocation (the kept blocks are freed on entry)."""
    old = set_output_cache_limit(0)
    try:
        yield
    finally:
        set_output_cache_limit(old)


def rotated(items: Sequence[T], i: int) -> list[T]:
    """``items`` starting at position i (mod len): round i's order, so that no candidate always runs
    right after the same one (caches it leaves warm or cold, frequency it leaves high)."""
    start = i % len(items)
    return list(items[start:]) + list(items[:start])


def _seconds_per_call(cand: Candidate, calls: int, prime: bool) -> float:
    """Mean seconds per call over ``calls`` calls of ``cand.fn`` inside its contexts (entered outside
    the clock); with ``prime``, one untimed call first."""
    with cand.entered():
        if prime:
            cand.fn()
        t0 = time.perf_counter()
        for _ in range(calls):
            cand.fn()
        return (time.perf_counter() - t0) / calls


def interleaved(cands: Mapping[str, Union[Candidate, Callable[[], Any]]], rounds: int = 9, min_time: float = 0.02,
                warmup: int = 2, prime: bool = False) -> dict[str, float]:
    """Median seconds per call of each candidate (a `Candidate` or a plain callable), timed round-robin
    over ``rounds`` rounds in `rotated` order; each round calls a candidate enough times to last
    ~min_time. ``prime``: one untimed call before each timed batch — for groups where one candidate
    changes process state another reads (the output cache off frees the blocks the others reuse)."""
    wrapped = {name: c if isinstance(c, Candidate) else Candidate(c) for name, c in cands.items()}
    calls: dict[str, int] = {}
    for name, cand in wrapped.items():
        if warmup:
            _seconds_per_call(cand, warmup, False)
        calls[name] = max(1, int(min_time / max(_seconds_per_call(cand, 1, False), 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in wrapped}
    for i in range(rounds):
        for name in rotated(list(wrapped), i):
            samples[name].append(_seconds_per_call(wrapped[name], calls[name], prime))
    return {name: statistics.median(s) for name, s in samples.items()}


def set_threads(n: int) -> None:
    """Same thread count for torch (if imported) and lorafuse."""
    _set_lorafuse_threads(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


def plan_label(fn: Callable[[], Any]) -> str:
    """The kernel paths one call of fn takes: 'u/y' of its last lora_forward, then 'vb/dA/dx' of its
    last lora_backward if it ran one (kernels/cpu/lora.c; e.g. 'skinny/augmented +
    skinny/skinny/augmented'); 'torch' if it ran no fused CPU kernel (PEFT's or torch's own path)."""
    from . import _C

    _C.clear_last_plans()
    fn()
    plans = [p for p in (_C.last_forward_plan(), _C.last_backward_plan()) if p is not None]
    return " + ".join("/".join(p) for p in plans) or "torch"


def path_label(fn: Callable[[], Any], modules: Iterable[Any]) -> str:
    """The path one call of fn took through lorafuse's layers among ``modules``: their
    ``lorafuse_path`` ('c', 'cuda' or 'peft' — PEFT's own forward; counted where layers differ, e.g.
    'c×24 peft×4'), followed by `plan_label` of the call where the C kernels ran: 'c none/merged',
    'peft'. A lorafuse row that fell back to PEFT's forward says so."""
    from .peft_fused import FUSED_CLASSES

    fused = tuple(FUSED_CLASSES.values())
    plans = plan_label(fn)
    counts = collections.Counter(m.lorafuse_path or "none" for m in modules if isinstance(m, fused))
    paths = next(iter(counts)) if len(counts) == 1 else " ".join(f"{p}×{n}" for p, n in sorted(counts.items()))
    return f"{paths} {plans}" if "c" in counts and plans != "torch" else paths


# ------------------------------------------------------------------------------- layers and passes

@contextlib.contextmanager
def mode(modules: Sequence[Any], training: bool) -> Iterator[None]:
    """Modules in train (``training``) or eval mode and grad on or off to match (eval: ``torch.no_grad``,
    dropout off); their training flags restored after."""
    import torch

    before = [m.training for m in modules]
    for m in modules:
        m.train(training)
    try:
        with torch.set_grad_enabled(training):
            yield
    finally:
        for m, flag in zip(modules, before):
            m.train(flag)


def pass_candidates(module: Any, x: Any, g: Any) -> dict[str, Candidate]:
    """The `PASSES` of ``module`` on x (n, k) with upstream gradient g (n, m): ``forward (no_grad)`` in
    eval mode under no_grad; ``forward (grad)`` in training mode, grad on (x itself does not require
    grad); ``fwd+bwd``: that forward and the backward to x and every trainable parameter, their
    gradients reset to None before each call (nothing accumulates)."""
    xg = x.detach().clone().requires_grad_(True)
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        xg.grad = None
        for p in params:
            p.grad = None
        module(xg).backward(g)

    def infer() -> Any:
        return module(x)

    def in_mode(training: bool) -> Callable[[], ContextManager[Any]]:
        return lambda: mode([module], training)

    return {PASSES[0]: Candidate(infer, (in_mode(False),)), PASSES[1]: Candidate(infer, (in_mode(True),)),
            PASSES[2]: Candidate(step, (in_mode(True),))}


def pass_grid(modules: Mapping[str, Any], x: Any, g: Any,
              cache_off: Sequence[str] = ()) -> dict[tuple[str, str], Candidate]:
    """(side, pass) → `Candidate` for the `PASSES` of every module (`pass_candidates`), keyed by the
    modules' side names; each side named in ``cache_off`` also as '<side>, cache off' (its output cache off)."""
    grid = {}
    for side, module in modules.items():
        for p, cand in pass_candidates(module, x, g).items():
            grid[(side, p)] = cand
            if side in cache_off:
                grid[(f"{side}, cache off", p)] = cand.cache_off()
    return grid


def make_base(k: int, m: int, dtype: Any = None, seed: int = 0) -> Any:
    """The frozen base ``nn.Linear`` (k → m, with bias) in ``dtype`` (default float32), weights drawn from seed."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(k, m)
    with torch.no_grad():
        base.weight.copy_(torch.randn(m, k, generator=gen) / k ** 0.5)
        base.bias.copy_(torch.randn(m, generator=gen))
    return base.requires_grad_(False).to(dtype or torch.float32)


def make_inputs(n: int, k: int, m: int, dtype: Any = None, seed: int = 0) -> tuple[Any, Any]:
    """x (n, k) and the upstream gradient g (n, m) in ``dtype`` (default float32), drawn from seed + 1."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    x, g = torch.randn(n, k, generator=gen), torch.randn(n, m, generator=gen)
    return x.to(dtype or torch.float32), g.to(dtype or torch.float32)


def lora_layer(base: Any, r: int, library: str = "lorafuse", *, dropout: float = 0.0, use_dora: bool = False,
               seed: int = 0) -> Any:
    """A LoRA layer around ``base`` (k → m) from ``library``'s ``get_peft_model`` ('peft' or 'lorafuse'),
    on a one-layer model holding it — so PEFT's defaults apply alike (a bf16 base keeps fp32 adapters,
    ``autocast_adapter_dtype=True``). alpha = 2r. A (r, k) and B (m, r) are drawn from seed (B not zero),
    so layers made with one seed compute the same function; a DoRA magnitude is PEFT's ‖W_j‖ (B is zero
    when PEFT sets it). Layers made from one base share it. A bitsandbytes Linear4bit / Linear8bitLt base: the
    holder says it is loaded in 4 / 8 bits, as PEFT's dispatch asks (its LoRA layer is then
    ``lora.bnb.Linear4bit`` / ``Linear8bitLt``)."""
    import peft
    import torch
    from torch import nn

    from .peft_api import get_peft_model

    class Holder(nn.Module):
        from_bnb = "bitsandbytes" in type(base).__module__
        is_loaded_in_4bit = from_bnb and type(base).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4")
        is_loaded_in_8bit = from_bnb and type(base).__name__ == "Linear8bitLt"

        def __init__(self) -> None:
            super().__init__()
            self.proj = base

    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, use_dora=use_dora, target_modules=["proj"])
    make = {"peft": peft.get_peft_model, "lorafuse": get_peft_model}[library]
    layer = make(Holder(), config).base_model.model.proj
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, scale in (("lora_A", base.in_features ** -0.5), ("lora_B", r ** -0.5)):
            weight = getattr(layer, name)["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=gen) * scale)
    return layer


def max_abs_diff(a: Any, b: Any, x: Any) -> float:
    """max |a(x) − b(x)| in eval mode under no_grad, in float32."""
    with mode([a, b], False):
        return (a(x).float() - b(x).float()).abs().max().item()


# ----------------------------------------------------------------------------------- lorafuse bench

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


def bench_shape(shape: Sequence[int], repeats: int, target_s: float, seed: int) -> dict[str, Any]:
    """Median seconds per call for every (impl, pass) on one shape, measured interleaved."""
    n, k, m, r = shape
    base = make_base(k, m, seed=seed)
    peft_layer, fused = (lora_layer(base, r, library, seed=seed) for library in ("peft", "lorafuse"))
    x, g = make_inputs(n, k, m, seed=seed)
    calls = pass_grid({"nn.Linear": base, "PEFT": peft_layer, "lorafuse": fused}, x, g, cache_off=["lorafuse"])
    medians = interleaved(calls, rounds=repeats, min_time=target_s, warmup=1, prime=True)
    return {"shape": list(shape), "max_abs_diff_vs_peft": max_abs_diff(peft_layer, fused, x),
            "median_s": {f"{impl}|{p}": t for (impl, p), t in medians.items()},
            "lorafuse_path": {p: path_label(calls[("lorafuse", p)], [fused]) for p in PASSES}}


def format_table(rows: list[dict[str, Any]]) -> str:
    """The text table of `bench_shape` rows: one line per (shape, pass)."""
    header = ["n×k×m, r", "pass", "nn.Linear ms", "PEFT ms", "lorafuse ms", "cache off ms", "lorafuse/PEFT",
              "cache off/PEFT", "lorafuse/nn.Linear", "lorafuse path"]
    lines = []
    for row in rows:
        n, k, m, r = row["shape"]
        for p in PASSES:
            t = {impl: row["median_s"][f"{impl}|{p}"] for impl in IMPLS}
            lines.append([f"{n}×{k}×{m}, r={r}", p, *(f"{1e3 * t[impl]:.3f}" for impl in IMPLS),
                          f"{t['lorafuse'] / t['PEFT']:.2f}x", f"{t['lorafuse, cache off'] / t['PEFT']:.2f}x",
                          f"{t['lorafuse'] / t['nn.Linear']:.2f}x", row["lorafuse_path"][p]])
    widths = [max(len(c[i]) for c in [header] + lines) for i in range(len(header))]
    left = (0, 1, len(header) - 1)
    out = ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
           for row in [header] + lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Bar chart: each implementation's time / nn.Linear's, one panel per pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PASSES), figsize=(5 + 2.4 * len(rows), 4.2), squeeze=False)
    colors = {"nn.Linear": "tab:gray", "PEFT": "tab:orange", "lorafuse": "tab:blue", "lorafuse, cache off": "tab:cyan"}
    labels = ["{}×{}×{}\nr={}".format(*row["shape"]) for row in rows]
    width = 0.8 / len(IMPLS)
    for ax, p in zip(axes[0], PASSES):
        for j, impl in enumerate(IMPLS):
            # time relative to nn.Linear of the same shape and pass: 1.0 is the bare base layer
            values = [row["median_s"][f"{impl}|{p}"] / row["median_s"][f"nn.Linear|{p}"] for row in rows]
            offset = (j - (len(IMPLS) - 1) / 2) * width
            ax.bar([i + offset for i in range(len(rows))], values, width, label=impl, color=colors[impl])
        ax.axhline(1.0, color="black", lw=0.6)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(p)
        ax.set_ylabel("time / torch nn.Linear (lower is better)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
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
    set_threads(threads)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    repeats = args.repeats or (5 if args.quick else 7)
    target_s = 0.02 if args.quick else 0.1
    from ._C import cpu_isa

    machine = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs".replace("  ", " ")
    title = (f"lorafuse {lorafuse.__version__} ({cpu_isa()}), torch {torch.__version__}, {threads} threads, "
             f"{machine}; median of {repeats}")
    print(f"lorafuse bench: {title}")
    print("float32, base nn.Linear with bias, frozen, every side called as a module; forward (no_grad) = eval "
          "mode under no_grad; forward (grad) = training mode, adapter requiring grad; fwd+bwd = forward + "
          "backward to x, A, B; cache off = lorafuse with its output cache off\n")
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
