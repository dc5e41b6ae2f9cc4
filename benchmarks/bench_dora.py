"""DoRA layers: lorafuse's fused DoRA (`FusedLinear` with ``use_dora=True``) vs PEFT's DoRA layer vs lorafuse's
plain LoRA layer, all on the same nn.Linear (fp32, same threads, one process, interleaved, medians). Prints the
ratios of the DoRA issue's table and the kernel plans measured.

    python benchmarks/bench_dora.py [--threads 2] [--rounds 9] [--quick] [--dropout 0.1]

With --dropout the f+b rows train with that lora_dropout (PEFT's DoRA then runs its base GEMM twice, the fused
layer one more GEMM on x − x̃); the forward rows stay no_grad (eval: no dropout).
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from bench_layer import Holder, fwd_bwd
from timing import header, interleaved, plan_label, set_threads

SHAPES = [(512, 1024, 1024, 16), (2048, 2048, 2048, 16)]  # (n tokens, k in, m out, r)
TARGETS = {"f+b DoRA / PEFT DoRA": 0.70, "f+b DoRA / lorafuse LoRA": 1.10, "no_grad fwd DoRA / lorafuse LoRA": 1.05}


def make_layers(k: int, m: int, r: int, dropout: float = 0.0):
    """(lorafuse DoRA, PEFT DoRA, lorafuse LoRA) layers on one nn.Linear, DoRA adapters and magnitudes equal."""
    import peft

    import lorafuse

    torch.manual_seed(0)
    base = nn.Linear(k, m)
    cfg = dict(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["proj"], init_lora_weights=False)
    lf = lorafuse.get_peft_model(Holder(base), lorafuse.LoraConfig(use_dora=True, **cfg)).base_model.model.proj
    pf = peft.get_peft_model(Holder(base), peft.LoraConfig(use_dora=True, **cfg)).base_model.model.proj
    lora = lorafuse.get_peft_model(Holder(base), lorafuse.LoraConfig(**cfg)).base_model.model.proj
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            w = getattr(pf, name)["default"].weight
            getattr(lf, name)["default"].weight.copy_(w)
            getattr(lora, name)["default"].weight.copy_(w)
        lf.lora_magnitude_vector["default"].weight.copy_(pf.lora_magnitude_vector["default"].weight)
    return lf, pf, lora


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="the first shape, 3 rounds")
    ap.add_argument("--dropout", type=float, default=0.0, help="lora_dropout of the training rows")
    args = ap.parse_args()
    set_threads(args.threads)
    header("bench_dora: lorafuse DoRA vs PEFT DoRA vs lorafuse LoRA (fp32)", args.threads)
    rounds = 3 if args.quick else args.rounds
    for n, k, m, r in SHAPES[:1] if args.quick else SHAPES:
        lf, pf, lora = make_layers(k, m, r, args.dropout)
        x, g = torch.randn(n, k), torch.randn(n, m)
        for layer in (lf, pf, lora):
            layer.eval()
        with torch.no_grad():
            torch.testing.assert_close(lf(x), pf(x), rtol=1e-4, atol=1e-4)
            tf = interleaved({"lf": lambda: lf(x), "peft": lambda: pf(x), "lora": lambda: lora(x)}, rounds=rounds)
            fwd_plan = plan_label(lambda: lf(x))
        for layer in (lf, pf, lora):
            layer.train()
        tb = interleaved({"lf": fwd_bwd(lf, x, g), "peft": fwd_bwd(pf, x, g), "lora": fwd_bwd(lora, x, g)},
                         rounds=rounds)
        assert lf.lorafuse_path == "c", lf.lorafuse_path
        ratios = {"f+b DoRA / PEFT DoRA": tb["lf"] / tb["peft"], "f+b DoRA / lorafuse LoRA": tb["lf"] / tb["lora"],
                  "no_grad fwd DoRA / lorafuse LoRA": tf["lf"] / tf["lora"]}
        print(f"\n## {n}×{k}×{m} r{r}, training dropout {args.dropout}: fwd ms DoRA {tf['lf'] * 1e3:.2f} PEFT DoRA {tf['peft'] * 1e3:.2f} "
              f"LoRA {tf['lora'] * 1e3:.2f} | f+b ms DoRA {tb['lf'] * 1e3:.2f} PEFT DoRA {tb['peft'] * 1e3:.2f} "
              f"LoRA {tb['lora'] * 1e3:.2f}")
        print(f"   lorafuse DoRA plan: fwd {fwd_plan} ; f+b {plan_label(fwd_bwd(lf, x, g))}")
        for what, ratio in ratios.items():
            print(f"   {what:34s} {ratio:6.3f}  (target ≤ {TARGETS[what]:.2f} {'✓' if ratio <= TARGETS[what] else '✗'})")
    print("\nDoRA ratios measured")


if __name__ == "__main__":
    main()
