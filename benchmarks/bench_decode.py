"""Decode as a model runs it: the forward (eval, no_grad) of n = 1 and 8 tokens through a stack of L distinct
4096 × 4096 LoRA layers, each with its own W — together larger than the last-level cache, so each layer's W comes
from DRAM, as in a real model's token step — and through one of them called L times (its W stays in cache
between calls: what the decode rows of bench_layer.py and bench_qlora.py measure). Four sides, every layer called
as a module: lorafuse's bf16 layer (`FusedLinear`, bf16 nn.Linear base, PEFT's default fp32 adapters), PEFT's
LoRA layer on the same bf16 bases, lorafuse's layer on bitsandbytes' NF4 `Linear4bit` (blocks of 64, double
quant, bf16 compute; `FusedLinear4bit`) and PEFT's on its own copies of those (eval mode: bitsandbytes may
repack W for its CPU inference kernel). r 16, alpha 32, bias on, x bf16. Same thread count, one process,
interleaved in rotated order, medians; ms per layer. Rows: 'stack' (the L layers in turn), 'one' (the first,
L times). Ratios: lf bf16 / PEFT bf16 (issue 20: ≤ 0.5) and
lf NF4 / lf bf16 (issue 21: ≤ 0.6), and the lorafuse paths (plans).

    python benchmarks/bench_decode.py [--threads 2] [--rounds 9] [--layers 8] [--quick]
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from bench_qlora import linear4bit
from timing import (Candidate, arguments, begin, interleaved, lora_layer, make_base, make_inputs, max_abs_diff,
                    path_label)

TARGETS = {"lf/peft": 0.5, "q4/lf": 0.6}


def stack_of(layers: Sequence[nn.Module], x: torch.Tensor, calls: Sequence[int]) -> Candidate:
    """A Candidate running x through layers[i] for each i in calls, under no_grad (the layers in eval mode)."""
    def run() -> None:
        for i in calls:
            layers[i](x)
    return Candidate(run, (torch.no_grad,))


def build(k: int, m: int, r: int, layers: int) -> dict[str, list[nn.Module]]:
    """``layers`` distinct layers per side: lf / peft (on shared bf16 bases), q4 / peft+bnb (NF4 copies of them)."""
    sides: dict[str, list[nn.Module]] = {"lf": [], "peft": [], "q4": [], "peft+bnb": []}
    for i in range(layers):
        base32 = make_base(k, m, torch.float32, seed=i)
        base = make_base(k, m, torch.bfloat16, seed=i)
        sides["lf"].append(lora_layer(base, r, "lorafuse", seed=i).eval())
        sides["peft"].append(lora_layer(base, r, "peft", seed=i).eval())
        sides["q4"].append(lora_layer(linear4bit(base32), r, "lorafuse", seed=i).eval())
        sides["peft+bnb"].append(lora_layer(linear4bit(base32), r, "peft", seed=i).eval())
        del base32
    return sides


def check(sides: dict[str, list[nn.Module]], x: torch.Tensor) -> None:
    """Each side's first layer against its reference: lf vs PEFT, q4 vs PEFT + bnb (bf16 bounds)."""
    for a, b in (("lf", "peft"), ("q4", "peft+bnb")):
        with torch.no_grad():
            scale = sides[b][0](x).float().abs().max().item()
        diff = max_abs_diff(sides[a][0], sides[b][0], x)
        assert diff <= 3e-2 * scale, f"{a} vs {b}: max |diff| {diff:.3g} (max |y| {scale:.3g})"


def main() -> None:
    parser = arguments(__doc__, quick="2 layers of 1024², 3 rounds")
    parser.add_argument("--layers", type=int, default=8,
                        help="distinct layers in the stack (default 8: 256 MB of bf16 W)")
    args = parser.parse_args()
    rounds = begin(args, "bench_decode: decode forward through a stack of distinct layers (W from DRAM) and "
                         "through one layer over and over (W in cache)")
    d, layers = (1024, 2) if args.quick else (4096, args.layers)
    sides = build(d, d, 16, layers)
    print(f"# {layers} layers of {d}×{d}: bf16 W {layers * d * d * 2 / 2**20:.0f} MiB in all")
    print(f"\n{'n':>3} {'layers':6s} | {'ms/layer lf / peft / q4 / peft+bnb':>38} | {'lf/peft':>8} {'q4/lf':>7} "
          f"{'q4/peft+bnb':>11} | lorafuse paths (bf16; NF4)")
    for n in (1, 8):
        x, _ = make_inputs(n, d, d, torch.bfloat16)
        check(sides, x)
        for where, calls in (("stack", list(range(layers))), ("one", [0] * layers)):
            grid = {name: stack_of(mods, x, calls) for name, mods in sides.items()}
            t = {name: s / layers for name, s in interleaved(grid, rounds=rounds).items()}
            ms = " ".join(f"{t[s] * 1e3:8.3f}" for s in ("lf", "peft", "q4", "peft+bnb"))
            a, b, c = t["lf"] / t["peft"], t["q4"] / t["lf"], t["q4"] / t["peft+bnb"]
            marks = ["✓" if v <= TARGETS[key] else "✗" for v, key in ((a, "lf/peft"), (b, "q4/lf"))]
            paths = f"{path_label(grid['lf'], sides['lf'])}; {path_label(grid['q4'], sides['q4'])}"
            print(f"{n:3d} {where:6s} | {ms:>38} | {a:7.3f}{marks[0]} {b:6.3f}{marks[1]} {c:11.3f} | {paths}",
                  flush=True)
    print(f"\ntargets: decode forward lf bf16 / PEFT bf16 ≤ {TARGETS['lf/peft']} (issue 20), lf NF4 / lf bf16 ≤ "
          f"{TARGETS['q4/lf']} (issue 21)")


if __name__ == "__main__":
    main()
