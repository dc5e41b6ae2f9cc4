"""A lorafuse layer (`FusedLinear`, PEFT's layer with the fused forward, from `lorafuse.get_peft_model`) vs a real PEFT LoRA layer vs torch `F.linear` (frozen base alone):
both LoRA layers wrap the same `nn.Linear` with the same adapter weights; fp32, same thread
count, one process, interleaved, medians. Prints every ratio of issue 6's table (default
lorafuse layer), and the same ratios for a lorafuse layer with the opt-in packed-W cache
(`set_packed_weight_cache`, columns "pw": W's panels packed once, +1 copy of W per direction).
The "few" class (24–64 tokens × 4096², batched decoding or tiny training batches) has no target
in the issue; it shows the few-token forward (W read in place, lora.c few_tokens).

    python benchmarks/bench_layer.py [--threads 2] [--rounds 9] [--quick] [--only CLASS]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from timing import header, interleaved, plan_label, set_threads

SHAPES = {  # class: [(n tokens, k in, m out, r)]
    "decode": [(8, 576, 576, 16), (1, 4096, 4096, 16)],
    "small": [(512, 384, 384, 8), (512, 576, 576, 16), (512, 576, 1536, 16), (512, 896, 128, 16),
              (512, 1024, 1024, 16)],
    "large": [(2048, 2048, 2048, 16), (1024, 4096, 4096, 16), (256, 4096, 14336, 16),
              (256, 14336, 4096, 16)],
    "few": [(24, 4096, 4096, 16), (32, 4096, 4096, 16), (64, 4096, 4096, 16)],  # not in issue 6's table
}
TARGETS = {"decode": (0.60, None), "small": (0.85, 0.85), "large": (0.97, 0.97),  # decode: d = 576 only
           "few": (None, None)}


def mark(ratio: float, target: float | None) -> str:
    """'✓' / '✗' against the target, ' ' where the shape has none."""
    return " " if target is None else "✓" if ratio <= target else "✗"


class Holder(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.proj = lin


def make_layers(k: int, m: int, r: int):
    """(lorafuse FusedLinear, the same with the packed-W cache, peft lora.Linear, base nn.Linear)
    sharing W, b, A and B."""
    import peft

    import lorafuse

    torch.manual_seed(0)
    base = nn.Linear(k, m)
    cfg = dict(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["proj"])
    pm = peft.get_peft_model(Holder(base), peft.LoraConfig(**cfg))
    layers = [lorafuse.get_peft_model(Holder(base), lorafuse.LoraConfig(**cfg)).base_model.model.proj
              for _ in range(2)]
    layers[1].set_packed_weight_cache(True)
    p_layer = pm.base_model.model.proj
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            w = torch.randn_like(getattr(p_layer, name)["default"].weight) * 0.05
            for layer in (p_layer, *layers):
                getattr(layer, name)["default"].weight.copy_(w)
    return layers[0], layers[1], p_layer, base


def fwd_bwd(layer, x, g):
    def step():
        xx = x.detach().requires_grad_(True)
        layer(xx).backward(g)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="one shape per class, 3 rounds")
    ap.add_argument("--only", choices=sorted(SHAPES))
    args = ap.parse_args()
    set_threads(args.threads)
    header("bench_layer: lorafuse FusedLinear vs PEFT lora.Linear vs F.linear (fp32)", args.threads)
    rounds = 3 if args.quick else args.rounds
    print(f"\n{'class':7s} {'n':>5} {'k':>6} {'m':>6} {'r':>3} | {'fwd ms lf/peft/base':>24} | "
          f"{'fwd lf/peft':>11} {'lf/base':>8} | {'f+b ms lf/peft':>17} | {'f+b lf/peft':>11} | "
          f"{'pw: fwd/peft':>12} {'/base':>6} {'f+b/peft':>9} | lorafuse plan: fwd ; f+b")
    for cls, shapes in SHAPES.items():
        if args.only and cls != args.only:
            continue
        for n, k, m, r in (shapes[:1] if args.quick else shapes):
            lf, pw, pf, base = make_layers(k, m, r)
            x, g = torch.randn(n, k), torch.randn(n, m)
            W, b = base.weight.detach(), base.bias.detach()
            with torch.no_grad():
                torch.testing.assert_close(lf(x), pf(x), rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(pw(x), pf(x), rtol=1e-4, atol=1e-4)
                cands = {"lf": lambda: lf(x), "pw": lambda: pw(x), "peft": lambda: pf(x),
                         "base": lambda: F.linear(x, W, b)}
                tf = interleaved(cands, rounds=rounds)
                plans = plan_label(cands["lf"])
            tb = {}
            if cls != "decode":
                tb = interleaved({"lf": fwd_bwd(lf, x, g), "pw": fwd_bwd(pw, x, g), "peft": fwd_bwd(pf, x, g)},
                                 rounds=rounds)
                plans += " ; " + plan_label(fwd_bwd(lf, x, g))
            fwd_t, fb_t = TARGETS[cls] if cls != "decode" or k == 576 else (None, None)
            line = (f"{cls:7s} {n:5d} {k:6d} {m:6d} {r:3d} | {tf['lf'] * 1e3:7.3f} {tf['peft'] * 1e3:7.3f} "
                    f"{tf['base'] * 1e3:7.3f} | {tf['lf'] / tf['peft']:6.3f}{mark(tf['lf'] / tf['peft'], fwd_t)}    "
                    f"{tf['lf'] / tf['base']:7.3f} | ")
            if tb:
                ratio = tb["lf"] / tb["peft"]
                line += f"{tb['lf'] * 1e3:8.2f} {tb['peft'] * 1e3:8.2f} | {ratio:6.3f}{mark(ratio, fb_t)}    "
            else:
                line += f"{'—':>17} | {'—':>11} "
            line += f" | {tf['pw'] / tf['peft']:11.3f} {tf['pw'] / tf['base']:6.3f} "
            line += f"{tb['pw'] / tb['peft']:9.3f}" if tb else f"{'—':>9}"
            line += f" | {plans}"
            print(line, flush=True)
    print("\ntargets: decode fwd ≤ 0.60 (d=576); small fwd/f+b ≤ 0.85; large fwd/f+b ≤ 0.97 "
          "and lf/base ≤ 1.03 (✓/✗: the default layer; pw: the opt-in packed-W cache, "
          "decode never packs W)")


if __name__ == "__main__":
    main()
