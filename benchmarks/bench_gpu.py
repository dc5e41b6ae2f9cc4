"""GPU benchmark: lorafuse's CUDA LoRA linear vs torch F.linear (base only) and vs torch + PEFT.

Llama-8B-like projections by default (tokens 8192; 4096→4096, 4096→1024, 4096→14336, 14336→4096;
r = 16; bf16). For each shape, every variant is timed with CUDA events, interleaved round by round
(so clocks and thermals hit all variants alike), and the median per-call time is reported:

    base      F.linear(x, W)                          forward floor (no adapter at all)
    peft      PEFT's lora.Linear (bf16 adapters: autocast_adapter_dtype=False), dropout 0
    ours      lorafuse (lorafuse.autograd.lora_linear → lorafuse.cuda kernels)

"fwd" is the forward alone under torch.no_grad(); "fwd+bwd" is forward + backward with x requiring grad
(dx is computed, as for any layer above the first) and only the adapter trainable (W frozen).
TFLOP/s counts the useful LoRA work for every variant alike (base: its own GEMM only):
    fwd: 2n(km + kr + rm)    bwd: 2n(mk + mr + rk + rk + mr)

    python benchmarks/bench_gpu.py [--tokens 8192] [--rank 16] [--shapes 4096x4096,...] [--json out.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys

import torch
import torch.nn.functional as F


def _parse_shapes(text):
    out = []
    for item in text.split(","):
        k, m = item.lower().split("x")
        out.append((int(k), int(m)))
    return out


def _time(fn, iters):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters * 1e-3  # seconds per call


def _peft_linear(W, r, alpha, dtype):
    import peft

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device, dtype=dtype)
            with torch.no_grad():
                self.proj.weight.copy_(W)

        def forward(self, x):
            return self.proj(x)

    conf = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"], init_lora_weights=False)
    model = peft.get_peft_model(Holder(), conf, autocast_adapter_dtype=False)
    return model


def _ours_fn():
    """The real training path: lorafuse.autograd.lora_linear (dispatches CUDA tensors to lorafuse.cuda)."""
    from lorafuse.autograd import backend_name, lora_linear

    def via_autograd(x, W, A, B, s):
        return lora_linear(x, W, None, A, B, s)
    return via_autograd, backend_name, "lorafuse.autograd.lora_linear"


def bench_shape(n, k, m, r, dtype, iters, rounds, warmup):
    torch.manual_seed(0)
    dev = "cuda"
    s = 2.0
    x = torch.randn(n, k, device=dev, dtype=dtype)
    W = torch.randn(m, k, device=dev, dtype=dtype) * k ** -0.5
    g = torch.randn(n, m, device=dev, dtype=dtype)
    peft_model = _peft_linear(W, r, int(s * r), dtype)
    lora_layer = peft_model.base_model.model.proj
    A = lora_layer.lora_A["default"].weight
    B = lora_layer.lora_B["default"].weight
    assert A.dtype == dtype and B.dtype == dtype, (A.dtype, B.dtype)
    ours, backend_name, ours_desc = _ours_fn()
    if backend_name is not None:
        assert backend_name(x, W, A, B) == "cuda", "lorafuse.autograd would not use the CUDA kernels here"
    xg = x.detach().clone().requires_grad_(True)

    # correctness guard: ours ≈ PEFT on this very shape (bf16 output rounding)
    with torch.no_grad():
        y_ref = peft_model(x)
        y_ours = ours(x, W, A, B, s)
    rel = ((y_ours.float() - y_ref.float()).norm() / y_ref.float().norm()).item()

    def base_fwd():
        with torch.no_grad():
            F.linear(x, W)

    def peft_fwd():
        with torch.no_grad():
            peft_model(x)

    def ours_fwd():
        with torch.no_grad():
            ours(x, W, A, B, s)

    def base_fb():
        y = F.linear(xg, W)
        y.backward(g)

    def peft_fb():
        y = peft_model(xg)
        y.backward(g)

    def ours_fb():
        y = ours(xg, W, A, B, s)
        y.backward(g)

    variants = {"base fwd": base_fwd, "peft fwd": peft_fwd, "ours fwd": ours_fwd,
                "base fwd+bwd": base_fb, "peft fwd+bwd": peft_fb, "ours fwd+bwd": ours_fb}
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(_time(fn, iters))
    med = {name: statistics.median(v) for name, v in times.items()}

    # peak memory of one training step (activations saved for backward), beyond the resident tensors
    mem = {}
    for name, fn in (("peft", peft_fb), ("ours", ours_fb)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        mem[name] = (torch.cuda.max_memory_allocated() - before) / 2**20

    f_base = 2.0 * n * k * m
    f_fwd = 2.0 * n * (k * m + k * r + r * m)
    f_bwd = 2.0 * n * (m * k + m * r + r * k + r * k + m * r)
    f_base_fb = f_base + 2.0 * n * m * k
    tflops = {
        "base fwd": f_base / med["base fwd"], "peft fwd": f_fwd / med["peft fwd"], "ours fwd": f_fwd / med["ours fwd"],
        "base fwd+bwd": f_base_fb / med["base fwd+bwd"], "peft fwd+bwd": (f_fwd + f_bwd) / med["peft fwd+bwd"],
        "ours fwd+bwd": (f_fwd + f_bwd) / med["ours fwd+bwd"],
    }
    return dict(n=n, k=k, m=m, r=r, dtype=str(dtype).replace("torch.", ""), ms={k_: v * 1e3 for k_, v in med.items()},
                tflops={k_: v / 1e12 for k_, v in tflops.items()},
                ratio_fwd_vs_base=med["ours fwd"] / med["base fwd"],
                ratio_fwd_vs_peft=med["ours fwd"] / med["peft fwd"],
                ratio_fb_vs_peft=med["ours fwd+bwd"] / med["peft fwd+bwd"],
                ratio_fb_vs_base=med["ours fwd+bwd"] / med["base fwd+bwd"],
                peak_step_mib=mem, rel_diff_vs_peft=rel, ours_path=ours_desc)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--shapes", default="4096x4096,4096x1024,4096x14336,14336x4096", help="kxm,kxm,... (in→out)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU visible to torch", file=sys.stderr)
        return 2
    import lorafuse.cuda as lc

    if not lc.is_compiled():
        print(f"bench_gpu: lorafuse has no CUDA support: {lc.cuda_info()}", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    props = torch.cuda.get_device_properties(0)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} | {props.name}, "
          f"{props.multi_processor_count} SMs | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
          f"lorafuse CUDA: {lc.cuda_info()}")
    print(f"# command: {' '.join([sys.executable] + sys.argv)}")
    print(f"# tokens={args.tokens} r={args.rank} dtype={args.dtype}; median of {args.rounds} interleaved rounds "
          f"x {args.iters} calls; TFLOP/s of the LoRA work (base: of its GEMM)")
    head = (f"{'k→m':>12} | {'base fwd':>9} {'peft fwd':>9} {'ours fwd':>9} | {'base f+b':>9} {'peft f+b':>9} "
            f"{'ours f+b':>9} | {'fwd/base':>8} {'fwd/peft':>8} {'fb/peft':>8} | {'mem peft':>8} {'mem ours':>8} MiB")
    print(head)
    print("-" * len(head))
    results = []
    for k, m in _parse_shapes(args.shapes):
        res = bench_shape(args.tokens, k, m, args.rank, dtype, args.iters, args.rounds, args.warmup)
        results.append(res)
        t = res["tflops"]
        print(f"{f'{k}→{m}':>12} | {t['base fwd']:9.1f} {t['peft fwd']:9.1f} {t['ours fwd']:9.1f} | "
              f"{t['base fwd+bwd']:9.1f} {t['peft fwd+bwd']:9.1f} {t['ours fwd+bwd']:9.1f} | "
              f"{res['ratio_fwd_vs_base']:8.3f} {res['ratio_fwd_vs_peft']:8.3f} {res['ratio_fb_vs_peft']:8.3f} | "
              f"{res['peak_step_mib']['peft']:8.0f} {res['peak_step_mib']['ours']:8.0f}", flush=True)
        if res["rel_diff_vs_peft"] > 2e-2:
            print(f"  WARNING: ours differs from PEFT by {res['rel_diff_vs_peft']:.3g} (relative norm)", flush=True)
    gm = lambda key: statistics.geometric_mean([r[key] for r in results])  # noqa: E731
    print(f"geomean time ratios: ours fwd / base F.linear fwd = {gm('ratio_fwd_vs_base'):.3f} (target <= 1.03); "
          f"ours fwd+bwd / torch+PEFT fwd+bwd = {gm('ratio_fb_vs_peft'):.3f} (target <= 0.85); "
          f"ours fwd / PEFT fwd = {gm('ratio_fwd_vs_peft'):.3f}")
    print(f"ours path: {results[0]['ours_path']}")
    print(f"lorafuse CUDA after the runs: {lc.cuda_info()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(results=results, device=props.name, torch=torch.__version__), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
