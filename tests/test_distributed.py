"""LoRA models under torch.distributed on CPU (gloo): DDP gradients equal a single process.

Two ranks are started with ``torch.multiprocessing.spawn`` (never fork), rendezvous through a
file in the test's temporary directory (no network port), and run with one thread each
(``torch.set_num_threads(1)``, ``lorafuse.set_num_threads(1)``). Each rank trains a tiny
Llama-config model (random weights, LoRA on q/k/v/o and the MLP) for a few SGD steps on its
half of a fixed batch. Checked:

* adapter gradients after DDP's all-reduce are bit-identical on both ranks;
* they equal the gradients of one process on the whole batch, with lorafuse and with stock PEFT (also
  for DoRA adapters, magnitudes included, on the fused DoRA layers):
  in float64 (no fused kernel: PEFT's own forward) to max abs diff < 1e-6, in float32 within fp32
  rounding, every LoRA layer (`lorafuse.FusedLinear`) having run the fused C kernels
  (``lorafuse_path == 'c'``) under DDP and under FSDP;
* DDP's reducer holds exactly the ``requires_grad`` parameters (the LoRA ones): no frozen
  weight is ever bucketed or all-reduced, and frozen weights stay bit-identical to the
  initial ones on every rank;
* only rank 0 writes the adapter (``save_pretrained(..., is_main_process=rank == 0)``: PEFT's saver,
  its files moved into place atomically by lorafuse, no staging folder left), and the file it
  writes holds the trained weights.

FSDP (``use_orig_params=True``) is tried on CPU as well; see README "Distributed training".
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 3
BATCH, SEQ, VOCAB = 4, 8, 64
LR = 0.5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors"]  # what PEFT's saver writes


# --------------------------------------------------------------------------- shared set-up


def build_model(dtype: Any, library: str = "lorafuse", dora: bool = False) -> Any:
    """Tiny Llama with LoRA (DoRA with ``dora``) from ``library``'s ``get_peft_model`` ("lorafuse", or "peft":
    stock PEFT, the parity reference); identical on every process (seeded), B initialised non-zero."""
    import peft

    import lorafuse

    get_peft_model = {"lorafuse": lorafuse.get_peft_model, "peft": peft.get_peft_model}[library]
    torch.manual_seed(1234)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    base = transformers.LlamaForCausalLM(cfg).to(dtype)
    model = get_peft_model(base, lorafuse.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0,
                                                     use_dora=dora))
    with torch.no_grad():  # B = 0 would make every dA zero at step 1: start from a random adapter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return model


def fixed_batch() -> Any:
    g = torch.Generator().manual_seed(99)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def lora_grads(model: Any) -> dict:
    return {n.replace("module.", "", 1): p.grad.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad}


def train(model: Any, ids: Any, steps: int = STEPS) -> list:
    """SGD steps on ids (labels = ids); returns the adapter gradients of every step."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    history = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        history.append(lora_grads(model))
        opt.step()
    return history


_REFERENCE: dict = {}


def reference(dtype: Any, library: str = "lorafuse", dora: bool = False) -> tuple:
    """(gradient history, trained model) of one process on the whole batch (`build_model`'s
    ``library`` and ``dora``); computed once."""
    key = (dtype, library, dora)
    if key not in _REFERENCE:
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            model = build_model(dtype, library, dora)
            _REFERENCE[key] = (train(model, fixed_batch()), model)
        finally:
            torch.set_num_threads(threads)
    return _REFERENCE[key]


def layer_paths(model: Any) -> list:
    """The sorted distinct ``lorafuse_path`` values of ``model``'s LoRA layers: which path ran last."""
    from lorafuse import FusedLinear

    return sorted({str(m.lorafuse_path) for m in model.modules() if isinstance(m, FusedLinear)})


def _record_paths(tmp: str, run: str, rank: int, model: Any) -> None:
    Path(tmp, f"paths_{run}_rank{rank}.json").write_text(json.dumps(layer_paths(model)))


def _one_thread() -> None:
    import lorafuse

    torch.set_num_threads(1)
    lorafuse.set_num_threads(1)


# --------------------------------------------------------------------------- the rank


def _ddp_worker(rank: int, tmp: str) -> None:
    import time
    t0 = time.perf_counter()
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel as DDP

    _one_thread()
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    print(f"rank {rank} up after {time.perf_counter() - t0:.1f}s", flush=True)
    try:
        ids = fixed_batch().chunk(WORLD)[rank]
        for dtype in (torch.float64, torch.float32):
            tag = str(dtype).split(".")[-1]
            model = build_model(dtype)
            frozen0 = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
            ddp = DDP(model)
            # the reducer: exactly the trainable parameters, no frozen weight
            reducer_params, _ = ddp._build_params_for_reducer()  # what DDP's Reducer was built from
            in_reducer = {id(p) for p in reducer_params}
            logged = ddp._get_ddp_logging_data()
            assert logged.get("num_parameter_tensors", len(reducer_params)) == len(reducer_params), logged
            trainable = {id(p) for p in model.parameters() if p.requires_grad}
            frozen_in = sum(1 for p in model.parameters() if not p.requires_grad and id(p) in in_reducer)
            facts = torch.tensor([float(in_reducer == trainable), float(frozen_in), float(len(trainable))],
                                 dtype=torch.float64)
            history = train(ddp, ids)
            _record_paths(tmp, f"ddp_{tag}", rank, model)
            # gradients identical across ranks: gather rank 1's to rank 0
            flat = torch.cat([torch.cat([g.flatten() for _, g in sorted(h.items())]) for h in history])
            gathered = [torch.empty_like(flat) for _ in range(WORLD)]
            dist.all_gather(gathered, flat)
            frozen_same = all(torch.equal(p, frozen0[n]) for n, p in model.named_parameters()
                              if not p.requires_grad)
            facts = torch.cat([facts, torch.tensor([float(torch.equal(gathered[0], gathered[1])),
                                                    float(frozen_same)], dtype=torch.float64)])
            out = os.path.join(tmp, f"out_{tag}", f"rank{rank}")
            model.save_pretrained(out, is_main_process=rank == 0)
            tensors = {f"step{i}/{n}": g.contiguous() for i, h in enumerate(history) for n, g in h.items()}
            tensors["facts"] = facts
            tensors["frozen_checksum"] = torch.stack([p.double().sum() for n, p in model.named_parameters()
                                                      if not p.requires_grad])
            save_file(tensors, os.path.join(tmp, f"grads_{tag}_rank{rank}.safetensors"))
            dist.barrier()
            print(f"rank {rank} {tag} done after {time.perf_counter() - t0:.1f}s", flush=True)
        model = build_model(torch.float32, dora=True)  # DoRA (the magnitudes train too), float32: fused
        history = train(DDP(model), ids)
        _record_paths(tmp, "ddp_dora", rank, model)
        save_file({f"step{i}/{n}": g.contiguous() for i, h in enumerate(history) for n, g in h.items()},
                  os.path.join(tmp, f"grads_dora_rank{rank}.safetensors"))
        for reentrant in (False, True):  # DDP + HF gradient checkpointing, float64, one step
            model = build_model(torch.float64)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
            model.train()
            ddp = DDP(model)
            loss = ddp(input_ids=ids, labels=ids).loss
            loss.backward()
            save_file({n: g.contiguous() for n, g in lora_grads(ddp).items()},
                      os.path.join(tmp, f"ckpt_reentrant{int(reentrant)}_rank{rank}.safetensors"))
        for dtype in (torch.float64, torch.float32):  # float32 last: it fails on both ranks alike (see test)
            tag = str(dtype).split(".")[-1]
            try:
                _fsdp_run(rank, tmp, dtype)
            except Exception as exc:  # recorded; the FSDP test reports it
                Path(tmp, f"fsdp_error_{tag}_rank{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
            print(f"rank {rank} fsdp {tag} done after {time.perf_counter() - t0:.1f}s", flush=True)
        # no collective may still be in flight when the process group goes (a rank that failed
        # above skips this and tears down at once, so that the other one fails fast)
        dist.barrier()
    finally:
        # every wrapper holding the group (DDP, FSDP) gone before the interpreter's teardown:
        # gloo's worker threads otherwise release tensors there (std::terminate, SIGABRT; seen
        # once in a CI run, both ranks, after all their work was done)
        gc.collect()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: Any) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_ddp_worker, args=(str(tmp),), nprocs=WORLD, join=True, start_method="spawn")
    return tmp


def _load(tmp: Path, tag: str, rank: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(tmp / f"grads_{tag}_rank{rank}.safetensors"))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 2e-5)], ids=["float64", "float32"])
def test_ddp_gradients_match_single_process(ddp_run: Path, dtype: Any, tol: float) -> None:
    tag = str(dtype).split(".")[-1]
    ranks = [_load(ddp_run, tag, r) for r in range(WORLD)]
    in_reducer_is_trainable, frozen_in_reducer, n_trainable, ranks_equal, frozen_same = ranks[0]["facts"].tolist()
    assert in_reducer_is_trainable == 1.0, "DDP's reducer does not hold exactly the requires_grad parameters"
    assert frozen_in_reducer == 0.0, "a frozen weight is in DDP's reducer"
    assert n_trainable == 2 * len(TARGETS) * 2  # A and B, 7 targets, 2 layers
    assert ranks_equal == 1.0, "adapter gradients differ between ranks"
    assert frozen_same == 1.0 and ranks[1]["facts"][4] == 1.0, "a frozen weight changed"
    assert torch.equal(ranks[0]["frozen_checksum"], ranks[1]["frozen_checksum"])
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key

    for library in ("lorafuse", "peft"):  # one lorafuse process, and stock PEFT's (parity)
        ref, _ = reference(dtype, library)
        assert sum(len(grads) for grads in ref) == STEPS * n_trainable
        worst = max((ranks[0][f"step{step}/{name}"] - g).abs().max().item()
                    for step, grads in enumerate(ref) for name, g in grads.items())
        print(f"DDP vs single {library} process, {tag}: max |grad diff| = {worst:.3g} over {STEPS} steps")
        assert worst < tol, library


def test_ddp_dora_gradients_match_single_process(ddp_run: Path) -> None:
    """DoRA under DDP (float32, the fused DoRA layers): every gradient — A, B and the magnitudes — the same on
    both ranks and equal to one lorafuse process and to stock PEFT's DoRA on the whole batch."""
    ranks = [_load(ddp_run, "dora", r) for r in range(WORLD)]
    assert any("lora_magnitude_vector" in key for key in ranks[0])
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    for library in ("lorafuse", "peft"):
        ref, _ = reference(torch.float32, library, dora=True)
        assert sum(len(grads) for grads in ref) == len(ranks[0])
        worst = max((ranks[0][f"step{step}/{name}"] - g).abs().max().item() / max(g.abs().max().item(), 1e-6)
                    for step, grads in enumerate(ref) for name, g in grads.items())
        assert worst < 1e-4, (library, worst)


# float64 on the CPU has no fused kernel: PEFT's forward runs (lorafuse_path 'peft')
@pytest.mark.parametrize("run,expected", [("ddp_float32", "c"), ("ddp_dora", "c"), ("fsdp_float32", "c"),
                                          ("ddp_float64", "peft"), ("fsdp_float64", "peft")])
def test_lora_layers_took_the_expected_path(ddp_run: Path, run: str, expected: str) -> None:
    """After training under DDP / FSDP every LoRA layer's last forward, on each rank, took one path:
    the fused C kernels in float32, PEFT's own forward in float64."""
    for rank in range(WORLD):
        assert json.loads((ddp_run / f"paths_{run}_rank{rank}.json").read_text()) == [expected], (run, rank)


@pytest.mark.parametrize("tag", ["float64", "float32"])
def test_only_rank0_writes_the_adapter(ddp_run: Path, tag: str) -> None:
    from lorafuse.io_validate import read_adapter_dir

    out = ddp_run / f"out_{tag}"
    assert sorted(os.listdir(out / "rank0")) == ADAPTER_FILES  # no hidden staging folder left either
    assert not list((out / "rank1").rglob("*")), "rank 1 wrote files"  # PEFT makes the folder, empty
    files = read_adapter_dir(str(out / "rank0"))
    assert files.config["r"] == 4


def test_rank0_adapter_holds_the_trained_weights(ddp_run: Path) -> None:
    from safetensors.torch import load_file

    _, model = reference(torch.float64)
    saved = load_file(str(ddp_run / "out_float64" / "rank0" / "adapter_model.safetensors"))
    live = {n.replace(".default", ""): p for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == set(live)
    worst = max((saved[n] - live[n]).abs().max().item() for n in saved)
    assert worst < 1e-9


# --------------------------------------------------------------------------- FSDP


def _fsdp_run(rank: int, tmp: str, dtype: Any) -> None:
    """Inside the DDP ranks' process group: FSDP with use_orig_params=True, same steps."""
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = build_model(dtype)
    fsdp = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    ids = fixed_batch().chunk(WORLD)[rank]
    opt = torch.optim.SGD([p for p in fsdp.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        fsdp(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    _record_paths(tmp, f"fsdp_{str(dtype).split('.')[-1]}", rank, model)
    with FSDP.summon_full_params(fsdp):
        lora = {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                for n, p in fsdp.named_parameters() if p.requires_grad}
    save_file(lora, os.path.join(tmp, f"fsdp_{str(dtype).split('.')[-1]}_rank{rank}.safetensors"))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_ddp_with_gradient_checkpointing(ddp_run: Path, reentrant: bool) -> None:
    """DDP + Hugging Face gradient checkpointing (float64): first-step adapter gradients equal the
    plain single-process ones on every rank."""
    from safetensors.torch import load_file

    ref, _ = reference(torch.float64)
    for rank in range(WORLD):
        got = load_file(str(ddp_run / f"ckpt_reentrant{int(reentrant)}_rank{rank}.safetensors"))
        assert got.keys() == ref[0].keys()
        worst = max((got[n] - ref[0][n]).abs().max().item() for n in got)
        assert worst < 1e-6, (rank, worst)


def _check_fsdp(ddp_run: Path, dtype: Any, tol: float) -> None:
    from safetensors.torch import load_file

    tag = str(dtype).split(".")[-1]
    err = ddp_run / f"fsdp_error_{tag}_rank0.txt"
    if err.exists():
        pytest.fail(f"FSDP on CPU/gloo, {tag}: {err.read_text()[:500]}")
    _, model = reference(dtype)
    live = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    got = load_file(str(ddp_run / f"fsdp_{tag}_rank0.safetensors"))
    assert got.keys() == load_file(str(ddp_run / f"fsdp_{tag}_rank1.safetensors")).keys()
    assert set(got) == set(live), (sorted(got)[:3], sorted(live)[:3])
    worst = max((got[n] - live[n]).abs().max().item() for n in live)
    print(f"FSDP vs single process, {tag}: max |adapter diff| after {STEPS} steps = {worst:.3g}")
    assert worst < tol


def test_fsdp_use_orig_params_on_cpu(ddp_run: Path) -> None:
    """FSDP (use_orig_params=True: frozen and trainable parameters share flat parameters) trains
    the same adapter as one process on the whole batch (float64: the torch path of the layer)."""
    _check_fsdp(ddp_run, torch.float64, 1e-6)


def test_fsdp_float32_fused_path(ddp_run: Path) -> None:
    _check_fsdp(ddp_run, torch.float32, 2e-5)


def test_example_ddp_train_script(tmp_path: Path) -> None:
    """examples/ddp_train.py --nproc 2 runs end to end (a few steps) and only rank 0's adapter appears."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"
    out = tmp_path / "adapter"
    proc = subprocess.run([sys.executable, str(script), "--nproc", "2", "--steps", "3", "--global-batch", "4",
                           "--seq", "8", "--out", str(out)], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "adapter written by rank 0" in proc.stdout and "step    3" in proc.stdout, proc.stdout
    assert sorted(os.listdir(out)) == ADAPTER_FILES


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", "-s"]))
