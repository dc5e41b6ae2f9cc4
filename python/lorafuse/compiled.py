"""The LoRA linear as torch custom operators, the path that `torch.compile` traces.

Eager calls go through `autograd.LoraLinearFunction`, whose forward hands tensors to the C
kernels through DLPack and NumPy — code Dynamo cannot trace, so a compiled model would break its
graph at every LoRA layer. While compiling, the layer and `autograd.lora_linear` call `lora_linear_op`
instead: the same kernels behind two opaque operators with shape functions and an autograd
formula, so `torch.compile(model, fullgraph=True)` works and Inductor calls the kernels as it
would any extern kernel.

    torch.ops.lorafuse.lora_forward(x, W, bias, A, B, scale, p, seed, fan_in_fan_out, need_u)
        -> y (..., m), u (..., r)    (u: shape (0,) when need_u is False)
    torch.ops.lorafuse.lora_backward(g, x, u, W, A, B, scale, p, seed, fan_in_fan_out, need_dx)
        -> dx (x's shape; (0,) when need_dx is False), dA (r, k), dB (m, r)
    torch.ops.lorafuse.dropout_mask(n, k, p, seed, dtype) -> the (n, k) dropout multiplier (DoRA's x̃)

The dropout seed is a one-element int64 tensor (an int would be read with `.item()`, a graph
break): drawn by `torch.randint` in the traced graph, read inside the operators. dW and the bias
gradient, when the base layer is trained, are plain torch math in the autograd formula. Not
available on this path: the packed-W cache (`set_packed_weight_cache`), and double backward
(the backward operator has no derivative of its own — eager mode supports it).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .backend import adapter_backward, base_grads, dropout_mask, forward, kernels_for

__all__ = ["lora_linear_op"]


def _seed_value(seed: Tensor) -> int:
    """The int in a one-element integer seed tensor; TypeError / ValueError naming it otherwise."""
    if seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
        raise TypeError(f"lorafuse: seed must be an integer tensor (see seed_tensor), got dtype {seed.dtype}")
    if seed.numel() != 1:
        raise ValueError(f"lorafuse: seed must hold one value, got shape {tuple(seed.shape)}")
    return int(seed.item())


def _out_features(weight: Tensor, fan_in_fan_out: bool) -> int:
    return weight.shape[1] if fan_in_fan_out else weight.shape[0]


@torch.library.custom_op("lorafuse::lora_forward", mutates_args=())
def _lora_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, scale: float,
                  dropout_p: float, seed: Tensor, fan_in_fan_out: bool, need_u: bool) -> tuple[Tensor, Tensor]:
    """x (..., k) → y (..., m), u (..., r) on the kernels `backend.kernels_for` picks."""
    y, u, _ = forward(x, weight, bias, lora_a, lora_b, scale, dropout_p, _seed_value(seed), fan_in_fan_out,
                       need_u=need_u)
    return y, (u if u is not None else x.new_empty(0))


@_lora_forward.register_fake
def _lora_forward_shapes(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                         scale: float, dropout_p: float, seed: Tensor, fan_in_fan_out: bool,
                         need_u: bool) -> tuple[Tensor, Tensor]:
    lead = x.shape[:-1]
    y = x.new_empty(*lead, _out_features(weight, fan_in_fan_out))
    # u: the adapters' dtype, at least float32 on the CPU (the C kernels keep u in fp32)
    udt = torch.promote_types(lora_a.dtype, torch.float32) if x.is_cpu else lora_a.dtype
    u = x.new_empty((*lead, lora_a.shape[0]), dtype=udt)
    return y, (u if need_u else x.new_empty(0))


@torch.library.custom_op("lorafuse::lora_backward", mutates_args=())
def _lora_backward(grad: Tensor, x: Tensor, u: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
                   dropout_p: float, seed: Tensor, fan_in_fan_out: bool,
                   need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """grad (..., m) → dx (x's shape, or (0,)), dA (r, k), dB (m, r); dW is never formed."""
    kern = kernels_for(grad, x, weight, lora_a, lora_b)  # u: the forward's, of whatever dtype it gave
    dx, dA, dB = adapter_backward(grad, x, u, weight, lora_a, lora_b, scale, dropout_p, _seed_value(seed),
                                  fan_in_fan_out, need_dx, kern)
    return (dx if dx is not None else x.new_empty(0)), dA, dB


@_lora_backward.register_fake
def _lora_backward_shapes(grad: Tensor, x: Tensor, u: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                          scale: float, dropout_p: float, seed: Tensor, fan_in_fan_out: bool,
                          need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, _bias, lora_a, lora_b, scale, dropout_p, seed, fan_in_fan_out, _need_u = inputs
    ctx.save_for_backward(x, output[1], weight, lora_a, lora_b, seed)
    ctx.conf = (scale, dropout_p, fan_in_fan_out)


def _backward(ctx: Any, grad: Tensor, _grad_u: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """Gradients for (x, W, bias, A, B); the scalars and the seed get None."""
    x, u, weight, lora_a, lora_b, seed = ctx.saved_tensors
    scale, dropout_p, fifo = ctx.conf
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    dx = dA = dB = None
    if need_x or need_a or need_bb:
        dx, dA, dB = torch.ops.lorafuse.lora_backward(grad, x, u, weight, lora_a, lora_b, scale, dropout_p, seed,
                                                      fifo, need_x)
    dW, db = base_grads(grad, x, fifo, need_w, need_b)
    return (dx if need_x else None, dW, db, dA if need_a else None, dB if need_bb else None,
            None, None, None, None, None)


_lora_forward.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("lorafuse::dropout_mask", mutates_args=())
def _dropout_mask(n: int, k: int, dropout_p: float, seed: Tensor, dtype: torch.dtype) -> Tensor:
    """The kernels' dropout multiplier (n, k) of 0 or 1/(1-p) for ``seed`` (`backend.dropout_mask`), in dtype:
    what DoRA with dropout needs of x̃ outside the LoRA kernel while torch.compile traces."""
    return dropout_mask(n, k, dropout_p, _seed_value(seed), dtype=dtype, device=seed.device)


@_dropout_mask.register_fake
def _dropout_mask_shape(n: int, k: int, dropout_p: float, seed: Tensor, dtype: torch.dtype) -> Tensor:
    return seed.new_empty((n, k), dtype=dtype)


def lora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, scale: float,
                   dropout_p: float, seed: Tensor, fan_in_fan_out: bool) -> Tensor:
    """`autograd.lora_linear` through the operators: x (..., k) → y (..., m); ``seed`` from
    `seed_tensor`. u is kept only when a gradient can flow."""
    need_u = torch.is_grad_enabled() and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad)
    return torch.ops.lorafuse.lora_forward(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, fan_in_fan_out,
                                           need_u)[0]
