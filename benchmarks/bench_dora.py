"""DoRA layers: lorafuse's fused DoRA (`FusedLinear` with ``use_dora=True``) vs PEFT's DoRA layer vs lorafuse's
plain LoRA layer, all on the same nn.Linear, each made by its library's get_peft_model with the same adapter
weights, called as modules (fp32, same threads, one process, interleaved in rotated order, medians). Rows:
"forward (no_grad)" (eval mode: no dropout), "forward (grad)" (training mode) and "fwd+bwd"; the lorafuse DoRA
layer also with its output cache off ("cache off", `lorafuse.set_output_cache_limit(0)`). Prints the ratios
of the DoRA issue's table and the path the fused DoRA layer took (`lorafuse_path` and the kernel plan).

    python benchmarks/bench_dora.py [--threads 2] [--rounds 9] [--quick] [--dropout 0.1] [--dtype bf16] [--quant nf4]

--dtype bf16: the base nn.Linear and x in bf16, PEFT's default fp32 adapters and magnitude on both sides
(lorafuse: `DoraHalfFunction`). --quant nf4 (QLoRA's DoRA): the base bitsandbytes' Linear4bit (NF4, double quant,
bf16 compute; bench_qlora.py's), x bf16 — one copy of it per side: bitsandbytes' eval-mode no-grad forward
repacks W for its own CPU kernel, which PEFT's no_grad row then runs.

With --dropout the training rows (forward (grad), fwd+bwd) run with that lora_dropout (PEFT's DoRA then runs its
base GEMM twice, the fused layer too: x·Wᵀ and (x ⊙ m)·Wᵀ on a half base, x·Wᵀ and x̃·Wᵀ in fp32).
"""
from __future__ import annotations

import torch
from timing import (PASSES, arguments, begin, interleaved, lora_layer, make_base, make_inputs, max_abs_diff, mode,
                    pass_grid, path_label)

SHAPES = [(512, 1024, 1024, 16), (2048, 2048, 2048, 16)]  # (n tokens, k in, m out, r)
QUICK = [(128, 512, 512, 16)]  # a smoke run: PEFT's bf16 DoRA backward takes ~1 s at 512×1024² on torch's fallback GEMM
SIDES = ("DoRA", "DoRA, cache off", "PEFT DoRA", "LoRA")
# ratio name: (numerator side, denominator side, pass, target)
TARGETS = {"f+b DoRA / PEFT DoRA": ("DoRA", "PEFT DoRA", PASSES[2], 0.70),
           "f+b DoRA / lorafuse LoRA": ("DoRA", "LoRA", PASSES[2], 1.10),
           "no_grad fwd DoRA / lorafuse LoRA": ("DoRA", "LoRA", PASSES[0], 1.05)}


def main() -> None:
    ap = arguments(__doc__, quick="one small shape, 128×512×512")
    ap.add_argument("--dropout", type=float, default=0.0, help="lora_dropout of the training rows")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the base's and x's dtype")
    ap.add_argument("--quant", choices=["nf4"], default=None, help="a 4-bit base (bitsandbytes' Linear4bit, bf16)")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" or args.quant else torch.float32
    what = f"{args.quant} base (bitsandbytes), bf16 x" if args.quant else f"{args.dtype} base"
    rounds = begin(args, f"bench_dora: lorafuse DoRA vs PEFT DoRA vs lorafuse LoRA ({what}, fp32 adapters)")
    for n, k, m, r in QUICK if args.quick else SHAPES:
        if args.quant:
            from bench_qlora import linear4bit

            dense = make_base(k, m, torch.float32)
            bases = [linear4bit(dense) for _ in range(4)]
        else:
            bases = [make_base(k, m, dtype)] * 4
        dora, peft_dora, peft_dora_eval = (lora_layer(base, r, library, dropout=args.dropout, use_dora=True)
                                           for base, library in zip(bases, ("lorafuse", "peft", "peft")))
        lora = lora_layer(bases[3], r, dropout=args.dropout)
        x, g = make_inputs(n, k, m, dtype)
        with torch.no_grad():
            tol = 1e-3 if dtype == torch.float32 else 3e-2 * peft_dora_eval(x).float().abs().max().item()
        if not args.quant:
            assert max_abs_diff(dora, peft_dora_eval, x) < tol, "lorafuse DoRA differs from PEFT's"
        elif args.dropout == 0.0:  # against PEFT + bnb in training mode: bnb's eval-mode kernel rounds its own way
            with mode([dora, peft_dora], True), torch.no_grad():
                assert (dora(x).float() - peft_dora(x).float()).abs().max().item() < tol, "lorafuse differs from PEFT"
        grid = pass_grid({"DoRA": dora, "PEFT DoRA": peft_dora, "LoRA": lora}, x, g, cache_off=["DoRA"])
        grid[("PEFT DoRA", PASSES[0])] = pass_grid({"PEFT DoRA": peft_dora_eval}, x, g)[("PEFT DoRA", PASSES[0])]
        t = interleaved(grid, rounds=rounds, prime=True)
        print(f"\n## {n}×{k}×{m} r{r}, training dropout {args.dropout}  (ms: " + ", ".join(SIDES) + ")")
        for p in PASSES:
            print(f"   {p:17s} " + " ".join(f"{t[(side, p)] * 1e3:9.2f}" for side in SIDES)
                  + f"   | lorafuse DoRA path: {path_label(grid[('DoRA', p)], [dora])}")
        for what, (num, den, p, target) in TARGETS.items():
            ratio = t[(num, p)] / t[(den, p)]
            off = t[("DoRA, cache off", p)] / t[(den, p)]
            print(f"   {what:34s} {ratio:6.3f}  (target ≤ {target:.2f} {'✓' if ratio <= target else '✗'}; "
                  f"cache off {off:6.3f})")
    print("\nDoRA ratios measured")


if __name__ == "__main__":
    main()
