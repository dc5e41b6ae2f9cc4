"""One `torch.autograd.Function` for a LoRA linear layer: fused forward, adapter-only backward.

Math (DESIGN.md §1), x (..., k), W (m, k) — or (k, m) with fan_in_fan_out —, A (r, k), B (m, r):

    u  = drop(x) · Aᵀ                    (..., r)   saved for backward
    y  = x · Wᵀ + b + s · u · Bᵀ         (..., m)
    dB = s · gᵀ · u,   dA = s · (g·B)ᵀ · drop(x),   dx = g · W + s · drop'((g·B) · A)

Only x, u and a dropout seed are saved: the dropped input is regenerated from the seed
(`ops.dropout_mask` semantics). The kernels used come from `kernels_for`, the single
dispatch point: `lorafuse.ops` (C) for float32 CPU tensors, `lorafuse.cuda` for CUDA
tensors once that module provides the same entry points, else the pure-torch math below
(any dtype or device; also the float64 reference for `torch.autograd.gradcheck`).
While `torch.compile` traces, the layer and `lora_linear` call the same kernels as the custom
operators of `lorafuse.compiled` instead of this Function (which Dynamo cannot trace).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch.compiler import is_compiling

from .backend import DISPATCH, adapter_backward, base_grads, forward, mask_for, seed_tensor, torch_backward
from .compiled import lora_linear_op
from .weight_cache import PackedWeightCache

__all__ = ["LoraLinearFunction", "lora_linear", "fused_linear"]


class LoraLinearFunction(torch.autograd.Function):
    """``y = base(x) + scale · B(A(drop(x)))`` with W and bias frozen-by-default (gradients only if asked)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, dropout_p: float, seed: int,
                fan_in_fan_out: bool, weight_cache: Optional[PackedWeightCache] = None,
                kern: Any = DISPATCH) -> torch.Tensor:
        """x (..., k) → y (..., m); saves x, u (..., r) and the seed."""
        y, u, kern = forward(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, fan_in_fan_out,
                              weight_cache=weight_cache, kern=kern)
        ctx.save_for_backward(x, u, weight, lora_a, lora_b)
        # the backward runs on the forward's kernels: its grad has y's dtype and device, and
        # skipping a second dispatch matters (each touch of a cold code path costs µs)
        ctx.conf = (scale, dropout_p, seed, fan_in_fan_out, kern, weight_cache)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        """Gradients for x, W, bias, A, B (None where not needed); dW only if W requires grad.

        Under ``create_graph=True`` (grad mode on here) the gradients are computed by the torch
        math below from the saved inputs, u recomputed, so that they are differentiable in turn
        (double backward, as PEFT's modules allow); otherwise on the forward's kernels."""
        x, u, weight, lora_a, lora_b = ctx.saved_tensors
        scale, dropout_p, seed, fifo, kern, weight_cache = ctx.conf
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        create_graph = torch.is_grad_enabled()
        dx = dA = dB = None
        if need_x or need_a or need_bb:
            if create_graph:
                dx, dA, dB = _differentiable_backward(grad, x, weight, lora_a, lora_b, scale, dropout_p, seed, fifo,
                                                      need_x)
            else:
                dx, dA, dB = adapter_backward(grad, x, u, weight, lora_a, lora_b, scale, dropout_p, seed, fifo, need_x,
                                              kern, weight_cache)
        dW, db = base_grads(grad, x if create_graph else x.detach(), fifo, need_w, need_b)
        return (dx, dW, db, dA if need_a else None, dB if need_bb else None, None, None, None, None, None, None)


def _differentiable_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                             lora_b: torch.Tensor, scale: float, dropout_p: float, seed: int, fifo: bool,
                             need_dx: bool) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """`_torch_backward` on the saved tensors themselves (not detached) with u = x̃·Aᵀ recomputed,
    so that autograd records it: dx (x's shape) or None, dA (r, k), dB (m, r)."""
    k, m = x.shape[-1], grad.shape[-1]
    x2 = x.reshape(-1, k)
    xa = x2.to(lora_a.dtype)
    mask = mask_for(xa, dropout_p, seed)
    u = (xa if mask is None else xa * mask) @ lora_a.t()
    dx, dA, dB = torch_backward(grad.reshape(-1, m), x2, u, weight, lora_a, lora_b, scale, mask, fifo, need_dx)
    return None if dx is None else dx.view(x.shape), dA, dB


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, dropout_p: float = 0.0, seed: int = 0,
                fan_in_fan_out: bool = False, weight_cache: Optional[PackedWeightCache] = None) -> torch.Tensor:
    """Functional LoRA linear: x (..., k) → (..., m). See `LoraLinearFunction`.

    When no gradient can flow (grad mode off, or no input requires grad) the kernels are
    called directly, without an autograd node: nothing is saved. ``weight_cache``: keeps W's
    packed panels across calls (`lorafuse.weight_cache`), or None (not used while `torch.compile`
    traces: then the custom operators of `lorafuse.compiled` run).
    """
    if is_compiling():
        return lora_linear_op(x, weight, bias, lora_a, lora_b, float(scale), float(dropout_p),
                              seed_tensor(dropout_p, int(seed)), bool(fan_in_fan_out))
    return fused_linear(x, weight, bias, lora_a, lora_b, float(scale), float(dropout_p), int(seed),
                        bool(fan_in_fan_out), weight_cache, DISPATCH)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scale: float, dropout_p: float, seed: Union[int, torch.Tensor],
                 fan_in_fan_out: bool, weight_cache: Optional[PackedWeightCache], kern: Any) -> torch.Tensor:
    """`lora_linear` for callers that have typed the scalars and may have chosen the kernel module
    (``kern``: a module, None for the torch math, or `DISPATCH`): the layer's per-call path,
    where each cold tensor attribute read costs µs. The adapter's requires_grad is asked first —
    in training it decides alone. A seed *tensor* (`backend.seed_tensor`: what the layer passes
    while `torch.compile` traces) routes to the custom operators of `lorafuse.compiled` instead."""
    if isinstance(seed, torch.Tensor):
        return lora_linear_op(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, fan_in_fan_out)
    if not torch.is_grad_enabled() or not (lora_a.requires_grad or lora_b.requires_grad or x.requires_grad
                                           or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return forward(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, fan_in_fan_out, need_u=False,
                        weight_cache=weight_cache, kern=kern)[0]
    return LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, fan_in_fan_out,
                                    weight_cache, kern)
