"""QLoRA layers: lorafuse's LoRA layer on bitsandbytes' 4-bit Linear4bit (`FusedLinear4bit`, from
`lorafuse.get_peft_model`) vs PEFT's LoRA layer on the same Linear4bit (`peft.get_peft_model`: bnb dequantizes
W to bf16 in every forward and backward) vs lorafuse's bf16 LoRA layer on W dequantized once (`FusedLinear`
on a bf16 nn.Linear: the ≤ 1.15 target's denominator). W (m, k) NF4, blocks of 64, double-quantized scales
(bnb's quantize_4bit), compute dtype bf16, x bf16, adapters fp32 (PEFT's default), r 16, alpha 32, bias on.
Every side called as a module; same thread count; one process; interleaved in rotated order, medians
(timing.py). Rows: forward (no_grad) (eval mode: bnb may repack W for its own CPU inference kernel — the
PEFT side then runs that kernel, on a Linear4bit of its own), forward (grad), fwd+bwd (backward to x, A, B).
The last column is the path the lorafuse 4-bit layer took ('c' and its plan); the one before, the frozen
weight's bytes (data + scales + nested scales + tables) against fp32's.

--quant int8: the same on bitsandbytes' 8-bit Linear8bitLt (LLM.int8 storage; `FusedLinear8bitLt` vs PEFT's
``lora.bnb.Linear8bitLt``, whose base dequantizes W to bf16 in every forward and backward in training). Its
forward (no_grad) row is eval mode, where bitsandbytes quantizes x to int8 (its inference matmul) and the
lorafuse layer runs PEFT's forward too: that row measures PEFT on both sides.

    python benchmarks/bench_qlora.py [--quant nf4|int8] [--threads 2] [--rounds 9] [--quick]
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from timing import (PASSES, arguments, begin, interleaved, lora_layer, make_base, make_inputs, max_abs_diff, pass_grid,
                    path_label)

SHAPES = [(512, 1024, 1024, 16), (2048, 2048, 2048, 16), (1, 4096, 4096, 16), (8, 4096, 4096, 16)]
QUICK = [(64, 256, 256, 8), (1, 512, 512, 8)]
# (fwd+bwd lf / peft+bnb target, fwd+bwd lf / lf bf16 target, decode forward lf / lf bf16 target)
TARGETS = (0.6, 1.15, 0.6)


def linear4bit(base: nn.Linear):
    """bnb's Linear4bit holding base's W (quantized by bnb: NF4, blocks of 64, double quant) and bias, bf16 compute."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(base.in_features, base.out_features, bias=True, compute_dtype=torch.bfloat16,
                          compress_statistics=True, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(base.weight.detach().to(torch.bfloat16).clone(), requires_grad=False,
                                 quant_type="nf4", compress_statistics=True, blocksize=64)
    q.bias = nn.Parameter(base.bias.detach().to(torch.bfloat16).clone(), requires_grad=False)
    return q.to("cpu")  # quantizes


def linear8bit(base: nn.Linear):
    """bnb's Linear8bitLt holding base's W (quantized by bnb: int8 codes, a scale per row) and bias, bf16."""
    import bitsandbytes as bnb

    # its eval-mode matmul warns on every call that it casts x to fp16
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)

    q = bnb.nn.Linear8bitLt(base.in_features, base.out_features, bias=True, has_fp16_weights=False)
    q.weight = bnb.nn.Int8Params(base.weight.detach().to(torch.bfloat16).clone(), requires_grad=False,
                                 has_fp16_weights=False)
    q.bias = nn.Parameter(base.bias.detach().to(torch.bfloat16).clone(), requires_grad=False)
    return q.to("cpu")  # quantizes


def dequantized(q) -> torch.Tensor:
    """W in bf16 as the quantized base computes with it (bnb's dequantize_4bit; MatMul8bitFp for int8)."""
    import bitsandbytes.functional as bnbf

    if hasattr(q.weight, "quant_state"):
        return bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state).to(torch.bfloat16)
    scb = q.weight.SCB if q.weight.SCB is not None else q.state.SCB
    return q.weight.data.to(torch.bfloat16).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))


def weight_bytes(q) -> int:
    """Bytes of a quantized weight as stored: codes and every quant-state tensor (4-bit) or the row scales."""
    qs = getattr(q.weight, "quant_state", None)
    if qs is None:
        scb = q.weight.SCB if q.weight.SCB is not None else q.state.SCB
        tensors = [q.weight.data, scb]
    else:
        tensors = [q.weight.data, qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code] if qs.nested else [])
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_shape(n: int, k: int, m: int, r: int, rounds: int, quant: str) -> tuple[dict, dict, float]:
    """Medians {(side, pass): s} for sides q (lorafuse on the quantized base), peft (PEFT + bnb), bf16 (lorafuse
    bf16 on W dequantized), the quantized layer's path per pass, and the weight's bytes / fp32 bytes."""
    base = make_base(k, m, torch.float32)
    make = linear8bit if quant == "int8" else linear4bit
    q_lf, q_pf, q_pf_inf = make(base), make(base), make(base)
    lf, pf, pf_inf = lora_layer(q_lf, r, "lorafuse"), lora_layer(q_pf, r, "peft"), lora_layer(q_pf_inf, r, "peft")
    dense = nn.Linear(k, m).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        dense.weight.copy_(dequantized(q_lf))
        dense.bias.copy_(q_lf.bias)
    bf = lora_layer(dense, r, "lorafuse")
    x, g = make_inputs(n, k, m, torch.bfloat16)
    with torch.no_grad():
        scale = bf(x).float().abs().max().item()
    for layer in (lf, pf_inf) if quant == "nf4" else ():  # not pf: bnb's eval-mode repacking would leave it
        diff = max_abs_diff(layer, bf, x)  # unable to train; int8's eval mode is bnb's int8 matmul on both sides
        assert diff <= 3e-2 * scale, f"{type(layer).__name__} vs the bf16 layer at {n}×{k}×{m}: max |diff| {diff:.3g}"
    if quant == "int8":  # the training-mode forward, where the layers are fused, against the bf16 layer
        lf.train()
        with torch.no_grad():
            diff = (lf(x).float() - bf(x).float()).abs().max().item()
        assert diff <= 3e-2 * scale, f"the int8 layer vs the bf16 layer at {n}×{k}×{m}: max |diff| {diff:.3g}"
    grid = pass_grid({"q": lf, "peft": pf, "bf16": bf}, x, g)
    grid[("peft", PASSES[0])] = pass_grid({"peft": pf_inf}, x, g)[("peft", PASSES[0])]
    t = interleaved(grid, rounds=rounds)
    paths = {p: path_label(grid[("q", p)], [lf]) for p in PASSES}
    return t, paths, weight_bytes(q_lf) / (m * k * 4)


def main() -> None:
    parser = arguments(__doc__, quick="two small shapes")
    parser.add_argument("--quant", choices=["nf4", "int8"], default="nf4", help="the base's storage (default nf4)")
    args = parser.parse_args()
    what = ("FusedLinear8bitLt vs PEFT lora.bnb.Linear8bitLt vs lorafuse bf16 layer (LLM.int8 storage, bf16 x, "
            "fp32 adapters)" if args.quant == "int8" else
            "FusedLinear4bit vs PEFT lora.bnb.Linear4bit vs lorafuse bf16 layer (NF4, double quant, bf16 compute, "
            "fp32 adapters)")
    rounds = begin(args, f"bench_qlora: lorafuse {what}")
    q = "q4" if args.quant == "nf4" else "q8"
    print(f"\n{'n':>5} {'k':>5} {'m':>5} {'r':>3} | {'pass':17s} | {f'ms {q} / peft+bnb / bf16':>28} | "
          f"{f'{q}/peft+bnb':>11} {f'{q}/bf16':>8} | W bytes/fp32 | lorafuse path")
    for n, k, m, r in QUICK if args.quick else SHAPES:
        t, paths, wb = bench_shape(n, k, m, r, rounds, args.quant)
        for p in PASSES:
            ms = " ".join(f"{t[(side, p)] * 1e3:9.3f}" for side in ("q", "peft", "bf16"))
            a, b = t[("q", p)] / t[("peft", p)], t[("q", p)] / t[("bf16", p)]
            nf4 = args.quant == "nf4"  # the targets are the 4-bit ones
            ta = TARGETS[0] if nf4 and p == PASSES[2] and n > 8 else None
            tb = (TARGETS[1] if p == PASSES[2] and n > 8 else TARGETS[2] if p == PASSES[0] and n <= 8 else None
                  ) if nf4 else None
            marks = ["" if tt is None else "✓" if v <= tt else "✗" for v, tt in ((a, ta), (b, tb))]
            print(f"{n:5d} {k:5d} {m:5d} {r:3d} | {p:17s} | {ms} | {a:10.3f}{marks[0]:1s} {b:7.3f}{marks[1]:1s} | "
                  f"{wb:12.3f} | {paths[p]}", flush=True)
    if args.quant == "nf4":
        print(f"\ntargets: fwd+bwd q4 / peft+bnb ≤ {TARGETS[0]} and q4 / bf16 ≤ {TARGETS[1]} (n > 8); decode forward "
              f"(no_grad, n ≤ 8) q4 / bf16 ≤ {TARGETS[2]}; W bytes / fp32 ≤ 0.15")


if __name__ == "__main__":
    main()
