"""DoRA (weight-decomposed LoRA, PEFT's ``use_dora=True``) on the fused kernels, for Linear / Conv1D layers.

PEFT's semantics (``peft/tuners/lora/dora.py``, ``DoraLinearLayer.forward``), x (..., k), W (m, k) — (k, m) with
fan_in_fan_out —, A (r, k), B (m, r), magnitude μ (m), scale s, x̃ = x ⊙ mask (dropout; x̃ = x without):

    ν_j   = ‖W_j + s·B_j·A‖₂                      (m)        row norms, detached (DoRA §4.3, as PEFT does)
    c     = μ / ν                                  (m)
    y     = x·Wᵀ + b + (c − 1) ⊙ (x̃·Wᵀ) + c ⊙ s·(x̃·Aᵀ)·Bᵀ
          = D + b + c ⊙ z̃,   z̃ = x̃·Wᵀ + s·(x̃·Aᵀ)·Bᵀ (the fused LoRA kernel on x̃),   D = (x − x̃)·Wᵀ

Without dropout D = 0 and z̃ = z is one fused call; with it D is a second GEMM (PEFT also runs the base GEMM
twice), on the temporary x − x̃. Backward (the norms get no gradient, so c is a constant for x, A and B):

    g' = g ⊙ c;   dA, dB, and dx₁ = g'·W + s·mask ⊙ ((g'·B)·A): the LoRA backward kernel on g' (x̃ regenerated)
    dx = dx₁ + (1 − mask) ⊙ ((g − g')·W)  (the D term; without dropout dx = dx₁)
    dμ_j = Σ_i g_ij · z̃_ij / ν_j;   db = Σ_i g_i

The norms never form the m×k matrix W + s·B·A:

    ν_j² = ‖W_j‖² + 2s·B_j·(A·W_jᵀ) + s²·B_j·(A·Aᵀ)·B_jᵀ

with ‖W_j‖² kept per frozen W (`RowNorms`, invalidated like the packed-W cache) and W·Aᵀ (m, r), A·Aᵀ (r, r)
whenever A or B changed: 2·r·k·(m + r) flops, r/n of the base GEMM, and one more read of W; ν itself is kept
while W, A and B are unchanged (inference, several forwards between optimizer steps). Memory beyond LoRA: z̃
(..., m) kept for dμ, and c, ν (m); never an m×k temporary. The mask is lorafuse's seeded hash (as for LoRA:
statistically, not bitwise, PEFT's torch dropout). While torch.compile traces, `dora_linear_op` runs z̃ on the
`lorafuse::lora_forward` operator and the rest in traceable torch ops, x̃ from the `lorafuse::dropout_mask`
operator. A bf16 / fp16 base with PEFT's fp32 adapters: `DoraHalfFunction` (eager, CPU). On CUDA, adapters and
magnitude of W's dtype: `DoraLinearFunction` with z̃ and the adapter backward on the CUDA LoRA plan (eager).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.lora.variants import DoraLinearVariant

from .backend import _tensor, adapter_backward, base_grads, dropout_mask, forward, mask_for
from .half_weight import DenseHalfW, HalfW, squared_row_norms, tensor_key
from .weight_cache import PackedWeightCache, RunTimeCache

__all__ = ["RowNorms", "row_norms", "half_row_norms", "dora_linear", "dora_linear_half", "dora_linear_op",
           "DoraLinearFunction", "DoraHalfFunction", "dora_operands", "dora_magnitude", "kept_row_norms",
           "forget_row_norms", "ROW_NORMS_ATTR"]

ROW_NORMS_ATTR = "_dora_row_norms"  # where a fused layer keeps its RowNorms: a run-time attribute, not state


class RowNorms(RunTimeCache):
    """What one layer keeps of its DoRA norms: ‖W_j‖² (m,) of the frozen base weight, in float64, while W is the
    same unchanged tensor; and ν itself while W, A, B and s are unchanged (inference; several forwards between
    optimizer steps, whose in-place updates bump A's and B's version counters).
    Keys: data pointers, shapes, strides and autograd version counters (in-place writes through ``.data`` are
    not seen: the layer drops everything on merge and unmerge, PEFT's own ``.data`` writes; a 4-bit W's key also
    holds its quant state's identity, which PEFT's merge replaces). A weight that requires grad is never kept (it
    changes every step)."""

    __slots__ = ("_key", "_norms", "_nu_key", "_nu")

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self._norms: Optional[torch.Tensor] = None
        self._nu_key: Optional[tuple] = None
        self._nu: Optional[torch.Tensor] = None

    def nu(self, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
           fifo: bool) -> torch.Tensor:
        """`row_norms`, kept while W, A, B and s stay unchanged."""
        wkey = None if weight.requires_grad or weight.is_inference() else tensor_key(weight)
        return self._kept_nu(wkey, lora_a, lora_b, (scale, fifo),
                             lambda: row_norms(weight, lora_a, lora_b, scale, fifo, self))

    def nu_half(self, base: HalfW, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
        """`half_row_norms`, kept while W, A, B and s stay unchanged."""
        return self._kept_nu(base.key(), lora_a, lora_b, scale, lambda: half_row_norms(base, lora_a, lora_b, scale,
                                                                                       self))

    def _kept_nu(self, wkey: Optional[tuple], lora_a: torch.Tensor, lora_b: torch.Tensor, conf: Any,
                 compute: Any) -> torch.Tensor:
        if wkey is None or lora_a.is_inference() or lora_b.is_inference():
            return compute()
        key = (wkey, tensor_key(lora_a), tensor_key(lora_b), conf)
        if key != self._nu_key or self._nu is None:
            self._nu = compute()
            self._nu_key = key
        return self._nu

    def get(self, weight_mk: torch.Tensor) -> torch.Tensor:
        """‖W_j‖² for W viewed (m, k)."""
        key = None if weight_mk.requires_grad or weight_mk.is_inference() else tensor_key(weight_mk)
        return self._kept_squares(key, lambda: squared_row_norms(weight_mk))

    def squares_of(self, base: HalfW) -> torch.Tensor:
        """‖W_j‖² of a half-path base weight (`HalfW.squares`)."""
        return self._kept_squares(base.key(), base.squares)

    def _kept_squares(self, key: Optional[tuple], compute: Any) -> torch.Tensor:
        if key is None:
            return compute()
        if key != self._key or self._norms is None:
            self._norms = compute()
            self._key = key
        return self._norms


def dora_magnitude(layer: Any, name: str) -> Optional[torch.Tensor]:
    """The magnitude μ (out,) of adapter ``name`` of a PEFT LoRA layer if its variant is DoRA (PEFT's
    ``DoraLinearVariant``), else None."""
    if type(getattr(layer, "lora_variant", {}).get(name)) is not DoraLinearVariant:
        return None
    return layer._modules["lora_magnitude_vector"]._modules[name]._parameters["weight"]


def kept_row_norms(layer: Any) -> RowNorms:
    """The `RowNorms` a fused layer keeps for its DoRA adapters, made on first use (in the instance dict: a
    run-time attribute, dropped on deepcopy and pickling)."""
    norms = layer.__dict__.get(ROW_NORMS_ATTR)
    if norms is None:
        norms = layer.__dict__[ROW_NORMS_ATTR] = RowNorms()
    return norms


def forget_row_norms(layer: Any) -> None:
    """Drop what a layer keeps of its W's norms (W is about to change: merge, unmerge)."""
    layer.__dict__.pop(ROW_NORMS_ATTR, None)


def _nu_from(wn2: torch.Tensor, wa: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             scale: float) -> torch.Tensor:
    """ν (m) float64 = sqrt(‖W_j‖² + 2s·B_j·(A·W_jᵀ) + s²·B_j·(A·Aᵀ)·B_jᵀ) from wn2 = ‖W_j‖² (m) and
    wa = W·Aᵀ (m, r)."""
    cross = (lora_b * wa).sum(1)                                # (m)  B_j·(A·W_jᵀ)
    quad = ((lora_b @ (lora_a @ lora_a.t())) * lora_b).sum(1)   # (m)  B_j·(A·Aᵀ)·B_jᵀ
    nu2 = wn2 + (2.0 * scale) * cross.double() + (scale * scale) * quad.double()
    return nu2.clamp_min(0.0).sqrt()


def row_norms(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, fifo: bool,
              norms: Optional[RowNorms] = None) -> torch.Tensor:
    """ν (m) = ‖W_j + s·B_j·A‖₂ in W's dtype — in float32 for float32 adapters on a bf16 / fp16 W (PEFT's default,
    where PEFT widens W and takes the norm in float32) —, without forming W + s·B·A (see the module docstring);
    the three terms are summed in float64. No autograd graph."""
    with torch.no_grad():
        w_mk = weight.t() if fifo else weight
        wn2 = norms.get(w_mk) if norms is not None else squared_row_norms(w_mk)
        if w_mk.dtype == lora_a.dtype:
            wa = w_mk @ lora_a.t()                          # (m, r)  W·Aᵀ = (A·Wᵀ)ᵀ: W streamed once by rows
        else:  # a half W: the kernels' GEMM widens it exactly while packing, no float32 copy of W
            wa = DenseHalfW(w_mk, False).norm_product(lora_a)
        nu = _nu_from(wn2, wa, lora_a, lora_b, scale)
        return nu.to(weight.dtype if w_mk.dtype == lora_a.dtype else lora_a.dtype)


def half_row_norms(base: HalfW, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                   norms: Optional[RowNorms] = None) -> torch.Tensor:
    """ν (m) float32 (the adapters' dtype) = ‖W_j + s·B_j·A‖₂ of a half-path base weight (`HalfW`: its squares and
    W·Aᵀ as PEFT's norm reads W), as `row_norms`. No autograd graph."""
    with torch.no_grad():
        wn2 = norms.squares_of(base) if norms is not None else base.squares()
        return _nu_from(wn2, base.norm_product(lora_a), lora_a.detach(), lora_b.detach(), scale).to(lora_a.dtype)


def _norms_of(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, fifo: bool,
              norms: Optional[RowNorms]) -> torch.Tensor:
    """ν from the layer's kept norms (reused while W, A and B are unchanged: inference, gradient accumulation,
    checkpointed recomputation), or computed."""
    return row_norms(weight, lora_a, lora_b, scale, fifo) if norms is None else norms.nu(weight, lora_a, lora_b,
                                                                                         scale, fifo)


def _dropped_forward(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                     dropout_p: float, seed: int, fifo: bool, need_u: bool, weight_cache: Optional[PackedWeightCache],
                     kern: Any) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Any]:
    """(z̃, D, u, kern): z̃ = x̃·Wᵀ + s·(x̃·Aᵀ)·Bᵀ on the fused kernel, D = (x − x̃)·Wᵀ (None without dropout:
    z̃ = z, D = 0), u = x̃·Aᵀ; x̃ = x ⊙ mask with the kernels' mask (`backend.mask_for`), a temporary."""
    if dropout_p == 0.0:
        z, u, kern = forward(x, weight, None, lora_a, lora_b, scale, 0.0, 0, fifo, need_u=need_u,
                             weight_cache=weight_cache, kern=kern)
        return z, None, u, kern
    k = x.shape[-1]
    x2 = x.detach().reshape(-1, k)
    rest = mask_for(x2, dropout_p, seed)                      # the mask, then 1 − mask ...
    x_drop = x2 * rest                                        # x̃
    z, u, kern = forward(x_drop, weight, None, lora_a, lora_b, scale, 0.0, 0, fifo, need_u=need_u,
                         weight_cache=weight_cache, kern=kern)
    rest.neg_().add_(1.0).mul_(x2)                            # ... then x − x̃ = x ⊙ (1 − mask)
    d = _base_product(rest, (weight if fifo else weight.t()).detach(), kern)  # D = (x − x̃)·Wᵀ
    return z.view(*x.shape[:-1], -1), d.view(*x.shape[:-1], -1), None if u is None else u.view(*x.shape[:-1], -1), kern


class DoraLinearFunction(torch.autograd.Function):
    """y = D + b + c ⊙ z̃ (module docstring), c = μ/ν with ν detached; saves x, u, z̃, c and ν."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, magnitude: torch.Tensor, scale: float, dropout_p: float, seed: int, fifo: bool,
                norms: Optional[RowNorms], weight_cache: Optional[PackedWeightCache], kern: Any) -> torch.Tensor:
        z, d, u, kern = _dropped_forward(x, weight, lora_a, lora_b, scale, dropout_p, seed, fifo, True, weight_cache,
                                         kern)
        nu = _norms_of(weight, lora_a, lora_b, scale, fifo, norms)
        c = magnitude.detach() / nu
        y = _combine(z, d, bias, c)
        ctx.save_for_backward(x, u, z, weight, lora_a, lora_b, magnitude, c, nu)
        ctx.conf = (scale, dropout_p, seed, fifo, kern, weight_cache, bias is not None)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        """Gradients for x, W, bias, A, B and μ (None where not needed); W's only without dropout. Under
        ``create_graph=True`` they come from autograd over the torch math (`dora_reference`), so that they are
        differentiable in turn.

            g' = g ⊙ c;  dA, dB and dx₁ = g'·W + s·mask ⊙ ((g'·B)·A) from the LoRA backward kernel (x̃ regenerated);
            dx = dx₁ + (1 − mask) ⊙ (g·W − g'·W)  — the (x − x̃)·Wᵀ term; no dropout: dx = dx₁
            dμ_j = Σ_i g_ij z̃_ij / ν_j,   db = Σ_i g_i"""
        x, u, z, weight, lora_a, lora_b, magnitude, c, nu = ctx.saved_tensors
        scale, p, seed, fifo, kern, weight_cache, has_bias = ctx.conf
        need = ctx.needs_input_grad[:6]
        if torch.is_grad_enabled():
            return _differentiable_backward(grad, x, weight, lora_a, lora_b, magnitude, scale, p, seed, fifo, has_bias,
                                            need) + (None,) * 7
        m = grad.shape[-1]
        g_scaled, dc = _scaled_grad(grad, c, z, need[5], kern)  # g' = g ⊙ c, dc_j = Σ_i g_ij z̃_ij
        dx = dA = dB = None
        if need[0] or need[3] or need[4]:
            dx, dA, dB = adapter_backward(g_scaled, x, u, weight, lora_a, lora_b, scale, p, seed, fifo, need[0], kern,
                                          weight_cache)
        if dx is not None and p > 0.0:
            k = x.shape[-1]
            keep = mask_for(x.detach().reshape(-1, k), p, seed)
            w = (weight.t() if fifo else weight).detach()
            h = _base_product((grad - g_scaled).reshape(-1, m), w, kern)  # (g − g')·W
            dx = dx.reshape(-1, k).addcmul_(keep.neg_().add_(1.0), h).view(x.shape)      # + (1 − mask) ⊙ h
        dW = _weight_grad(grad, g_scaled, x, p, seed, fifo) if need[1] else None
        _, db = base_grads(grad, x.detach(), fifo, False, need[2])
        dmag = dc / nu if need[5] else None                    # dμ_j = Σ_i g_ij z̃_ij / ν_j
        return (dx, dW, db, dA if need[3] else None, dB if need[4] else None, dmag) + (None,) * 7


def _scaled_grad(grad: torch.Tensor, c: torch.Tensor, z: torch.Tensor, need_dc: bool,
                 kern: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(g' = g ⊙ c (grad's shape), dc = Σ_i g ⊙ z̃ (m) or None): a float32 g on the C kernels in one pass over g
    and z̃ (`ops.dora_grad_scale`), else torch ops (CUDA, a bf16 / fp16 layer, the torch math)."""
    if kern is not None and grad.dtype == torch.float32 and grad.is_cpu:
        g_scaled, dc = kern.dora_grad_scale(grad, c, z if need_dc else None)
        return _tensor(g_scaled), None if dc is None else _tensor(dc)
    return grad * c, (grad * z).reshape(-1, grad.shape[-1]).sum(0) if need_dc else None


def _base_product(a: torch.Tensor, w: torch.Tensor, kern: Any) -> torch.Tensor:
    """a (n, q) · w (q, p), the dropout path's second product with W (D = (x − x̃)·Wᵀ, or (g − g')·W): on the C
    kernels' GEMM (`ops.sgemm`: 1.1–1.2× MKL's throughput here, RESULTS.md) for float32 CPU tensors, else torch."""
    if kern is not None and a.dtype == w.dtype == torch.float32 and a.is_cpu:
        return _tensor(kern.sgemm(a, w))
    return a @ w


def _weight_grad(grad: torch.Tensor, g_scaled: torch.Tensor, x: torch.Tensor, dropout_p: float, seed: int,
                 fifo: bool) -> torch.Tensor:
    """dW (W's layout) when the base weight trains: g'ᵀ·x̃ + gᵀ·(x − x̃) (g'ᵀ·x without dropout)."""
    if dropout_p == 0.0:
        return base_grads(g_scaled, x.detach(), fifo, True, False)[0]
    k, m = x.shape[-1], grad.shape[-1]
    x2, g2 = x.detach().reshape(-1, k), grad.reshape(-1, m)
    x_drop = x2 * mask_for(x2, dropout_p, seed)
    dw = g_scaled.reshape(-1, m).t() @ x_drop + g2.t() @ (x2 - x_drop)
    return dw.t() if fifo else dw


def _combine(z: torch.Tensor, d: Optional[torch.Tensor], bias: Optional[torch.Tensor], c: torch.Tensor,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = D + b + c ⊙ z̃ (D None: 0) in one pass over z̃, into ``out``: None (a new tensor), z̃ itself (no gradient
    to keep it for) or a half tensor (DoRA on a half base: torch sums in float32 and rounds once into it)."""
    base = d if bias is None else (bias.detach() if d is None else d.add_(bias.detach()))
    return torch.mul(z, c, out=out) if base is None else torch.addcmul(base, z, c, out=out)


def dora_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                   lora_b: torch.Tensor, magnitude: torch.Tensor, scale: float, fifo: bool,
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The same layer in plain torch (autograd records it), PEFT's formula: ν from the explicit W + s·B·A,
    detached; with a dropout mask (x's shape) y = x·Wᵀ + b + (c − 1)⊙(x̃·Wᵀ) + c⊙s·(x̃·Aᵀ)·Bᵀ, x̃ = x ⊙ mask."""
    w_mk = weight.t() if fifo else weight
    nu = torch.linalg.norm(w_mk + scale * (lora_b @ lora_a), dim=1).detach()
    c = magnitude / nu
    x_drop = x if mask is None else x * mask
    base = x_drop @ w_mk.t()
    y = c * (base + scale * ((x_drop @ lora_a.t()) @ lora_b.t()))
    if mask is not None:
        y = y + (x - x_drop) @ w_mk.t()
    return y if bias is None else y + bias


def _differentiable_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                             lora_b: torch.Tensor, magnitude: torch.Tensor, scale: float, dropout_p: float, seed: int,
                             fifo: bool, has_bias: bool, need: tuple) -> tuple[Optional[torch.Tensor], ...]:
    """The six gradients by autograd over `dora_reference` with create_graph (double backward)."""
    inputs = (x, weight, lora_a, lora_b, magnitude)
    wanted = [t for t, n in zip(inputs, (need[0], need[1], need[3], need[4], need[5])) if n]
    bias_grad = grad.reshape(-1, grad.shape[-1]).sum(0) if has_bias and need[2] else None
    if not wanted:
        return (None, None, bias_grad, None, None, None)
    k = x.shape[-1]
    mask = mask_for(x.detach().reshape(-1, k), dropout_p, seed)
    with torch.enable_grad():
        y = dora_reference(x, weight, None, lora_a, lora_b, magnitude, scale, fifo,
                           None if mask is None else mask.view(x.shape))
        grads = iter(torch.autograd.grad(y, wanted, grad, create_graph=True))
    dx, dW, dA, dB, dmag = (next(grads) if n else None for n in (need[0], need[1], need[3], need[4], need[5]))
    return (dx, dW, bias_grad, dA, dB, dmag)


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, magnitude: torch.Tensor, scale: float, dropout_p: float, seed: int, fifo: bool,
                norms: Optional[RowNorms] = None, weight_cache: Optional[PackedWeightCache] = None,
                kern: Any = None) -> torch.Tensor:
    """The fused DoRA layer: x (..., k) → y (..., m) (module docstring); ``seed``: the dropout mask's (p > 0).
    ``kern``: the kernel module (None: the torch math). Without any gradient to record the kernels run directly
    (without dropout the rank-r term may then be merged into W's panels: u is not formed)."""
    if not torch.is_grad_enabled() or not (lora_a.requires_grad or lora_b.requires_grad or magnitude.requires_grad
                                           or x.requires_grad or weight.requires_grad
                                           or (bias is not None and bias.requires_grad)):
        z, d, _, _ = _dropped_forward(x, weight, lora_a, lora_b, scale, dropout_p, seed, fifo, False, weight_cache,
                                      kern)
        return _combine(z, d, bias, magnitude / _norms_of(weight, lora_a, lora_b, scale, fifo, norms), out=z)
    return DoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed, fifo, norms,
                                    weight_cache, kern)


def dora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                   lora_b: torch.Tensor, magnitude: torch.Tensor, scale: float, dropout_p: float, seed: torch.Tensor,
                   fifo: bool) -> torch.Tensor:
    """The fused DoRA layer while torch.compile traces: z̃ from the `lorafuse::lora_forward` operator on x̃ (its
    autograd formula gives dx̃, dA, dB for g' = ∂L/∂z̃), then y = D + (μ/ν) ⊙ z̃ + b in traceable torch ops —
    autograd gives g' = g ⊙ c, dμ = Σ g ⊙ z̃ / ν and dx = mask ⊙ dx̃ + (1 − mask) ⊙ g·W, exactly the eager
    backward. With dropout x̃ = x ⊙ mask (`lorafuse::dropout_mask`, the kernels' mask for the traced seed) and
    D = (x − x̃)·Wᵀ by ``F.linear``; without, x̃ = x and D = 0. ν is computed each call (no kept norms: Dynamo
    cannot watch version counters)."""
    need_u = torch.is_grad_enabled() and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad)
    x_drop, d = x, None
    if dropout_p > 0.0:
        k = x.shape[-1]
        mask = torch.ops.lorafuse.dropout_mask(x.numel() // k, k, dropout_p, seed, x.dtype).view(x.shape)
        x_drop = x * mask
        d = torch.nn.functional.linear(x - x_drop, weight.t() if fifo else weight)
    z = torch.ops.lorafuse.lora_forward(x_drop, weight, None, lora_a, lora_b, scale, 0.0, seed, fifo, need_u)[0]
    y = z * (magnitude / row_norms(weight, lora_a, lora_b, scale, fifo))
    y = y if d is None else y + d
    return y if bias is None else y + bias


class DoraHalfFunction(torch.autograd.Function):
    """DoRA on a bf16 / fp16 base — a dense W or a 4-bit one (`half_weight.HalfW`) — with float32 adapters and
    magnitude (PEFT's default). PEFT casts x to the adapters' float32 and adds its float32 DoRA term to the base
    layer's half result; here z̃ = round_h(x̃·Wᵀ) + s·(x̃·Aᵀ)·Bᵀ in float32 (W never widened) and y = round_h(D + b +
    c ⊙ z̃) with c = μ/ν (ν float32, detached) — the base product rounded once before the DoRA scale as PEFT's is,
    the sum once after. Without dropout (x̃ = x, D = 0) all of it is the kernels' `dora_forward` on x as it is,
    the scale and bias applied as y is rounded; with dropout two GEMMs on the half tiles (x·Wᵀ and (x ⊙ m)·Wᵀ, m
    the kept elements: PEFT too runs its base twice) give z̃ on x̃ = x ⊙ m/(1 − p) and D = (x − x̃)·Wᵀ (`_half_dora`).
    Backward: g' = g ⊙ c; dA, dB and dx̃ = round_h(round_h(g')·W) + s·(g'·B)·A (the base layer's half gradient,
    PEFT's own rounding) — `dora_backward` without dropout, which also sums dμ in the same pass over g; with
    dropout the mixed backward on x̃ and dx = mask ⊙ dx̃ + (1 − mask) ⊙ g·W; dx in x's dtype, dμ_j = Σ_i g_ij z̃_ij
    / ν_j. Saves x, u, z̃, μ, c, ν; x̃ is regenerated from the seed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, base: HalfW, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, magnitude: torch.Tensor, scale: float, dropout_p: float, seed: int,
                norms: Optional[RowNorms], kern: Any) -> torch.Tensor:
        nu = _half_norms_of(base, lora_a, lora_b, scale, norms)
        c = magnitude.detach() / nu
        y, u, z = _half_dora(x, base, bias, lora_a, lora_b, c, scale, dropout_p, seed, True, kern)
        ctx.save_for_backward(x, u, z, lora_a, lora_b, magnitude, c, nu)
        ctx.base = base
        ctx.conf = (scale, dropout_p, seed, kern, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        """Gradients for x, bias, A, B and μ (W frozen: a half base layer's weight is not trained here). Under
        ``create_graph=True`` autograd over the torch math (`dora_reference` on W widened: an m×k temporary)."""
        x, u, z, lora_a, lora_b, magnitude, c, nu = ctx.saved_tensors
        base = ctx.base
        scale, p, seed, kern, bias_dtype = ctx.conf
        need_x, _, need_b, need_a, need_bb, need_mag = ctx.needs_input_grad[:6]
        if torch.is_grad_enabled():
            dx, _, db, dA, dB, dmag = _differentiable_backward(
                grad.float(), x.float(), base.dense().float(), lora_a, lora_b, magnitude, scale, p, seed, False,
                bias_dtype is not None, (need_x, False, need_b, need_a, need_bb, need_mag))
        elif p == 0.0:
            dx, dA, dB, dc = (None if t is None else _tensor(t) for t in kern.dora_backward(
                grad, x.detach(), u, z, base.kern, lora_a.detach(), lora_b.detach(), scale, c,
                need_dx=need_x, need_dc=need_mag, fan_in_fan_out=base.fifo))
            db = grad.reshape(-1, grad.shape[-1]).sum(0) if need_b else None
            dmag = dc / nu if need_mag else None
        else:
            k, m = x.shape[-1], grad.shape[-1]
            g2 = grad.reshape(-1, m)
            g_scaled = g2 * c.view(1, -1)  # float32: torch promotes the half g and widens it on the fly
            x2 = x.float().reshape(-1, k)
            mask = mask_for(x2, p, seed)
            dx = dA = dB = None
            if need_x or need_a or need_bb:
                dx, dA, dB = (None if t is None else _tensor(t) for t in kern.lora_backward(
                    g_scaled, x2 * mask, u.reshape(-1, u.shape[-1]), base.kern, lora_a.detach(), lora_b.detach(),
                    scale, need_dx=need_x, fan_in_fan_out=base.fifo))
            if dx is not None:  # dx = mask ⊙ dx̃ + (1 − mask) ⊙ g·W
                dx = dx.mul_(mask).add_(mask.neg_().add_(1.0).mul_(base.product(g2)))  # half g, W: exact products
            db = grad.reshape(-1, m).sum(0) if need_b else None
            dmag = (g2 * z.reshape(-1, m)).sum(0) / nu if need_mag else None
        return (None if dx is None else dx.view(x.shape).to(x.dtype), None, None if db is None else db.to(bias_dtype),
                dA, dB, dmag) + (None,) * 5


def _half_norms_of(base: HalfW, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                   norms: Optional[RowNorms]) -> torch.Tensor:
    """ν of a half-path base from the layer's kept norms, or computed (as `_norms_of`)."""
    return half_row_norms(base, lora_a, lora_b, scale) if norms is None else norms.nu_half(base, lora_a, lora_b,
                                                                                           scale)


def _half_dora(x: torch.Tensor, base: HalfW, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
               lora_b: torch.Tensor, c: torch.Tensor, scale: float, dropout_p: float, seed: int, need_saved: bool,
               kern: Any) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(y, u, z̃): y (..., m) in x's dtype, u (..., r) and z̃ (..., m) float32 — None unless ``need_saved`` (a
    backward to come) — of `DoraHalfFunction`, c (m) = μ/ν. Without dropout the kernels' `dora_forward`. With
    it, x̃ = x ⊙ m / (1 − p) (m the kept elements): two GEMMs on operands the half tiles take exactly, as PEFT
    runs its base twice — P₁ = x·Wᵀ, P₂ = (x ⊙ m)·Wᵀ —, u = x̃·Aᵀ, z̃ = P₂/(1 − p) + s·u·Bᵀ (PEFT's x̃·Wᵀ unrounded),
    D = (x − x̃)·Wᵀ = P₁ − P₂/(1 − p), y = round(D + b + c ⊙ z̃)."""
    x, lora_a, lora_b = x.detach(), lora_a.detach(), lora_b.detach()
    if dropout_p == 0.0:
        y, u, z = kern.dora_forward(x, base.kern, lora_a, lora_b, scale, c, None if bias is None else bias.detach(),
                                    fan_in_fan_out=base.fifo, need_z=need_saved)
        return _tensor(y), None if u is None else _tensor(u), None if z is None else _tensor(z)
    k, inv = x.shape[-1], 1.0 / (1.0 - dropout_p)
    x2 = x.reshape(-1, k)
    mask = dropout_mask(*x2.shape, dropout_p, seed, dtype=torch.float32, device=x.device)  # 0 or 1/(1 − p)
    p2 = base.t_product(x2 * (mask != 0))                   # (x ⊙ m)·Wᵀ: x ⊙ m is exact in x's dtype
    u = (x2 * mask) @ lora_a.t()                            # x̃·Aᵀ (n, r): x promoted to float32 in the product
    z = torch.addmm(p2, u, lora_b.t(), beta=inv, alpha=scale)   # z̃ = P₂/(1 − p) + s·u·Bᵀ
    d = base.t_product(x2).sub_(p2, alpha=inv)              # D = P₁ − P₂/(1 − p)
    z = z.view(*x.shape[:-1], -1)
    y = _combine(z, d.view(*x.shape[:-1], -1), bias, c, out=torch.empty(z.shape, dtype=x.dtype))
    return y, u.view(*x.shape[:-1], -1) if need_saved else None, z if need_saved else None


def dora_linear_half(x: torch.Tensor, base: HalfW, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                     lora_b: torch.Tensor, magnitude: torch.Tensor, scale: float, dropout_p: float, seed: int,
                     norms: Optional[RowNorms] = None, kern: Any = None) -> torch.Tensor:
    """The fused DoRA layer on a bf16 / fp16 base — dense or 4-bit, ``base`` (`half_weight.HalfW`) — with float32
    adapters and magnitude (`DoraHalfFunction`); x (..., k) in the base's dtype → y (..., m) in it; ``seed``: the
    dropout mask's (p > 0)."""
    if not torch.is_grad_enabled() or not (lora_a.requires_grad or lora_b.requires_grad or magnitude.requires_grad
                                           or x.requires_grad or (bias is not None and bias.requires_grad)):
        c = magnitude / _half_norms_of(base, lora_a, lora_b, scale, norms)
        return _half_dora(x, base, bias, lora_a, lora_b, c, scale, dropout_p, seed, False, kern)[0]
    return DoraHalfFunction.apply(x, base, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed, norms, kern)


def dora_operands(fused: tuple, magnitude: torch.Tensor, norms: RowNorms) -> Optional[tuple]:
    """(`dora_linear`, `dora_linear_half` or `dora_linear_op`, its arguments) from `layers.fused_operands`' tuple
    for a DoRA adapter, or None where DoRA is not fused: a magnitude of another dtype than W's — but float32 on
    a half W with float32 adapters (PEFT's default), fused on the CPU by `dora_linear_half` outside torch.compile,
    for x of W's dtype and a frozen W. On CUDA `dora_linear` in eager mode, for adapters and magnitude of W's
    dtype: z̃ on the CUDA LoRA plan (`lorafuse.cuda`, which `backend.forward` picks for CUDA tensors), ν, c ⊙ z̃,
    g ⊙ c and dμ in torch ops on the GPU — never W + s·B·A (PEFT's DoRA forms it, m×k, every forward)."""
    x, weight, bias, lora_a, lora_b, scale, p, seed, fifo, weight_cache, kern = fused
    on_cpu = x.is_cpu
    if on_cpu and weight.dtype in (torch.bfloat16, torch.float16) and lora_a.dtype == magnitude.dtype == torch.float32:
        if isinstance(seed, torch.Tensor) or x.dtype != weight.dtype or weight.requires_grad:
            return None
        return dora_linear_half, (x, DenseHalfW(weight, fifo), bias, lora_a, lora_b, magnitude, scale, p, seed, norms,
                                  kern)
    if magnitude.dtype != weight.dtype or (not on_cpu and lora_a.dtype != weight.dtype):
        return None
    if isinstance(seed, torch.Tensor):  # torch.compile is tracing: the operators on the CPU, PEFT's DoRA on CUDA
        return (dora_linear_op, (x, weight, bias, lora_a, lora_b, magnitude, scale, p, seed, fifo)) if on_cpu else None
    return dora_linear, (x, weight, bias, lora_a, lora_b, magnitude, scale, p, seed, fifo, norms, weight_cache, kern)
