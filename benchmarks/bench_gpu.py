"""GPU layer benchmark: lorafuse's LoRA layer against stock PEFT's and against the plain Linear, module
against module, same weights.

Command (full size, as benchmarks/gpu_check.sh runs it; about 15-30 s on an H200):

    python benchmarks/bench_gpu.py --tokens 8192 --rank 16 \\
        --shapes 4096x4096,4096x1024,4096x14336,14336x4096 --json benchmarks/gpu_bench.json

CPU smoke test (tiny shapes, wall-clock timing; checks the script end to end, measures nothing useful):

    python benchmarks/bench_gpu.py --device cpu [--dtype fp32]

Workload: Llama-8B projections (tokens 8192; in→out 4096→4096, 4096→1024, 4096→14336, 14336→4096),
r = 16, lora_alpha = 2r, lora_dropout = 0, bf16 base layer, PEFT's default adapter dtype (fp32:
``autocast_adapter_dtype=True``, the default of ``peft.get_peft_model`` and ``lorafuse.get_peft_model``;
``--adapter-dtype bf16`` gives both adapters the base dtype instead; ``--dora``: DoRA adapters, ``use_dora=True``,
on both LoRA layers — lorafuse fuses DoRA on CUDA for adapters of the base dtype, so ``--dora --adapter-dtype bf16``
is the row that measures it). The three candidates are modules,
called the same way (``module(x)``, outputs allocated by the module):

    base   the plain ``nn.Linear(k, m, bias=False)`` in the base dtype (its forward is F.linear)
    peft   ``peft.get_peft_model`` LoRA layer around an identical copy of that Linear; A, B random (B ≠ 0)
    ours   ``lorafuse.get_peft_model`` layer around another identical copy, A and B copied from PEFT's

Rows (one candidate × one row is one timed callable):

    fwd (no_grad)  ``module(x)`` under torch.no_grad()
    fwd+bwd        ``module(x).backward(g)``, x requiring grad (dx computed, as for every layer but the
                   first), base weight frozen, adapters trainable; a fixed g; grads set to None first

Timing: every callable is warmed up, then timed in interleaved rounds, in ROTATING order (round i starts
at callable i mod N), each sample = ``--iters`` back-to-back calls between two CUDA events (CPU: between
two perf_counter reads) / iters; the reported time is the median of the ``--rounds`` samples.

Columns printed per shape:
    base/peft/ours fwd, base/peft/ours f+b   median ms per call of fwd (no_grad) and of fwd+bwd
    ours/base fwd    ours fwd (no_grad) ÷ base fwd (no_grad)   (issue target, geomean over shapes: <= 1.10)
    ours/peft fwd    ours fwd ÷ peft fwd
    ours/peft f+b    ours fwd+bwd ÷ peft fwd+bwd               (issue target, geomean over shapes: <= 0.80)
    rel y            ||y_ours - y_peft|| / ||y_peft||, forward output (correctness guard; also dx, dA,
                     dB in the JSON and on a WARNING line when one exceeds --tol)
    mem peft/ours    peak extra memory of one fwd+bwd (torch.cuda.max_memory_allocated - allocated before), MiB
    backend          ours layer's ``.backend``: the kernel path measured ('cuda' expected on a GPU; anything
                     else is measured too but flagged with a loud WARNING and in the JSON)

``--json PATH`` writes everything (command, date, device, backend seen, medians, every raw per-round sample,
ratios, geomeans), atomically. Exit status: 0 on success (no timing is asserted), 1 when a shape failed
with an exception (the others are still measured and written), 2 when no CUDA GPU is visible (unless
``--device cpu``), 3 with ``--strict`` when ours is not on the CUDA path or fails the correctness guard.

The timing helpers here (interleave_rotating, peak_extra_mib, header, write_json_atomic, ...) are shared
with benchmarks/bench_gpu_train.py.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FULL_SIZE = {"tokens": 8192, "shapes": "4096x4096,4096x1024,4096x14336,14336x4096"}
SMOKE_SIZE = {"tokens": 64, "shapes": "64x64,64x32,64x160,160x64"}
TARGET_FWD_VS_BASE = 1.10
TARGET_FB_VS_PEFT = 0.80
EXIT_NO_GPU = 2
EXIT_STRICT = 3

Samples = dict[str, list[list[float]]]  # candidate -> rounds -> seconds (one per call, or one per round)


# ------------------------------------------------------------------------------------------ shared helpers
def resolve_device(name: str, script: str) -> Optional[torch.device]:
    """torch.device for --device; None, said on stderr, when CUDA was asked for and torch sees no GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        print(f"{script}: no CUDA GPU visible to torch (use --device cpu for a smoke test)", file=sys.stderr)
        return None
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], iters: int, device: torch.device, per_call: bool = False) -> list[float]:
    """Seconds per call of ``iters`` back-to-back calls: one mean (``per_call`` False) or one value per
    call. CUDA: events on the current stream, one host sync at the end; CPU: perf_counter."""
    if device.type == "cuda":
        if per_call:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(iters)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            events[-1][1].synchronize()
            return [start.elapsed_time(end) * 1e-3 for start, end in events]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return [start.elapsed_time(end) * 1e-3 / iters]
    if per_call:
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return [(time.perf_counter() - t0) / iters]


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """The candidates in round ``round_index``'s order: starting at candidate round_index mod N."""
    i = round_index % len(names)
    return list(names[i:]) + list(names[:i])


def interleave_rotating(cands: dict[str, Callable[[], Any]], rounds: int, iters: int, device: torch.device,
                        warmup: int = 2, per_call: bool = False) -> Samples:
    """Warm every candidate up (``warmup`` calls each), then ``rounds`` rounds in rotating order, each
    candidate timed over ``iters`` calls per round (see `time_calls`). Returns candidate -> per-round
    lists of seconds per call."""
    for fn in cands.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: Samples = {name: [] for name in cands}
    names = list(cands)
    for r in range(rounds):
        for name in rotated(names, r):
            samples[name].append(time_calls(cands[name], iters, device, per_call))
    return samples


def median_s(rounds: list[list[float]]) -> float:
    """Median of all samples of one candidate (seconds)."""
    return statistics.median([s for one_round in rounds for s in one_round])


def geomean(values: Sequence[float]) -> float:
    """Geometric mean; NaN for no values."""
    if not values:
        return math.nan
    return math.exp(sum(math.log(v) for v in values) / len(values))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float32."""
    a, b = a.detach().float(), b.detach().float()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def peak_extra_mib(fn: Callable[[], Any], device: torch.device) -> Optional[dict[str, float]]:
    """Peak memory of one call of ``fn`` beyond what was allocated before it (MiB), and the absolute peak
    and the allocation before; None off CUDA."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"extra_mib": (peak - before) / 2**20, "peak_mib": peak / 2**20, "before_mib": before / 2**20}


def command_line(argv: Optional[Sequence[str]]) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(shlex.quote(a) for a in [sys.executable, sys.argv[0], *args])


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "log", "-1",
                              "--format=%h %s"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB"
    return f"CPU {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}"


def header(title: str, device: torch.device, argv: Optional[Sequence[str]]) -> dict[str, Any]:
    """Print the header lines (date, device, torch, lorafuse CUDA info, command); return them as a dict."""
    import lorafuse
    import lorafuse.cuda as lc

    info = lc.cuda_info()
    meta: dict[str, Any] = {
        "title": title,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "device": device_description(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "lorafuse": lorafuse.__version__,
        "lorafuse_cuda_info": dict(info),
        "lorafuse_cuda": str(info),
        "command": command_line(argv),
        "commit": _git_commit(),
    }
    try:
        import peft

        meta["peft"] = peft.__version__
    except ImportError:
        meta["peft"] = None
    print(f"# {title}")
    print(f"# {meta['date']} | {meta['device']} | torch {meta['torch']} (CUDA {meta['torch_cuda']}) | "
          f"peft {meta['peft']} | lorafuse {meta['lorafuse']}")
    print(f"# lorafuse CUDA: {meta['lorafuse_cuda']}")
    if meta["commit"]:
        print(f"# commit: {meta['commit']}")
    print(f"# command: {meta['command']}")
    if device.type != "cuda":
        print("# SMOKE MODE (--device cpu): wall-clock timing of tiny shapes; the numbers mean nothing")
    return meta


def write_json_atomic(path: str, obj: Any) -> None:
    """json.dump to a temporary file in the same directory, then os.replace onto ``path``."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def copy_lora_weights(src: nn.Module, dst: nn.Module) -> int:
    """Copy every ``lora_*`` parameter of ``src`` into the same-named one of ``dst`` (PEFT and lorafuse
    name them alike: ``...lora_A.default.weight``). Names, shapes and dtypes must match; returns the count."""
    src_params = {n: p for n, p in src.named_parameters() if "lora_" in n}
    dst_params = {n: p for n, p in dst.named_parameters() if "lora_" in n}
    if set(src_params) != set(dst_params):
        only_src, only_dst = sorted(set(src_params) - set(dst_params)), sorted(set(dst_params) - set(src_params))
        raise RuntimeError(f"LoRA parameter names differ: only in PEFT {only_src[:4]}, only in ours {only_dst[:4]}")
    with torch.no_grad():
        for name, p in dst_params.items():
            q = src_params[name]
            if p.shape != q.shape or p.dtype != q.dtype:
                raise RuntimeError(f"{name}: ours {tuple(p.shape)} {p.dtype} vs PEFT {tuple(q.shape)} {q.dtype}")
            p.copy_(q)
    return len(dst_params)


def loud_warning(lines: Sequence[str]) -> None:
    bar = "!" * 100
    print(bar)
    for line in lines:
        print(f"!!! WARNING: {line}")
    print(bar, flush=True)


# ----------------------------------------------------------------------------------------- the layers
class _Holder(nn.Module):
    """A one-Linear model for get_peft_model (target_modules=["proj"])."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"kxm,kxm,..." (in→out) → [(k, m), ...]."""
    out = []
    for item in text.split(","):
        k, m = item.lower().strip().split("x")
        out.append((int(k), int(m)))
    return out


def build_layers(k: int, m: int, r: int, alpha: float, dtype: torch.dtype, adapter_fp32: bool,
                 device: torch.device, seed: int, dora: bool = False) -> dict[str, nn.Module]:
    """base Linear, PEFT layer and lorafuse layer, all three on identical copies of one random W;
    PEFT's A and B random (B ≠ 0) — and with ``dora`` (``use_dora=True``) its magnitude —, copied into ours."""
    import peft

    import lorafuse

    torch.manual_seed(seed)
    base = nn.Linear(k, m, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(m, k, device=device) * k ** -0.5)
    base.weight.requires_grad_(False)
    peft_model = peft.get_peft_model(
        _Holder(copy.deepcopy(base)),
        peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"], init_lora_weights=False,
                        use_dora=dora),
        autocast_adapter_dtype=adapter_fp32)
    peft_layer = peft_model.base_model.model.proj
    a, b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
    with torch.no_grad():  # explicit random A, B: u = xAᵀ and s·Buᵀ both of the size of the base output
        a.copy_(torch.randn(r, k, device=device) * k ** -0.5)
        b.copy_(torch.randn(m, r, device=device) * (r ** -0.5 * r / alpha))
    ours_model = lorafuse.get_peft_model(
        _Holder(copy.deepcopy(base)),
        lorafuse.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"],
                            init_lora_weights=False, use_dora=dora),
        autocast_adapter_dtype=adapter_fp32)
    ours_layer = ours_model.base_model.model.proj
    copy_lora_weights(peft_layer, ours_layer)
    if not torch.equal(peft_layer.base_layer.weight, ours_layer.base_layer.weight):
        raise RuntimeError("base weights differ between PEFT and ours")
    return {"base": base, "peft": peft_layer, "ours": ours_layer}


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def bench_shape(n: int, k: int, m: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    dtype = DTYPES[args.dtype]
    layers = build_layers(k, m, args.rank, args.alpha if args.alpha is not None else 2.0 * args.rank, dtype,
                          args.adapter_dtype == "fp32", device, args.seed, args.dora)
    ours = layers["ours"]
    backend = ours.backend
    adapter_dtypes = {name: str(mod.lora_A["default"].weight.dtype).replace("torch.", "")
                      for name, mod in layers.items() if name != "base"}
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    x = torch.randn(n, k, generator=gen, device=device).to(dtype)
    g = torch.randn(n, m, generator=gen, device=device).to(dtype)
    xg = x.clone().requires_grad_(True)
    params = {name: _trainable(mod) for name, mod in layers.items()}
    all_params = [p for ps in params.values() for p in ps]

    def clear_grads() -> None:
        xg.grad = None
        for p in all_params:
            p.grad = None

    # correctness guard: ours ≈ PEFT, forward output and the three gradients
    with torch.no_grad():
        y_peft, y_ours = layers["peft"](x), layers["ours"](x)
    rel = {"y": rel_diff(y_ours, y_peft)}
    del y_peft, y_ours
    grads: dict[str, list[Optional[torch.Tensor]]] = {}
    for name in ("peft", "ours"):
        clear_grads()
        layers[name](xg).backward(g)
        lora_a, lora_b = layers[name].lora_A["default"].weight, layers[name].lora_B["default"].weight
        grads[name] = [None if t.grad is None else t.grad.clone() for t in (xg, lora_a, lora_b)]
    for label, got, ref in zip(("dx", "dA", "dB"), grads["ours"], grads["peft"]):
        rel[label] = math.inf if got is None or ref is None else rel_diff(got, ref)
    del grads
    clear_grads()

    def fwd(mod: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                mod(x)
        return run

    def fwd_bwd(mod: nn.Module, trainable: list[nn.Parameter]) -> Callable[[], None]:
        def run() -> None:
            xg.grad = None
            for p in trainable:
                p.grad = None
            mod(xg).backward(g)
        return run

    cands: dict[str, Callable[[], None]] = {}
    for name, mod in layers.items():
        cands[f"{name} fwd"] = fwd(mod)
    for name, mod in layers.items():
        cands[f"{name} fwd+bwd"] = fwd_bwd(mod, params[name])
    samples = interleave_rotating(cands, args.rounds, args.iters, device, warmup=args.warmup)
    med = {name: median_s(s) for name, s in samples.items()}
    clear_grads()

    mem: dict[str, Optional[dict[str, float]]] = {}
    for name in layers:
        clear_grads()
        mem[name] = peak_extra_mib(cands[f"{name} fwd+bwd"], device)
    clear_grads()

    r = args.rank
    flops = {"base fwd": 2.0 * n * k * m, "base fwd+bwd": 4.0 * n * k * m}
    lora_fwd = 2.0 * n * (k * m + k * r + r * m)
    lora_bwd = 2.0 * n * (m * k + m * r + r * k + r * k + m * r)  # dx through W and B·A; dB; dA
    for name in ("peft", "ours"):
        flops[f"{name} fwd"] = lora_fwd
        flops[f"{name} fwd+bwd"] = lora_fwd + lora_bwd
    ratios = {
        "ours_fwd_vs_base_fwd": med["ours fwd"] / med["base fwd"],
        "ours_fwd_vs_peft_fwd": med["ours fwd"] / med["peft fwd"],
        "ours_fb_vs_peft_fb": med["ours fwd+bwd"] / med["peft fwd+bwd"],
        "ours_fb_vs_base_fb": med["ours fwd+bwd"] / med["base fwd+bwd"],
        "peft_fwd_vs_base_fwd": med["peft fwd"] / med["base fwd"],
    }
    del layers, cands
    return {
        "shape": f"{k}x{m}", "tokens": n, "k": k, "m": m, "r": r, "dtype": args.dtype,
        "adapter_dtype": adapter_dtypes, "backend_ours": backend,
        "median_ms": {name: v * 1e3 for name, v in med.items()},
        "samples_ms": {name: [[v * 1e3 for v in rnd] for rnd in s] for name, s in samples.items()},
        "tflops": {name: flops[name] / v / 1e12 for name, v in med.items()},
        "ratios": ratios, "rel_diff_vs_peft": rel, "peak_fwd_bwd_mib": mem,
    }


def add_common_args(ap: argparse.ArgumentParser, *, tol: float, tol_help: str, strict_help: str) -> None:
    """The options both GPU benchmarks take: --device, --rank, --alpha (None: 2·rank), --dtype,
    --adapter-dtype, --seed, --tol, --strict, --json."""
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: smoke test at tiny sizes with wall-clock timing")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2 * rank)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="base model/layer (and input) dtype")
    ap.add_argument("--adapter-dtype", default="fp32", choices=["fp32", "bf16"],
                    help="fp32: PEFT's default (autocast_adapter_dtype=True; fp16/bf16 bases get fp32 adapters); "
                         "bf16: autocast_adapter_dtype=False, adapters in the base dtype (--dtype)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=tol, help=tol_help)
    ap.add_argument("--strict", action="store_true", help=f"exit {EXIT_STRICT} when {strict_help}")
    ap.add_argument("--json", default=None, metavar="PATH", help="write all results here (atomically)")


def _mem_text(entry: Optional[dict[str, float]]) -> str:
    return f"{entry['extra_mib']:8.0f}" if entry else f"{'n/a':>8}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=None,
                    help=f"rows of x (default {FULL_SIZE['tokens']}; cpu {SMOKE_SIZE['tokens']})")
    ap.add_argument("--shapes", default=None,
                    help=f"kxm,... in→out (default {FULL_SIZE['shapes']}; cpu {SMOKE_SIZE['shapes']})")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median over them)")
    ap.add_argument("--iters", type=int, default=10, help="back-to-back calls per timed sample")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls per candidate first")
    ap.add_argument("--dora", action="store_true",
                    help="DoRA adapters (use_dora=True) on both LoRA layers; fused on CUDA for adapters of the "
                         "base dtype (--adapter-dtype bf16 on a bf16 base, or --dtype fp32)")
    add_common_args(ap, tol=2e-2, tol_help="correctness guard: max relative difference vs PEFT",
                    strict_help="ours is not on the CUDA path or fails the correctness guard")
    args = ap.parse_args(argv)
    device = resolve_device(args.device, "bench_gpu")
    if device is None:
        return EXIT_NO_GPU
    size = FULL_SIZE if device.type == "cuda" else SMOKE_SIZE
    tokens = args.tokens if args.tokens is not None else size["tokens"]
    shapes = parse_shapes(args.shapes if args.shapes is not None else size["shapes"])
    t_start = time.perf_counter()

    meta = header("lorafuse layer benchmark: base nn.Linear vs PEFT LoRA layer vs lorafuse LoRA layer", device,
                  argv)
    alpha = args.alpha if args.alpha is not None else 2.0 * args.rank
    print(f"# tokens={tokens} r={args.rank} alpha={alpha:g} dtype={args.dtype} adapter dtype={args.adapter_dtype} "
          f"(autocast_adapter_dtype={args.adapter_dtype == 'fp32'}) dora={args.dora} dropout=0 | median of "
          f"{args.rounds} rounds x {args.iters} calls, rotating order, {args.warmup} warm-up calls")
    head = (f"{'k→m':>11} | {'base fwd':>8} {'peft fwd':>8} {'ours fwd':>8} | {'base f+b':>8} {'peft f+b':>8} "
            f"{'ours f+b':>8} | {'ours/base':>9} {'ours/peft':>9} {'ours/peft':>9} | {'rel y':>8} | "
            f"{'mem peft':>8} {'mem ours':>8} | backend")
    sub = (f"{'':>11} | {'ms':>8} {'ms':>8} {'ms':>8} | {'ms':>8} {'ms':>8} {'ms':>8} | {'fwd':>9} {'fwd':>9} "
           f"{'f+b':>9} | {'':>8} | {'MiB':>8} {'MiB':>8} |")
    print("# fwd = fwd (no_grad); f+b = fwd+bwd")
    print(head)
    print(sub)
    print("-" * len(head), flush=True)
    results: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    problems: list[str] = []
    for k, m in shapes:
        try:
            res = bench_shape(tokens, k, m, args, device)
        except Exception as exc:  # one shape failing must not lose the others (nor the JSON)
            traceback.print_exc()
            failed.append({"shape": f"{k}x{m}", "error": f"{type(exc).__name__}: {exc}"})
            print(f"{f'{k}→{m}':>11} | FAILED: {failed[-1]['error']}", flush=True)
            continue
        results.append(res)
        ms, rt = res["median_ms"], res["ratios"]
        print(f"{f'{k}→{m}':>11} | {ms['base fwd']:8.3f} {ms['peft fwd']:8.3f} {ms['ours fwd']:8.3f} | "
              f"{ms['base fwd+bwd']:8.3f} {ms['peft fwd+bwd']:8.3f} {ms['ours fwd+bwd']:8.3f} | "
              f"{rt['ours_fwd_vs_base_fwd']:9.3f} {rt['ours_fwd_vs_peft_fwd']:9.3f} {rt['ours_fb_vs_peft_fb']:9.3f} | "
              f"{res['rel_diff_vs_peft']['y']:8.1e} | {_mem_text(res['peak_fwd_bwd_mib']['peft'])} "
              f"{_mem_text(res['peak_fwd_bwd_mib']['ours'])} | {res['backend_ours']}", flush=True)
        bad = {key: v for key, v in res["rel_diff_vs_peft"].items() if not v <= args.tol}
        if bad:
            msg = f"{k}→{m}: ours differs from PEFT beyond --tol {args.tol:g}: " + ", ".join(
                f"{key} {v:.3g}" for key, v in bad.items())
            problems.append(msg)
            print(f"  WARNING: {msg}", flush=True)

    gm = {
        "ours_fwd_vs_base_fwd": geomean([r["ratios"]["ours_fwd_vs_base_fwd"] for r in results]),
        "ours_fb_vs_peft_fb": geomean([r["ratios"]["ours_fb_vs_peft_fb"] for r in results]),
        "ours_fwd_vs_peft_fwd": geomean([r["ratios"]["ours_fwd_vs_peft_fwd"] for r in results]),
        "ours_fb_vs_base_fb": geomean([r["ratios"]["ours_fb_vs_base_fb"] for r in results]),
    }
    met_fwd = gm["ours_fwd_vs_base_fwd"] <= TARGET_FWD_VS_BASE
    met_fb = gm["ours_fb_vs_peft_fb"] <= TARGET_FB_VS_PEFT
    print("-" * len(head))
    print(f"ours fwd / base F.linear fwd (geomean) = {gm['ours_fwd_vs_base_fwd']:.3f}   target <= "
          f"{TARGET_FWD_VS_BASE:.2f}   {'met' if met_fwd else 'NOT met'}")
    print(f"ours fwd+bwd / PEFT fwd+bwd (geomean)  = {gm['ours_fb_vs_peft_fb']:.3f}   target <= "
          f"{TARGET_FB_VS_PEFT:.2f}   {'met' if met_fb else 'NOT met'}")
    print(f"(info) ours fwd / PEFT fwd (geomean) = {gm['ours_fwd_vs_peft_fwd']:.3f}; "
          f"ours fwd+bwd / base fwd+bwd (geomean) = {gm['ours_fb_vs_base_fb']:.3f}")
    if failed:
        print(f"FAILED shapes (left out of the geomeans): {', '.join(f['shape'] for f in failed)}")
    backends = sorted({r["backend_ours"] for r in results})
    print(f"kernel path measured (ours FusedLinear.backend): {', '.join(backends) or 'none'}")
    backend_warning = None
    if backends != ["cuda"]:
        backend_warning = (f"ours ran on backend(s) {backends}, not 'cuda': these numbers do NOT measure "
                           f"lorafuse's CUDA kernels (dtype {args.dtype}, adapters {args.adapter_dtype})")
        if device.type == "cuda":
            loud_warning([backend_warning])
        else:
            print(f"note (smoke mode): {backend_warning}")
    if device.type == "cuda":
        import lorafuse.cuda as lc

        print(f"lorafuse CUDA after the runs: {lc.cuda_info()}")
    wall = time.perf_counter() - t_start
    print(f"wall time: {wall:.1f} s", flush=True)
    if args.json:
        out = dict(meta, benchmark="bench_gpu", wall_s=wall,
                   settings={"tokens": tokens, "shapes": [f"{k}x{m}" for k, m in shapes], "rank": args.rank,
                             "alpha": alpha, "dtype": args.dtype, "adapter_dtype": args.adapter_dtype,
                             "autocast_adapter_dtype": args.adapter_dtype == "fp32", "dora": args.dora,
                             "rounds": args.rounds, "iters": args.iters, "warmup": args.warmup, "seed": args.seed,
                             "tol": args.tol,
                             "timing": "cuda events" if device.type == "cuda" else "perf_counter"},
                   backend_seen=backends, backend_warning=backend_warning, correctness_problems=problems,
                   targets={"ours_fwd_vs_base_fwd": TARGET_FWD_VS_BASE, "ours_fb_vs_peft_fb": TARGET_FB_VS_PEFT},
                   geomean=gm, targets_met={"ours_fwd_vs_base_fwd": met_fwd, "ours_fb_vs_peft_fb": met_fb},
                   results=results, failed=failed)
        write_json_atomic(args.json, out)
        print(f"wrote {args.json}")
    if failed:
        return 1
    if args.strict and (problems or (device.type == "cuda" and backend_warning)):
        return EXIT_STRICT
    return 0


if __name__ == "__main__":
    sys.exit(main())
