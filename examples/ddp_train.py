"""LoRA fine-tuning with lorafuse on several processes: PyTorch DistributedDataParallel (gloo, CPU).

    python examples/ddp_train.py --nproc 2                # DDP, 2 processes, 1 thread each
    python examples/ddp_train.py --nproc 2 --fsdp         # FSDP(use_orig_params=True) instead
    python examples/ddp_train.py --nproc 1                # the same run in one process
    python examples/ddp_train.py --model path/to/local/hf/model   # a pretrained model on disk

The model is a small Llama-architecture causal LM (random weights unless ``--model`` names a
local Hugging Face model directory; nothing is downloaded). LoRA goes on the attention and MLP
projections; the task is next-token prediction on a fixed synthetic corpus (counting sequences
modulo the vocabulary), so the loss visibly falls in a few dozen steps. Every rank trains on its
own shard of each global batch; DDP all-reduces (averages) only the LoRA gradients — the frozen
base weights have ``requires_grad=False`` and never enter DDP's reducer. Only rank 0 writes the
adapter (``save_pretrained(..., is_main_process=rank == 0)``), in PEFT's format.

With the same ``--global-batch`` the multi-process run follows the one-process run step for step
(up to float32 summation order): the printed losses match.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def parse_args(argv: Any = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks), default 2")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--global-batch", type=int, default=16, help="sequences per step over all ranks")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--threads", type=int, default=1, help="torch and lorafuse threads per rank")
    p.add_argument("--model", default=None, help="local Hugging Face model directory (default: tiny random Llama)")
    p.add_argument("--out", default="ddp-adapter", help="adapter directory written by rank 0")
    p.add_argument("--fsdp", action="store_true", help="FullyShardedDataParallel(use_orig_params=True) instead of DDP")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def free_port() -> int:
    """A TCP port picked by the OS (bind to port 0) for the rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(args: argparse.Namespace) -> Any:
    import transformers

    from lorafuse import LoraConfig, get_peft_model

    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)  # every rank builds the same model (DDP also broadcasts rank 0's)
    if args.model:
        base = transformers.AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    else:
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4,
                                       max_position_embeddings=args.seq)
        base = transformers.LlamaForCausalLM(cfg)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(base, config)


def batch(step: int, args: argparse.Namespace, vocab: int) -> torch.Tensor:
    """The global batch of a step: counting sequences with random starts and strides (same on every rank)."""
    g = torch.Generator().manual_seed(10_000 + step)
    start = torch.randint(0, vocab, (args.global_batch, 1), generator=g)
    stride = torch.randint(1, 4, (args.global_batch, 1), generator=g)
    return (start + stride * torch.arange(args.seq)) % vocab


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    import lorafuse

    torch.set_num_threads(args.threads)
    lorafuse.set_num_threads(args.threads)
    distributed = world > 1
    if distributed:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=5))
    model = build_model(args)
    vocab = model.get_base_model().config.vocab_size
    if rank == 0:
        model.print_trainable_parameters()
    if distributed and args.fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    elif distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model)
        frozen_in_reducer = [n for n, p in model.named_parameters()
                             if not p.requires_grad and any(p is q for q in wrapped._build_params_for_reducer()[0])]
        assert not frozen_in_reducer, frozen_in_reducer
    else:
        wrapped = model
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=args.lr)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = batch(step, args, vocab).chunk(world)[rank]  # this rank's shard
        opt.zero_grad(set_to_none=True)
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()  # DDP: LoRA gradients averaged over ranks here
        opt.step()
        if distributed:  # the global loss, for printing
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        if rank == 0 and (step == 1 or step % 10 == 0 or step == args.steps):
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    if distributed and args.fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(wrapped, writeback=False):  # full (unsharded) LoRA tensors on every rank
            model.save_pretrained(args.out, is_main_process=rank == 0)
    else:
        model.save_pretrained(args.out, is_main_process=rank == 0)  # only rank 0 writes
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        print(f"adapter written by rank 0 to {args.out}: {sorted(os.listdir(args.out))}")


def main(argv: Any = None) -> int:
    args = parse_args(argv)
    if args.global_batch % args.nproc:
        sys.exit(f"--global-batch {args.global_batch} must be divisible by --nproc {args.nproc}")
    print(f"{'FSDP' if args.fsdp else 'DDP'} on {args.nproc} process(es), gloo backend, "
          f"{args.threads} thread(s) each, global batch {args.global_batch}")
    if args.nproc == 1:
        worker(0, 1, 0, args)
    else:
        mp.start_processes(worker, args=(args.nproc, free_port(), args), nprocs=args.nproc, join=True,
                           start_method="spawn")
    from lorafuse.io_validate import read_adapter_dir

    files = read_adapter_dir(args.out)
    print(f"reloaded: {files.num_parameters:,d} LoRA parameters in {len(files.tensors)} tensors, "
          f"r={files.config['r']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
