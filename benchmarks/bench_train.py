"""Peak RSS and step time of LoRA training, lorafuse vs torch + PEFT, each candidate in its own process.

Default workload (issue 3): a 4-layer Llama-config model (hidden 1024, intermediate 2816,
16 heads, vocab 32000), batch 4 × seq 256, LoRA r=16 on every linear layer but the head
(PEFT's "all-linear"), lora_dropout=0.1, AdamW on the adapter weights, 20 steps, same seed
and thread count in every process. Candidates: "lorafuse" (`lorafuse.get_peft_model`), "lorafuse+pw" (with
the opt-in packed-W cache, `lorafuse.cache_packed_weights`: the memory it costs and the step time it saves),
"lorafuse-nocache" (lorafuse's output cache off, `lorafuse.set_output_cache_limit(0)`: every large kernel
output a fresh allocation, as torch's are) and "peft" (`peft.get_peft_model`).

Method, printed with the results: one fresh process per candidate and repeat, so each peak RSS is that
process's own (`lorafuse.peak_rss`, VmHWM: nothing the parent or another candidate allocated counts);
the step time is the mean over the steps after the first (warm-up); 3 repeats by default, the order of the
candidates rotated from repeat to repeat; peak RSS the minimum and step time the median over repeats. Each
lorafuse row names the path its layers took (`lorafuse_path`: 'c' — the C kernels, with the plan of the last
kernel call of the last step — or 'peft', PEFT's own forward).

--quant nf4: the model saved and loaded back 4-bit by transformers + bitsandbytes (QLoRA's way: NF4, double
quant, bf16 compute, the rest bf16); lorafuse's layers are `lorafuse.qlora.FusedLinear4bit`, PEFT's its
``lora.bnb.Linear4bit`` (issue 21's row: --layers 2 --quant nf4). --kbit: PEFT's prepare_model_for_kbit_training
first (the rest of the model fp32, fp32 activations into the 4-bit layers; its gradient checkpointing left off).

--dtype bf16: the model in bf16 before the adapters are added (PEFT's default keeps them fp32,
``autocast_adapter_dtype=True``, for both libraries). --dtype autocast: the fp32 model, each step's
forward and backward under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (every linear computes in
bf16, PEFT's and lorafuse's layers alike). --compile: every model runs under `torch.compile`
(lorafuse through its custom operators, which do not use the packed-W cache, so there is no
"lorafuse+pw" child) and the first step, which compiles, is left out of the mean.

    python benchmarks/bench_train.py [--repeats 3] [--targets q_proj,v_proj] [--threads N] [--compile]
                                     [--candidates lorafuse,peft]
                                     [--dtype fp32|bf16|autocast] [--quant nf4 [--kbit]]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

IMPLS = ("lorafuse", "lorafuse+pw", "lorafuse-nocache", "peft")
METHOD = ("# method: one fresh process per candidate and repeat; peak RSS = that process's own peak (VmHWM; the "
          "minimum over repeats); step = mean of steps 2.. (the median over repeats); candidates rotated from repeat "
          "to repeat")


def peak_rss_mib() -> float:
    """`lorafuse.peak_rss.peak_rss_mib`, loaded from its file: the PEFT child must not import lorafuse (its
    extension's pages would count in PEFT's peak)."""
    where = importlib.util.find_spec("lorafuse").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("lorafuse_peak_rss", os.path.join(where, "peak_rss.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.peak_rss_mib()


def run_child(args: argparse.Namespace) -> dict:
    """Train in this process with ``args.impl``; returns peak RSS (MiB), step times (s), losses and the path taken."""
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    if args.impl.startswith("lorafuse"):  # the PEFT child does not even import lorafuse
        import lorafuse
        from lorafuse import LoraConfig, get_peft_model

        lorafuse.set_num_threads(args.threads)
        if args.impl == "lorafuse-nocache":
            lorafuse.set_output_cache_limit(0)
    else:
        from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=16,
        max_position_embeddings=args.seq)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    if args.quant:
        model = _quantized(model, transformers, torch)
        if args.kbit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    if args.impl == "lorafuse+pw":
        lorafuse.cache_packed_weights(model)
    model.train()
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))
    rss_before = peak_rss_mib()
    times, losses = [], []

    autocast = args.dtype == "autocast"

    def step() -> None:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = step_model(input_ids=ids, labels=ids).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())

    for _ in range(args.steps - 1):
        step()
    if args.impl == "peft":
        step()
        path = "peft"
    else:
        from lorafuse.bench_cli import path_label

        path = path_label(step, model.modules())  # the last step, its path recorded
    return {"impl": args.impl, "peak_rss_mib": peak_rss_mib(), "rss_before_training_mib": rss_before,
            "step_s": times, "losses": losses, "path": path}


def _quantized(model, transformers, torch):
    """``model`` saved and loaded back by transformers with bitsandbytes' 4-bit config (NF4, double quant, bf16
    compute, bf16 elsewhere): every linear layer but the head a bnb Linear4bit, as QLoRA users load models."""
    import tempfile

    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        del model
        return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config,
                                                                 dtype=torch.bfloat16)


def _spawn(impl: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl] + _forwarded(args)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _forwarded(args: argparse.Namespace) -> list[str]:
    keys = ("steps", "layers", "hidden", "intermediate", "vocab", "seq", "batch", "r", "dropout", "targets",
            "threads", "seed", "dtype")
    return ([item for k in keys for item in (f"--{k}", str(getattr(args, k)))] + (["--compile"] if args.compile else [])
            + (["--quant", args.quant] if args.quant else []) + (["--kbit"] if args.kbit else []))


def _candidates(text: str) -> tuple:
    """--candidates: names from IMPLS, peft one of them, in IMPLS' order."""
    names = set(text.split(","))
    if not names <= set(IMPLS) or "peft" not in names:
        raise argparse.ArgumentTypeError(f"{text!r}: names from {', '.join(IMPLS)}, peft among them")
    return tuple(i for i in IMPLS if i in names)


def build_parser() -> argparse.ArgumentParser:
    """The command line (the parent's, and the children's with --child)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=IMPLS, dest="impl", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--targets", default="all-linear", help='"all-linear" or a comma-separated list')
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each candidate, rotated (default 3)")
    parser.add_argument("--compile", action="store_true", help="train every model under torch.compile")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "autocast"], default="fp32",
                        help="the model's dtype (adapters stay fp32, PEFT's default), or autocast: the fp32 model "
                             "under CPU bf16 autocast (default fp32)")
    parser.add_argument("--quant", choices=["nf4"], help="the model loaded 4-bit by transformers + bitsandbytes "
                        "(NF4, double quant, bf16 compute and bf16 elsewhere; --dtype is then bf16); candidates "
                        "lorafuse (FusedLinear4bit) and peft (PEFT's lora.bnb.Linear4bit)")
    parser.add_argument("--candidates", type=_candidates, default=IMPLS,
                        help=f"comma-separated, peft among them (the ratios are to it); default {','.join(IMPLS)}")
    parser.add_argument("--kbit", action="store_true", help="with --quant: PEFT's prepare_model_for_kbit_training "
                        "first (QLoRA's recipe: the model's other weights in fp32, so the 4-bit layers see fp32 "
                        "activations; without its gradient checkpointing)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.quant:
        args.dtype = "bf16"
    if args.impl:
        print(json.dumps(run_child(args)))
        return

    import torch

    print(f"# {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"torch {torch.__version__}, threads {args.threads}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# {args.layers}-layer Llama h={args.hidden} ff={args.intermediate} vocab={args.vocab}, {args.dtype}, "
          f"batch {args.batch} x seq {args.seq}, r={args.r}, dropout={args.dropout}, targets={args.targets}, "
          f"{args.steps} steps{', torch.compile' if args.compile else ''}, {args.repeats} repeats"
          f"{', base ' + args.quant + ' (bitsandbytes storage)' if args.quant else ''}"
          f"{', prepare_model_for_kbit_training' if args.kbit else ''}")
    print(METHOD)
    impls = tuple(i for i in args.candidates if not (args.compile and i == "lorafuse+pw")
                  and not (args.quant and i in ("lorafuse+pw", "lorafuse-nocache")))
    results: dict[str, list[dict]] = {impl: [] for impl in impls}
    for i in range(args.repeats):  # rotated: each candidate runs first in some repeat
        for impl in impls[i % len(impls):] + impls[:i % len(impls)]:
            results[impl].append(_spawn(impl, args))
    summary = {}
    for impl, runs in results.items():
        peak = min(r["peak_rss_mib"] for r in runs)
        before = min(r["rss_before_training_mib"] for r in runs)
        step = statistics.median(statistics.mean(r["step_s"][1:] or r["step_s"]) for r in runs)
        summary[impl] = (peak, before, step)
        print(f"{impl:16s} peak RSS {peak:8.1f} MiB (before training {before:7.1f} MiB, training adds "
              f"{peak - before:7.1f} MiB)  mean step {step * 1e3:8.1f} ms  loss {runs[0]['losses'][0]:.4f} -> "
              f"{runs[0]['losses'][-1]:.4f}  path {runs[0]['path']}")
    pf_peak, pf_before, pf_step = summary["peft"]
    for impl in impls[:-1]:
        lf_peak, lf_before, lf_step = summary[impl]
        added = f"{(lf_peak - lf_before) / (pf_peak - pf_before):.3f}" if pf_peak > pf_before else "—"  # tiny models
        print(f"ratio {impl}/PEFT: peak RSS {lf_peak / pf_peak:.3f}, training-added RSS {added}, "
              f"step time {lf_step / pf_step:.3f}")


if __name__ == "__main__":
    main()
