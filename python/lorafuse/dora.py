"""DoRA (weight-decomposed LoRA, PEFT's ``use_dora=True``) on the fused kernels, for Linear / Conv1D layers.

PEFT's semantics (``peft/tuners/lora/dora.py``, ``DoraLinearLayer.forward``) with no dropout active, x (..., k),
W (m, k) — (k, m) with fan_in_fan_out —, A (r, k), B (m, r), magnitude μ (m), scale s:

    z     = x·Wᵀ + s·(x·Aᵀ)·Bᵀ                    (..., m)   the fused LoRA kernel, without the bias
    ν_j   = ‖W_j + s·B_j·A‖₂                      (m)        row norms, detached (DoRA §4.3, as PEFT does)
    c     = μ / ν                                  (m)
    y     = c ⊙ z + b                              (..., m)

Backward (the norms get no gradient, so c is a constant for x, A and B):

    g' = g ⊙ c;   dx, dA, dB = the LoRA backward of g';   dμ_j = Σ_i g_ij · z_ij / ν_j;   db = Σ_i g_i

The norms never form the m×k matrix W + s·B·A:

    ν_j² = ‖W_j‖² + 2s·B_j·(A·W_jᵀ) + s²·B_j·(A·Aᵀ)·B_jᵀ

with ‖W_j‖² kept per frozen W (`RowNorms`, invalidated like the packed-W cache) and A·Wᵀ (r, m), A·Aᵀ (r, r)
per training call: 2·r·k·(m + r) flops, r/n of the base GEMM, and one more read of W; for inference (no
gradient recorded, or several forwards between optimizer steps) ν itself is kept while W, A and B are unchanged. Memory beyond LoRA: z (..., m) kept for dμ, and c, ν (m).
With dropout active (training, p > 0) PEFT runs a second base GEMM on the dropped input; that case, like
torch.compile tracing, runs PEFT's own forward (`dora_operands` declines it).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .backend import adapter_backward, base_grads, forward
from .weight_cache import PackedWeightCache

__all__ = ["RowNorms", "row_norms", "dora_linear", "DoraLinearFunction", "dora_operands"]


def _key(t: torch.Tensor) -> tuple:
    """What identifies an unchanged tensor: data pointer, shape, strides, autograd version counter."""
    return (t.data_ptr(), t._version, t.shape, t.stride())


class RowNorms:
    """What one layer keeps of its DoRA norms: ‖W_j‖² (m,) of the frozen base weight, in float64, while W is the
    same unchanged tensor; and ν itself while W, A, B and s are unchanged (inference; several forwards between
    optimizer steps, whose in-place updates bump A's and B's version counters).
    Keys: data pointers, shapes, strides and autograd version counters (in-place writes through ``.data`` are
    not seen: the layer drops everything on merge, unmerge and ``train()``). A weight that requires grad is
    never kept (it changes every step)."""

    __slots__ = ("_key", "_norms", "_nu_key", "_nu")

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self._norms: Optional[torch.Tensor] = None
        self._nu_key: Optional[tuple] = None
        self._nu: Optional[torch.Tensor] = None

    def nu(self, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
           fifo: bool) -> torch.Tensor:
        """`row_norms`, kept while W, A, B and s stay unchanged."""
        if weight.requires_grad or weight.is_inference() or lora_a.is_inference() or lora_b.is_inference():
            return row_norms(weight, lora_a, lora_b, scale, fifo, self)
        key = (_key(weight), _key(lora_a), _key(lora_b), scale, fifo)
        if key != self._nu_key or self._nu is None:
            self._nu = row_norms(weight, lora_a, lora_b, scale, fifo, self)
            self._nu_key = key
        return self._nu

    def get(self, weight_mk: torch.Tensor) -> torch.Tensor:
        """‖W_j‖² for W viewed (m, k)."""
        if weight_mk.requires_grad or weight_mk.is_inference():
            return weight_mk.detach().double().square().sum(1)
        key = _key(weight_mk)
        if key != self._key or self._norms is None:
            self._norms = weight_mk.detach().double().square().sum(1)
            self._key = key
        return self._norms

    def clear(self) -> None:
        self._key = self._norms = self._nu_key = self._nu = None

    def __deepcopy__(self, memo: dict) -> "RowNorms":
        return RowNorms()  # a copied layer has another weight

    def __reduce__(self) -> tuple:
        return (RowNorms, ())


def row_norms(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, fifo: bool,
              norms: Optional[RowNorms] = None) -> torch.Tensor:
    """ν (m) = ‖W_j + s·B_j·A‖₂ in W's dtype, without forming W + s·B·A (see the module docstring); the three
    terms are summed in float64. No autograd graph."""
    with torch.no_grad():
        w_mk = weight.t() if fifo else weight
        wn2 = norms.get(w_mk) if norms is not None else w_mk.detach().double().square().sum(1)
        wa = w_mk @ lora_a.t()                              # (m, r)  W·Aᵀ = (A·Wᵀ)ᵀ: W streamed once by rows
        cross = (lora_b * wa).sum(1)                        # (m)     B_j·(A·W_jᵀ)
        quad = ((lora_b @ (lora_a @ lora_a.t())) * lora_b).sum(1)  # (m)  B_j·(A·Aᵀ)·B_jᵀ
        nu2 = wn2 + (2.0 * scale) * cross.double() + (scale * scale) * quad.double()
        return nu2.clamp_min(0.0).sqrt().to(weight.dtype)


def _norms_of(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, fifo: bool,
              norms: Optional[RowNorms]) -> torch.Tensor:
    """ν from the layer's kept norms (reused while W, A and B are unchanged: inference, gradient accumulation,
    checkpointed recomputation), or computed."""
    return row_norms(weight, lora_a, lora_b, scale, fifo) if norms is None else norms.nu(weight, lora_a, lora_b,
                                                                                         scale, fifo)


class DoraLinearFunction(torch.autograd.Function):
    """y = (μ/ν) ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b, ν detached; saves x, u, z and c."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, magnitude: torch.Tensor, scale: float, fifo: bool, norms: Optional[RowNorms],
                weight_cache: Optional[PackedWeightCache], kern: Any) -> torch.Tensor:
        z, u, kern = forward(x, weight, None, lora_a, lora_b, scale, 0.0, 0, fifo, weight_cache=weight_cache, kern=kern)
        nu = _norms_of(weight, lora_a, lora_b, scale, fifo, norms)
        c = magnitude.detach() / nu
        y = z * c if bias is None else torch.addcmul(bias.detach(), z, c)
        ctx.save_for_backward(x, u, z, weight, lora_a, lora_b, magnitude, c, nu)
        ctx.conf = (scale, fifo, kern, weight_cache, bias is not None)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        """Gradients for x, W, bias, A, B and μ (None where not needed). Under ``create_graph=True`` they
        come from autograd over the torch math (`dora_reference`), so that they are differentiable in turn."""
        x, u, z, weight, lora_a, lora_b, magnitude, c, nu = ctx.saved_tensors
        scale, fifo, kern, weight_cache, has_bias = ctx.conf
        need = ctx.needs_input_grad[:6]
        if torch.is_grad_enabled():
            return _differentiable_backward(grad, x, weight, lora_a, lora_b, magnitude, scale, fifo, has_bias,
                                            need) + (None,) * 5
        m = grad.shape[-1]
        g_scaled = grad * c                                   # g' = g ⊙ c
        dx = dA = dB = None
        if need[0] or need[3] or need[4]:
            dx, dA, dB = adapter_backward(g_scaled, x, u, weight, lora_a, lora_b, scale, 0.0, 0, fifo, need[0], kern,
                                          weight_cache)
        dW, _ = base_grads(g_scaled, x.detach(), fifo, need[1], False)
        _, db = base_grads(grad, x.detach(), fifo, False, need[2])
        dmag = (grad * z).reshape(-1, m).sum(0) / nu if need[5] else None  # dμ_j = Σ_i g_ij z_ij / ν_j
        return (dx, dW, db, dA if need[3] else None, dB if need[4] else None, dmag) + (None,) * 5


def dora_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                   lora_b: torch.Tensor, magnitude: torch.Tensor, scale: float, fifo: bool) -> torch.Tensor:
    """The same layer in plain torch (autograd records it): ν from the explicit W + s·B·A, detached."""
    w_mk = weight.t() if fifo else weight
    nu = torch.linalg.norm(w_mk + scale * (lora_b @ lora_a), dim=1).detach()
    z = x @ w_mk.t() + scale * ((x @ lora_a.t()) @ lora_b.t())
    y = (magnitude / nu) * z
    return y if bias is None else y + bias


def _differentiable_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                             lora_b: torch.Tensor, magnitude: torch.Tensor, scale: float, fifo: bool, has_bias: bool,
                             need: tuple) -> tuple[Optional[torch.Tensor], ...]:
    """The six gradients by autograd over `dora_reference` with create_graph (double backward)."""
    inputs = (x, weight, lora_a, lora_b, magnitude)
    wanted = [t for t, n in zip(inputs, (need[0], need[1], need[3], need[4], need[5])) if n]
    bias_grad = grad.reshape(-1, grad.shape[-1]).sum(0) if has_bias and need[2] else None
    if not wanted:
        return (None, None, bias_grad, None, None, None)
    with torch.enable_grad():
        y = dora_reference(x, weight, None, lora_a, lora_b, magnitude, scale, fifo)
        grads = iter(torch.autograd.grad(y, wanted, grad, create_graph=True))
    dx, dW, dA, dB, dmag = (next(grads) if n else None for n in (need[0], need[1], need[3], need[4], need[5]))
    return (dx, dW, bias_grad, dA, dB, dmag)


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, magnitude: torch.Tensor, scale: float, fifo: bool,
                norms: Optional[RowNorms] = None, weight_cache: Optional[PackedWeightCache] = None,
                kern: Any = None) -> torch.Tensor:
    """The fused DoRA layer: x (..., k) → y (..., m) (module docstring). ``kern``: the kernel module (None:
    the torch math). Without any gradient to record the kernels run directly (the rank-r term may then be
    merged into W's panels: u is not formed)."""
    if not torch.is_grad_enabled() or not (lora_a.requires_grad or lora_b.requires_grad or magnitude.requires_grad
                                           or x.requires_grad or weight.requires_grad
                                           or (bias is not None and bias.requires_grad)):
        z = forward(x, weight, None, lora_a, lora_b, scale, 0.0, 0, fifo, need_u=False, weight_cache=weight_cache,
                    kern=kern)[0]
        c = magnitude / _norms_of(weight, lora_a, lora_b, scale, fifo, norms)
        return z.mul_(c) if bias is None else torch.addcmul(bias, z, c, out=z)  # one pass over z
    return DoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, magnitude, scale, fifo, norms, weight_cache,
                                    kern)


def dora_operands(fused: tuple, magnitude: torch.Tensor, norms: RowNorms) -> Optional[tuple]:
    """`dora_linear`'s arguments from `layers.fused_operands`' tuple for a DoRA adapter, or None where DoRA
    is not fused: dropout active (PEFT then runs a second base GEMM on the dropped input; the layer declines
    that case before the seed is drawn), torch.compile tracing (a seed tensor), anything but the float32 C
    kernels, a magnitude of another dtype."""
    x, weight, bias, lora_a, lora_b, scale, p, seed, fifo, weight_cache, kern = fused
    if p > 0.0 or isinstance(seed, torch.Tensor) or not x.is_cpu or magnitude.dtype != weight.dtype:
        return None
    return (x, weight, bias, lora_a, lora_b, magnitude, scale, fifo, norms, weight_cache, kern)
