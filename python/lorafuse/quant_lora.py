"""The fused LoRA kernels on a quantized frozen W, as torch sees them: what the 4-bit (`lorafuse.quant`) and 8-bit
(`lorafuse.quant8`) layers share. W is given as its kernel handle (``_C.q4_weight`` / ``_C.q8_weight``: the stored
codes, checked once, read by kernels/cpu/lora_half.c), kept on the weight tensor while it stays the same
(`kept_handle`); `lora_linear_quant` runs ``lora_forward`` and, under autograd, `LoraQuantFunction` whose backward is
``lora_backward`` (dx, dA, dB; W frozen) — or torch math on W dequantized under create_graph.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from .autograd import _differentiable_backward
from .backend import _tensor, cpu_kernels
from .weight_cache import RunTimeCache

__all__ = ["LoraQuantFunction", "kept_handle", "lora_linear_quant", "rank0_adapters"]

_HALF = (torch.bfloat16, torch.float16)


def rank0_adapters(layer: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty adapters A (0, in_features), B (out_features, 0) in ``dtype``, kept on the layer: the fused kernels at
    rank 0 are a quantized layer's own forward (`Linear4bit`, `quant8.Linear8bit`)."""
    kept = layer.__dict__.get("_rank0")
    if kept is None or kept[0].dtype != dtype:
        kept = layer.__dict__["_rank0"] = (torch.zeros(0, layer.in_features, dtype=dtype),
                                           torch.zeros(layer.out_features, 0, dtype=dtype))
    return kept


class _KeptHandle(RunTimeCache):
    """A weight's last kernel handle (`q4_handle`, `q8_handle`) and what it was made from, kept in the weight's
    ``__dict__`` (copies and pickles of the weight get an empty one: a capsule can be neither copied nor
    pickled)."""

    __slots__ = ("key", "handle")

    def __init__(self, key: Any = None, handle: Any = None) -> None:
        self.key, self.handle = key, handle


def kept_handle(weight: torch.Tensor, key: tuple, make: Callable[[], Any]) -> Any:
    """The handle kept on ``weight`` for ``key``, or a new one from ``make()`` kept in its place."""
    kept = weight.__dict__.get("_lorafuse_qhandle")
    if kept is not None and kept.key == key:
        return kept.handle
    handle = make()
    weight.__dict__["_lorafuse_qhandle"] = _KeptHandle(key, handle)
    return handle


class LoraQuantFunction(torch.autograd.Function):
    """The fused LoRA linear on a quantized W given as its kernel handle (`lora_linear_4bit`,
    `lora_linear_8bit`): saves x, u (fp32) and the adapters; ``dequant(dtype)`` gives W for create_graph."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor, lora_b: torch.Tensor,
                dequant: Callable[[torch.dtype], torch.Tensor], handle: Any, cd: torch.dtype, scale: float,
                dropout_p: float, seed: int, kern: Any) -> torch.Tensor:
        """x (..., k) → y (..., m) in x's dtype (cd: the compute dtype W's elements are rounded to)."""
        y, u = kern.lora_forward(x, handle, lora_a, lora_b, scale, bias, dropout_p=dropout_p, seed=seed)
        u = _tensor(u)
        ctx.save_for_backward(x, u, lora_a, lora_b)
        ctx.conf = (dequant, handle, cd, scale, dropout_p, seed, kern)
        return _tensor(y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        """dx, db, dA, dB (None where not needed); W is frozen (quantized storage has no gradient)."""
        x, u, lora_a, lora_b = ctx.saved_tensors
        dequant, handle, cd, scale, dropout_p, seed, kern = ctx.conf
        need_x, need_b, need_a, need_bb = ctx.needs_input_grad[:4]
        dx = dA = dB = None
        if need_x or need_a or need_bb:
            if torch.is_grad_enabled():  # create_graph: torch math on W dequantized, recorded by autograd
                W = dequant(cd).to(x.dtype)
                dx, dA, dB = _differentiable_backward(grad, x, W, lora_a, lora_b, scale, dropout_p, seed, False, need_x)
            else:
                dx, dA, dB = kern.lora_backward(grad, x, u, handle, lora_a, lora_b, scale, need_dx=need_x,
                                                dropout_p=dropout_p, seed=seed)
                dx, dA, dB = (None if dx is None else _tensor(dx)), _tensor(dA), _tensor(dB)
        db = grad.reshape(-1, grad.shape[-1]).sum(0) if need_b else None
        return dx, db, dA if need_a else None, dB if need_bb else None, None, None, None, None, None, None, None


def lora_linear_quant(fname: str, x: torch.Tensor, handle: Callable[[torch.dtype], Any],
                      dequant: Callable[[torch.dtype], torch.Tensor], bias: Optional[torch.Tensor],
                      lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, dropout_p: float, seed: int,
                      cd: Optional[torch.dtype], x_dtypes: str) -> torch.Tensor:
    """y = x·Wᵀ + bias + scale·(x̃·Aᵀ)·Bᵀ on a quantized W (the body of `quant.lora_linear_4bit` /
    `quant8.lora_linear_8bit`): x checked (``x_dtypes``: 'half' or 'half or fp32'; ``fname`` names the caller in
    the TypeError), ``handle(cd)`` W's kernel handle for the compute dtype cd, then the kernels — through
    `LoraQuantFunction` where a gradient is wanted (``dequant(dtype)``: W for create_graph)."""
    allowed = (cd,) if x_dtypes == "half" else (cd, torch.float32)
    if not isinstance(x, torch.Tensor) or not x.is_cpu or cd not in _HALF or x.dtype not in allowed:
        what = type(x).__name__ if not isinstance(x, torch.Tensor) else (x.dtype, x.device.type)
        raise TypeError(f"{fname}: x must be a CPU tensor of the compute dtype (bfloat16 or float16)"
                        f"{'' if x_dtypes == 'half' else ' or float32'}, got {what} with compute dtype {cd}")
    kern = cpu_kernels()
    if kern is None:
        raise RuntimeError(f"{fname}: the C extension lorafuse._C is not built")
    h = handle(cd)
    if not torch.is_grad_enabled() or not (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad
                                           or (bias is not None and bias.requires_grad)):
        y, _ = kern.lora_forward(x, h, lora_a, lora_b, float(scale), bias, dropout_p=float(dropout_p),
                                 seed=int(seed), need_u=False)
        return _tensor(y)
    return LoraQuantFunction.apply(x, bias, lora_a, lora_b, dequant, h, cd, float(scale), float(dropout_p),
                                   int(seed), kern)
