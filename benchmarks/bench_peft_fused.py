"""lorafuse inside PEFT: PEFT's own LoRA layer made a `lorafuse.FusedLinear` (`fuse_peft_model`, what
`patch_peft()` builds) vs the same stock PEFT `lora.Linear` vs lorafuse's own `LoraLinear` vs torch
`F.linear` (the frozen base alone). fp32 CPU, the same W, b, A, B on every side, the same thread
count, one process, interleaved, medians (`timing.interleaved`); forward under no_grad, and
forward+backward with x requiring grad (dx computed, W frozen).

    python benchmarks/bench_peft_fused.py [--threads 2] [--rounds 9] [--quick]
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from bench_layer import fwd_bwd, make_layers
from timing import header, interleaved, set_threads

SHAPES = [(8, 576, 576, 16), (512, 576, 576, 16), (512, 1024, 1024, 16), (512, 576, 1536, 16),
          (1024, 4096, 4096, 16)]  # (n tokens, k in, m out, r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="the first two shapes, 3 rounds")
    args = ap.parse_args()
    set_threads(args.threads)
    import lorafuse

    header("bench_peft_fused: FusedLinear (PEFT's layer, fused) vs PEFT lora.Linear vs lorafuse LoraLinear "
           "vs F.linear (fp32)", args.threads)
    rounds = 3 if args.quick else args.rounds
    print(f"\n{'n':>5} {'k':>6} {'m':>6} {'r':>3} | {'fwd ms fused/peft/lf/base':>31} | {'fused/peft':>10} "
          f"{'fused/lf':>8} | {'f+b ms fused/peft/lf':>23} | {'fused/peft':>10} {'fused/lf':>8}")
    for n, k, m, r in SHAPES[:2] if args.quick else SHAPES:
        lf, _, pf, base = make_layers(k, m, r)
        fused = copy.deepcopy(pf)
        assert lorafuse.fuse_peft_model(fused) == 1
        x, g = torch.randn(n, k), torch.randn(n, m)
        W, b = base.weight.detach(), base.bias.detach()
        with torch.no_grad():
            torch.testing.assert_close(fused(x), pf(x), rtol=1e-4, atol=1e-4)
            assert fused.lorafuse_path == "fused"
            tf = interleaved({"fused": lambda: fused(x), "peft": lambda: pf(x), "lf": lambda: lf(x),
                              "base": lambda: F.linear(x, W, b)}, rounds=rounds)
        tb = interleaved({"fused": fwd_bwd(fused, x, g), "peft": fwd_bwd(pf, x, g), "lf": fwd_bwd(lf, x, g)},
                         rounds=rounds)
        print(f"{n:5d} {k:6d} {m:6d} {r:3d} | {tf['fused'] * 1e3:7.3f} {tf['peft'] * 1e3:7.3f} {tf['lf'] * 1e3:7.3f} "
              f"{tf['base'] * 1e3:7.3f} | {tf['fused'] / tf['peft']:10.3f} {tf['fused'] / tf['lf']:8.3f} | "
              f"{tb['fused'] * 1e3:7.2f} {tb['peft'] * 1e3:7.2f} {tb['lf'] * 1e3:7.2f} | "
              f"{tb['fused'] / tb['peft']:10.3f} {tb['fused'] / tb['lf']:8.3f}", flush=True)
    print("\nfused/peft: FusedLinear's time over stock PEFT's; fused/lf: over lorafuse's own LoraLinear")


if __name__ == "__main__":
    main()
