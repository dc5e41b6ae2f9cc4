"""GPU training-step benchmark: a 2-layer Llama-8B-shaped model with LoRA, lorafuse against stock PEFT,
same base weights, same adapter weights, same batch.

Command (full size; about 20-40 s on an H200, most of it imports and model set-up):

    python benchmarks/bench_gpu_train.py --json benchmarks/gpu_train.json

CPU smoke test (tiny model, wall-clock timing; checks the script end to end, measures nothing useful):

    python benchmarks/bench_gpu_train.py --device cpu [--dtype fp32]

Model: ``transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
num_key_value_heads=8, num_hidden_layers=2, vocab_size=128256, max_position_embeddings=4096,
tie_word_embeddings=False)``, ``attn_implementation="sdpa"``, random weights (seeded), built directly on
the device in bf16. It is deep-copied before wrapping, so both models have bit-identical base weights.
LoRA: r = 16, lora_alpha = 32, lora_dropout = 0, on all 7 projections (q, k, v, o, gate, up, down: 14
layers), task_type CAUSAL_LM, PEFT's default adapter dtype (fp32, ``autocast_adapter_dtype=True``;
``--adapter-dtype bf16`` gives both the base dtype). Models:

    peft   ``peft.get_peft_model`` (init_lora_weights=False: A and B random, B ≠ 0)
    ours   ``lorafuse.get_peft_model`` on the copy, every lora_A/lora_B copied from PEFT's

Training step (one batch, fixed: batch 4 × seq 2048 = 8192 tokens of random ids, labels = ids):
``loss = model(input_ids, labels=input_ids, use_cache=False).loss; loss.backward();
AdamW(adapter params, lr 1e-4, foreach default).step(); zero_grad(set_to_none=True)``.

Timing: ``--warmup`` untimed steps per model, then ``--rounds`` rounds in rotating order (round i starts
with model i mod 2), ``--steps`` steps per model per round, each step timed alone between two CUDA events
(CPU: perf_counter); reported: the median over all timed steps of a model.

Printed:
    step ms          median step time (min-max over the timed steps), tokens/s
    ours / peft      median step time ratio                           (issue target: <= 0.85)
    first loss       the loss of each model's first step (identical weights and batch): must agree;
                     relative difference printed (WARNING beyond --tol), and of the last step
    backends         lorafuse layers counted by ``FusedLinear.backend`` (e.g. {'cuda': 14}); anything but
                     'cuda' on a GPU gets a loud WARNING (it is measured anyway) and goes into the JSON
    peak memory      one extra step per model: max_memory_allocated - allocated before it (and the
                     absolute peak, both models resident), MiB

``--json PATH`` writes everything (command, date, device, settings, every step time by round, losses,
ratio, backends, memory), atomically. Exit status: 0 on success (no timing is asserted), 2 when no CUDA
GPU is visible (unless ``--device cpu``), 3 with ``--strict`` when a lorafuse layer is not on the CUDA
path or the first losses disagree beyond --tol.
"""
from __future__ import annotations

import argparse
import collections
import copy
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gpu import (DTYPES, EXIT_NO_GPU, EXIT_STRICT, add_common_args, copy_lora_weights, header,  # noqa: E402
                       interleave_rotating, loud_warning, median_s, peak_extra_mib, resolve_device, synchronize,
                       write_json_atomic)

TARGET_STEP_VS_PEFT = 0.85
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# model size: (GPU default, --device cpu default)
SIZES: dict[str, tuple] = {
    "hidden": (4096, 64), "intermediate": (14336, 160), "heads": (32, 4), "kv_heads": (8, 2), "layers": (2, 2),
    "vocab": (128256, 512), "max_pos": (4096, 128), "batch": (4, 2), "seq": (2048, 32),
}


def build_base_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The random-weight Llama model, built directly on ``device`` in the benchmark's dtype (no fp32
    CPU initialisation), sdpa attention, training mode."""
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, num_hidden_layers=args.layers, vocab_size=args.vocab,
        max_position_embeddings=max(args.max_pos, args.seq), tie_word_embeddings=False, use_cache=False,
        attn_implementation="sdpa")
    torch.manual_seed(args.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[args.dtype])
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.to(device=device, dtype=DTYPES[args.dtype])  # no-op, unless some init ignored the defaults
    model.train()
    return model


def wrap_models(base: nn.Module, args: argparse.Namespace) -> dict[str, nn.Module]:
    """PEFT on ``base``, lorafuse on a deep copy of it (copied before PEFT touches it); ours gets PEFT's
    adapter weights."""
    import peft

    import lorafuse

    twin = copy.deepcopy(base)
    autocast = args.adapter_dtype == "fp32"
    kwargs: dict[str, Any] = {"r": args.rank, "lora_alpha": args.alpha, "lora_dropout": 0.0,
                              "target_modules": list(TARGETS), "init_lora_weights": False, "task_type": "CAUSAL_LM"}
    torch.manual_seed(args.seed + 1)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(**kwargs), autocast_adapter_dtype=autocast)
    ours_model = lorafuse.get_peft_model(twin, lorafuse.LoraConfig(**kwargs), autocast_adapter_dtype=autocast)
    copied = copy_lora_weights(peft_model, ours_model)
    base_p = {n: p for n, p in peft_model.named_parameters() if "lora_" not in n}
    ours_p = {n: p for n, p in ours_model.named_parameters() if "lora_" not in n}
    if set(base_p) != set(ours_p) or not all(torch.equal(p, ours_p[n]) for n, p in base_p.items()):
        raise RuntimeError("the base weights of the two models differ")
    if copied == 0 or all(not p.any() for n, p in ours_model.named_parameters() if "lora_B" in n):
        raise RuntimeError("no adapter weights, or every lora_B is zero")
    peft_model.train()
    ours_model.train()
    return {"peft": peft_model, "ours": ours_model}


def make_step(model: nn.Module, ids: torch.Tensor, losses: list[torch.Tensor]) -> Callable[[], None]:
    """One training step on the fixed batch; the loss is kept (as a tensor, no host sync)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    return step


def backend_counts(model: nn.Module) -> dict[str, int]:
    from lorafuse import FusedLinear

    counts = collections.Counter(m.backend for m in model.modules() if isinstance(m, FusedLinear))
    return dict(sorted(counts.items()))


def _mib(device: torch.device) -> Optional[float]:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, (gpu, cpu) in SIZES.items():
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=None,
                        help=f"default {gpu} (cpu: {cpu})")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    add_common_args(ap, tol=1e-2, tol_help="max relative difference of the first-step losses",
                    strict_help="a layer is not on the CUDA path or the losses disagree")
    args = ap.parse_args(argv)
    if args.alpha is None:
        args.alpha = 2.0 * args.rank
    device = resolve_device(args.device, "bench_gpu_train")
    if device is None:
        return EXIT_NO_GPU
    pick = 0 if device.type == "cuda" else 1
    for name, sizes in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, sizes[pick])
    t_start = time.perf_counter()
    meta = header("lorafuse training-step benchmark: 2-layer Llama-8B-shaped model, LoRA, lorafuse vs PEFT",
                  device, argv)
    import transformers

    meta["transformers"] = transformers.__version__
    tokens = args.batch * args.seq
    print(f"# transformers {transformers.__version__} | hidden {args.hidden}, intermediate {args.intermediate}, "
          f"heads {args.heads}/{args.kv_heads} kv, layers {args.layers}, vocab {args.vocab} | {args.dtype} model, "
          f"adapters {args.adapter_dtype} (autocast_adapter_dtype={args.adapter_dtype == 'fp32'}) | LoRA r "
          f"{args.rank}, alpha {args.alpha:g}, dropout 0, {len(TARGETS)} projections per layer")
    print(f"# batch {args.batch} x seq {args.seq} = {tokens} tokens | step = fwd with labels + backward + AdamW "
          f"(adapters) + zero_grad | {args.warmup} warm-up steps, then median of {args.rounds} rounds x "
          f"{args.steps} steps per model, rotating order", flush=True)

    t0 = time.perf_counter()
    base = build_base_model(args, device)
    attn = getattr(base.config, "_attn_implementation", None)
    n_params = sum(p.numel() for p in base.parameters())
    synchronize(device)
    t_build = time.perf_counter() - t0
    models = wrap_models(base, args)
    del base
    synchronize(device)
    t_setup = time.perf_counter() - t0
    print(f"# built: {n_params / 1e6:.1f} M base parameters per model, attention {attn!r}; model {t_build:.1f} s, "
          f"+ copy and wrapping {t_setup - t_build:.1f} s; resident "
          f"{'n/a' if _mib(device) is None else f'{_mib(device):.0f} MiB'} (both models)")
    if attn != "sdpa":
        print(f"WARNING: attention implementation is {attn!r}, not 'sdpa'")
    n_lora = {name: sum(isinstance(getattr(mod, "lora_A", None), nn.ModuleDict) for mod in m.modules())
              for name, m in models.items()}
    trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()}
    backends = backend_counts(models["ours"])
    print(f"# LoRA layers: peft {n_lora['peft']}, ours {n_lora['ours']}; trainable parameters: peft "
          f"{trainable['peft']:,}, ours {trainable['ours']:,}")
    print(f"kernel path measured (lorafuse layers by FusedLinear.backend): {backends}", flush=True)
    backend_warning = None
    if set(backends) != {"cuda"}:
        backend_warning = (f"lorafuse layers by backend {backends}: not all on 'cuda'; the numbers do NOT measure "
                           f"lorafuse's CUDA kernels alone (dtype {args.dtype}, adapters {args.adapter_dtype})")
        if device.type == "cuda":
            loud_warning([backend_warning])
        else:
            print(f"note (smoke mode): {backend_warning}")

    gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen, device=device)
    losses: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    steps = {name: make_step(m, ids, losses[name]) for name, m in models.items()}
    samples = interleave_rotating(steps, args.rounds, args.steps, device, warmup=args.warmup, per_call=True)
    med = {name: median_s(s) for name, s in samples.items()}
    flat = {name: [v for rnd in s for v in rnd] for name, s in samples.items()}
    mem: dict[str, Any] = {}
    for name, step in steps.items():
        mem[name] = peak_extra_mib(step, device)
    loss_values = {name: [float(v) for v in vals] for name, vals in losses.items()}
    first = {name: vals[0] for name, vals in loss_values.items()}
    last = {name: vals[-1] for name, vals in loss_values.items()}
    rel_first = abs(first["ours"] - first["peft"]) / abs(first["peft"])
    rel_last = abs(last["ours"] - last["peft"]) / abs(last["peft"])
    ratio = med["ours"] / med["peft"]
    met = ratio <= TARGET_STEP_VS_PEFT

    print(f"{'model':>6} | {'step ms':>9} {'(min - max)':>21} | {'tokens/s':>10} | {'first loss':>10} "
          f"{'last loss':>10} | {'peak extra':>10} {'peak abs':>9} MiB")
    for name in models:
        m = mem[name]
        mem_text = f"{m['extra_mib']:10.0f} {m['peak_mib']:9.0f}" if m else f"{'n/a':>10} {'n/a':>9}"
        print(f"{name:>6} | {med[name] * 1e3:9.2f} ({min(flat[name]) * 1e3:8.2f} - {max(flat[name]) * 1e3:8.2f}) | "
              f"{tokens / med[name]:10.0f} | {first[name]:10.5f} {last[name]:10.5f} | {mem_text}")
    print(f"ours / peft training step (median) = {ratio:.3f}   target <= {TARGET_STEP_VS_PEFT:.2f}   "
          f"{'met' if met else 'NOT met'}")
    print(f"first-step loss: peft {first['peft']:.6f}, ours {first['ours']:.6f}, relative difference "
          f"{rel_first:.2e}; after {len(loss_values['ours'])} steps: {rel_last:.2e}")
    problems: list[str] = []
    if not rel_first <= args.tol:
        problems.append(f"first-step losses differ by {rel_first:.3g} (> --tol {args.tol:g})")
        print(f"WARNING: {problems[-1]}")
    wall = time.perf_counter() - t_start
    print(f"wall time: {wall:.1f} s (set-up {t_setup:.1f} s)", flush=True)
    if args.json:
        settings = {name: getattr(args, name) for name in SIZES}
        settings.update(rank=args.rank, alpha=args.alpha, dtype=args.dtype, adapter_dtype=args.adapter_dtype,
                        autocast_adapter_dtype=args.adapter_dtype == "fp32", targets=TARGETS, tokens=tokens,
                        warmup=args.warmup, rounds=args.rounds, steps=args.steps, seed=args.seed, tol=args.tol,
                        attn_implementation=attn, optimizer="torch.optim.AdamW(lr=1e-4)",
                        timing="cuda events per step" if device.type == "cuda" else "perf_counter per step")
        out = dict(meta, benchmark="bench_gpu_train", wall_s=wall, setup_s=t_setup, settings=settings,
                   base_params=n_params, lora_layers=n_lora, trainable_params=trainable,
                   backend_counts=backends, backend_warning=backend_warning, correctness_problems=problems,
                   median_step_ms={name: v * 1e3 for name, v in med.items()},
                   step_ms_by_round={name: [[v * 1e3 for v in rnd] for rnd in s] for name, s in samples.items()},
                   tokens_per_s={name: tokens / v for name, v in med.items()},
                   ratio_ours_vs_peft=ratio, target_ratio=TARGET_STEP_VS_PEFT, target_met=met,
                   losses=loss_values, first_loss_rel_diff=rel_first, last_loss_rel_diff=rel_last,
                   peak_step_mib=mem)
        write_json_atomic(args.json, out)
        print(f"wrote {args.json}")
    if args.strict and (problems or (device.type == "cuda" and backend_warning)):
        return EXIT_STRICT
    return 0


if __name__ == "__main__":
    sys.exit(main())
