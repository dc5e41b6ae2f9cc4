"""A lorafuse layer (`FusedLinear`, PEFT's layer with the fused forward, from `lorafuse.get_peft_model`) vs a real
PEFT LoRA layer (`peft.get_peft_model`) vs the base `nn.Linear` module alone: both LoRA layers wrap the same
`nn.Linear` with the same adapter weights, every side is called as a module; same thread count, one
process, interleaved in rotated order, medians. Each shape has three rows: "forward (no_grad)" (eval mode
under `torch.no_grad`: lorafuse may add s·B·A to W's packed panels instead of forming u), "forward (grad)"
(training mode, the adapter requiring grad: u is kept for the backward) and "fwd+bwd" (backward to x, A, B).
Columns: lorafuse / PEFT and lorafuse / base (issue 6's ratios; ✓/✗ against its targets), the same
lorafuse layer with its output cache off ("cache off": `lorafuse.set_output_cache_limit(0)`, every large
output a fresh allocation as torch's are), and a lorafuse layer with the opt-in packed-W cache
(`set_packed_weight_cache`, "pw": W's panels packed once, +1 copy of W per direction). The last column
is the path the lorafuse layer took: `lorafuse_path` ('c': the C kernels, with their plan; 'peft':
PEFT's own forward ran, as for bf16 layers on CPU without fused bf16 kernels).
The "few" class (24–64 tokens × 4096², batched decoding or tiny training batches) has no target
in the issue; it shows the few-token forward (W read in place, lora.c few_tokens).

--dtype bf16: the base layer in bf16 (PEFT's default keeps the adapters fp32, `autocast_adapter_dtype=True`,
for both libraries), x in bf16; the base column is then the bf16 `nn.Linear`.

    python benchmarks/bench_layer.py [--threads 2] [--rounds 9] [--quick] [--only CLASS] [--dtype fp32|bf16]
"""
from __future__ import annotations

from typing import Optional

import torch

from timing import (PASSES, arguments, begin, interleaved, lora_layer, make_base, make_inputs, max_abs_diff, pass_grid,
                    path_label)

SHAPES = {  # class: [(n tokens, k in, m out, r)]
    "decode": [(8, 576, 576, 16), (1, 4096, 4096, 16), (8, 4096, 4096, 16)],
    "small": [(512, 384, 384, 8), (512, 576, 576, 16), (512, 576, 1536, 16), (512, 896, 128, 16),
              (512, 1024, 1024, 16)],
    "large": [(2048, 2048, 2048, 16), (1024, 4096, 4096, 16), (256, 4096, 14336, 16),
              (256, 14336, 4096, 16)],
    "few": [(24, 4096, 4096, 16), (32, 4096, 4096, 16), (64, 4096, 4096, 16)],  # not in issue 6's table
}
# class: (forward (no_grad) target, fwd+bwd target) on lorafuse / PEFT; decode: d = 576 only
TARGETS = {"decode": (0.60, None), "small": (0.85, 0.85), "large": (0.97, 0.97), "few": (None, None)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}  # lorafuse vs PEFT outputs, relative to max |y|


def mark(ratio: float, target: Optional[float]) -> str:
    """'✓' / '✗' against the target, ' ' where the row has none."""
    return " " if target is None else "✓" if ratio <= target else "✗"


def bench_shape(n: int, k: int, m: int, r: int, dtype: str, rounds: int) -> tuple[dict, dict]:
    """Medians {(side, pass): s} — sides lf, 'lf, cache off', pw, peft, base — and {pass: the lorafuse layer's path}."""
    base = make_base(k, m, DTYPES[dtype])
    pf, lf, pw = (lora_layer(base, r, library) for library in ("peft", "lorafuse", "lorafuse"))
    pw.set_packed_weight_cache(True)
    x, g = make_inputs(n, k, m, DTYPES[dtype])
    with torch.no_grad():
        scale = pf(x).float().abs().max().item()
    for layer in (lf, pw):
        diff = max_abs_diff(layer, pf, x)
        assert diff <= TOLERANCE[dtype] * scale, f"lorafuse vs PEFT at {n}×{k}×{m}: max |diff| {diff:.3g}"
    grid = pass_grid({"lf": lf, "pw": pw, "peft": pf, "base": base}, x, g, cache_off=["lf"])
    return interleaved(grid, rounds=rounds, prime=True), {p: path_label(grid[("lf", p)], [lf]) for p in PASSES}


def main() -> None:
    ap = arguments(__doc__, quick="one shape per class")
    ap.add_argument("--only", choices=sorted(SHAPES))
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the base layer's dtype (default fp32)")
    args = ap.parse_args()
    rounds = begin(args, f"bench_layer: lorafuse FusedLinear vs PEFT lora.Linear vs the base nn.Linear ({args.dtype})")
    print(f"\n{'class':7s} {'n':>5} {'k':>6} {'m':>6} {'r':>3} | {'pass':17s} | {'ms lf / peft / base':>26} | "
          f"{'lf/peft':>8} {'lf/base':>8} | {'cache off/peft':>14} | {'pw/peft':>7} {'pw/base':>7} | lorafuse path")
    for cls, shapes in SHAPES.items():
        if args.only and cls != args.only:
            continue
        for n, k, m, r in (shapes[:1] if args.quick else shapes):
            t, paths = bench_shape(n, k, m, r, args.dtype, rounds)
            fwd_target, fb_target = TARGETS[cls] if cls != "decode" or k == 576 else (None, None)
            targets = {PASSES[0]: fwd_target, PASSES[2]: fb_target}
            for p in PASSES:
                ms = " ".join(f"{t[(side, p)] * 1e3:8.3f}" for side in ("lf", "peft", "base"))
                ratio = t[("lf", p)] / t[("peft", p)]
                print(f"{cls:7s} {n:5d} {k:6d} {m:6d} {r:3d} | {p:17s} | {ms} | "
                      f"{ratio:7.3f}{mark(ratio, targets.get(p))} {t[('lf', p)] / t[('base', p)]:8.3f} | "
                      f"{t[('lf, cache off', p)] / t[('peft', p)]:14.3f} | "
                      f"{t[('pw', p)] / t[('peft', p)]:7.3f} {t[('pw', p)] / t[('base', p)]:7.3f} | {paths[p]}",
                      flush=True)
    print(f"\ntargets: decode forward (no_grad) ≤ 0.60 (d=576); small forward (no_grad) and fwd+bwd ≤ 0.85; large "
          f"≤ 0.97 and lf/base ≤ 1.03 (✓/✗: the default layer, {args.dtype}; pw: the opt-in packed-W cache, decode "
          "never packs W; forward (grad) has no target)")


if __name__ == "__main__":
    main()
