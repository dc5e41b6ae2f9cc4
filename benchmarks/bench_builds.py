"""Builds of lorafuse's C extension side by side in one process — for choosing a blocking or threshold
(kernels/cpu/tunables.c) or judging any kernel change. The builds run interleaved in rotated order, so the drift of
a shared VM (its figures move ±10–25 % between runs minutes apart) falls on every build alike, which alternating
processes cannot promise; each build keeps its own thread pool, output cache and packed-W caches.

    cp python/lorafuse/_C*.so /tmp/base.so                      # the build in place
    # edit the sources (e.g. kernels/cpu/tunables.c), then
    python setup.py build_ext --inplace && cp python/lorafuse/_C*.so /tmp/variant.so
    python benchmarks/bench_builds.py /tmp/base.so /tmp/variant.so [--shapes 2048x2048x2048,512x1024x1024]
                                      [--threads 2] [--rounds 9] [--quick]

Rows per shape n×k×m (fp32, r 16): `sgemm` x·Wᵀ (W packed on every call) and the fwd+bwd of lorafuse's LoRA and
DoRA layers (`get_peft_model` with `use_dora` off and on, one pair per build on the same nn.Linear, each keeping
its own packed W): milliseconds per build and each build's time over the first's. Every build must export the
entry points this checkout's Python calls (a build of an older checkout may lack some). Each .so is copied to a
temporary file first, so two builds never share a loaded library (or its state) and the files may be rebuilt while
this runs.
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
import shutil
import tempfile
from types import ModuleType
from typing import Iterator

import torch
from timing import Candidate, arguments, begin, interleaved, lora_layer, make_base, make_inputs

import lorafuse._C
import lorafuse.ops
import lorafuse.weight_cache

SHAPES = "512x1024x1024,2048x2048x2048"
QUICK = "64x96x80"
USERS = (lorafuse.ops, lorafuse.weight_cache)  # the modules whose `_C` the fp32 layers' calls go through


def load_build(path: str, folder: str, index: int) -> ModuleType:
    """The extension at ``path``, loaded as a module of its own from a private copy (its init function is
    PyInit__C: it loads under the name lorafuse._C, without replacing the imported one in sys.modules)."""
    if not os.path.isfile(path):
        raise SystemExit(f"bench_builds: no such build: {path}")
    copy = os.path.join(folder, f"build{index}_{os.path.basename(path)}")
    shutil.copyfile(path, copy)
    loader = importlib.machinery.ExtensionFileLoader("lorafuse._C", copy)
    spec = importlib.util.spec_from_file_location("lorafuse._C", copy, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    missing = sorted(n for n in dir(lorafuse._C) if not n.startswith("_") and not hasattr(module, n))
    if missing:
        raise SystemExit(f"bench_builds: {path} lacks {', '.join(missing)}, which this checkout's Python calls: "
                         "build it from a checkout with them")
    return module


@contextlib.contextmanager
def using(build: ModuleType) -> Iterator[None]:
    """Inside: lorafuse's fp32 calls go to ``build``; the modules' own `_C` back after."""
    saved = [m._C for m in USERS]
    for m in USERS:
        m._C = build
    try:
        yield
    finally:
        for m, c in zip(USERS, saved):
            m._C = c


def plan_text(build: ModuleType) -> str:
    """'forward/plan + backward/plan' as the build last ran them, e.g. 'skinny/augmented + skinny/skinny/augmented'."""
    fwd, bwd = build.last_forward_plan(), build.last_backward_plan()
    return f"{None if fwd is None else '/'.join(fwd)} + {None if bwd is None else '/'.join(bwd)}"


def fwd_bwd(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor):
    """One training step's layer work: y = layer(x), then y's backward with g (x requires grad)."""
    def step() -> None:
        layer(x).backward(g)
    return step


def main() -> None:
    ap = arguments(__doc__, quick=f"one small shape, {QUICK}")
    ap.add_argument("builds", nargs="+", help="paths of built lorafuse._C extensions (.so), the first the baseline")
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated n×k×m, e.g. 2048x2048x2048")
    args = ap.parse_args()
    rounds = begin(args, "bench_builds: builds of lorafuse._C side by side, interleaved (fp32)")
    shapes = [tuple(int(d) for d in s.split("x")) for s in (QUICK if args.quick else args.shapes).split(",")]
    with tempfile.TemporaryDirectory() as folder:
        builds = [load_build(p, folder, i) for i, p in enumerate(args.builds)]
        for b in builds:
            b.set_num_threads(args.threads)
        names = [f"#{i} {os.path.basename(p)}" for i, p in enumerate(args.builds)]
        for n, k, m in shapes:
            base = make_base(k, m, torch.float32)
            x, g = make_inputs(n, k, m, torch.float32)
            x.requires_grad_(True)
            wt = base.weight.detach().t()
            cands = {}
            for name, build in zip(names, builds):
                ctx = (lambda b=build: using(b),)
                cands[(name, "sgemm")] = Candidate(lambda b=build: b.sgemm(x.detach(), wt, 1.0, None, None), ctx)
                for kind, dora in (("LoRA f+b", False), ("DoRA f+b", True)):
                    layer = lora_layer(base, 16, "lorafuse", use_dora=dora)
                    cands[(name, kind)] = Candidate(fwd_bwd(layer, x, g), ctx)
            t = interleaved({f"{nm}|{row}": c for (nm, row), c in cands.items()}, rounds=rounds)
            print(f"\n## {n}×{k}×{m} r16 (ms; ratio to {names[0]})")
            for row in ("sgemm", "LoRA f+b", "DoRA f+b"):
                first = t[f"{names[0]}|{row}"]
                print(f"   {row:9s} " + "   ".join(f"{nm}: {t[f'{nm}|{row}'] * 1e3:9.3f} "
                                                   f"({t[f'{nm}|{row}'] / first:5.3f})" for nm in names))
            # each build's own last plans: the layers' calls went to it (a build that ran none prints None)
            print("   plans    " + "   ".join(f"{nm}: {plan_text(b)}" for nm, b in zip(names, builds)))
    print("\nbuilds measured")


if __name__ == "__main__":
    main()
