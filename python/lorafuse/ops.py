"""Functional LoRA API on float32 arrays — works with NumPy alone (no torch needed).

Shapes (PyTorch conventions): x (..., k), W (m, k) — (k, m) when ``fan_in_fan_out`` —,
A (r, k) = ``lora_A.weight``, B (m, r) = ``lora_B.weight``, bias (m,), scale s = alpha / r.

Inputs may be any float32 ndarray (strided views are read in place) or CPU tensors with
``__dlpack__``; results are NumPy arrays. :func:`lora_forward` and :func:`lora_backward` also take a
bf16 / fp16 base (x, W, g; fp32 or same-dtype adapters): see docs/CONTRACTS.md. All validation happens in the C binding,
which raises ``TypeError``/``ValueError`` naming the argument, what it expected and what it got.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from . import _C

__all__ = ["lora_forward", "lora_backward", "dora_forward", "dora_backward", "dora_grad_scale", "merge", "unmerge",
           "dropout_mask", "sgemm", "hgemm", "pack_weight", "PackedWeight"]


class PackedWeight:
    """A frozen W's GEMM panels, packed once by :func:`pack_weight` for one direction.

    ``nbytes``: memory it holds (about W's size); ``for_backward``: which GEMM it serves.
    It holds no reference to W: it is valid only while W's memory and contents are unchanged.
    """

    __slots__ = ("handle", "nbytes", "for_backward")

    def __init__(self, handle: Any, nbytes: int, for_backward: bool) -> None:
        self.handle, self.nbytes, self.for_backward = handle, nbytes, for_backward

    def __repr__(self) -> str:
        return f"PackedWeight(nbytes={self.nbytes}, for_backward={self.for_backward})"


def _handle(packed_w: PackedWeight) -> Any:
    """The C handle of a pack (callers pass None through without calling this)."""
    if isinstance(packed_w, PackedWeight):
        return packed_w.handle
    raise TypeError(f"packed_w must be a lorafuse.ops.PackedWeight or None, got {type(packed_w).__name__}")


def pack_weight(W: Any, *, fan_in_fan_out: bool = False, for_backward: bool = False) -> PackedWeight:
    """W (m, k) — (k, m) with ``fan_in_fan_out`` — packed into the panels that
    :func:`lora_forward` (or, with ``for_backward``, the dx GEMM of :func:`lora_backward`) would
    pack on every call. Passing it as ``packed_w`` skips that packing; results are bit-identical.
    Costs about W's size in memory; the caller must repack after changing W.
    """
    handle, nbytes = _C.pack_weight(W, fan_in_fan_out, for_backward)
    return PackedWeight(handle, nbytes, for_backward)


def lora_forward(x: Any, W: Any, A: Any, B: Any, scale: float, bias: Any = None, *,
                 out: Optional[np.ndarray] = None, u_out: Optional[np.ndarray] = None,
                 dropout_p: float = 0.0, seed: int = 0, fan_in_fan_out: bool = False,
                 need_u: bool = True, packed_w: Optional[PackedWeight] = None,
                 plan: Optional[Tuple[str, str]] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Fused LoRA forward in one pass over y.

    u = x̃·Aᵀ (..., r) and y = x·Wᵀ + bias + scale·u·Bᵀ (..., m), computed as one GEMM over
    the augmented K: y = [x | scale·u]·[W | B]ᵀ + bias. x̃ = x ⊙ mask / (1 - dropout_p) with
    the mask of :func:`dropout_mask` (the base path always sees x). Returns ``(y, u)``; keep
    ``u`` for :func:`lora_backward`. With ``need_u=False`` (inference) returns ``(y, None)``
    and may compute y as x·(W + scale·B·A)ᵀ + bias, the rank-r term added to W's packed panels
    on the fly (never to W itself), when that is fewer flops (few outputs m, many tokens).
    ``packed_w``: ``pack_weight(W, fan_in_fan_out=...)`` of this very W, or None.
    ``plan``: ``(u_path, y_path)`` to run instead of the kernels' own choice (names as
    ``_C.last_forward_plan()`` reports them; ValueError if these operands do not suit it), or None.
    A bf16 / fp16 x and W (torch tensors, or float16 arrays) run the half-precision kernels: y in x's
    dtype (bfloat16 as uint16 bits), rounded once after the fp32 sum; u float32 (docs/CONTRACTS.md).
    W may be a 4-bit weight's handle (``_C.q4_weight``, `lorafuse.quant.q4_handle`): its codes are read by
    the kernels; x then of the handle's dtype, or float32 with float32 adapters (docs/CONTRACTS.md).
    """
    return _C.lora_forward(x, W, A, B, scale, bias, out, u_out, dropout_p, seed, fan_in_fan_out, need_u,
                           None if packed_w is None else _handle(packed_w), plan)


def lora_backward(g: Any, x: Any, u: Any, W: Any, A: Any, B: Any, scale: float, *,
                  need_dx: bool = True, dropout_p: float = 0.0, seed: int = 0,
                  fan_in_fan_out: bool = False, dx_out: Optional[np.ndarray] = None,
                  dA_out: Optional[np.ndarray] = None, dB_out: Optional[np.ndarray] = None,
                  packed_w: Optional[PackedWeight] = None, plan: Optional[Tuple[str, str, str]] = None
                  ) -> Tuple[Optional[np.ndarray], np.ndarray, np.ndarray]:
    """Adapter-only gradients for g = ∂L/∂y (..., m); dW is never formed.

    v = g·B (n, r);  dB = scale·gᵀ·u (m, r);  dA = scale·vᵀ·x̃ (r, k);
    dx = g·W + scale·drop'(v·A) (..., k), or ``None`` when ``need_dx`` is false.
    ``dropout_p`` and ``seed`` must be the forward's: the mask is regenerated, not stored.
    ``packed_w``: ``pack_weight(W, fan_in_fan_out=..., for_backward=True)`` of this W, or None.
    ``plan``: ``(v_dB_path, dA_path, dx_path)`` to run instead of the kernels' choice, or None.
    """
    return _C.lora_backward(g, x, u, W, A, B, scale, need_dx, dropout_p, seed, fan_in_fan_out,
                            dx_out, dA_out, dB_out, None if packed_w is None else _handle(packed_w), plan)


def dora_forward(x: Any, W: Any, A: Any, B: Any, scale: float, col_scale: Any, bias: Any = None, *,
                 fan_in_fan_out: bool = False, need_z: bool = True, plan: Optional[Tuple[str, str]] = None
                 ) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """DoRA's fused forward on a bf16 / fp16 base with float32 adapters (PEFT's default; `lorafuse.dora`).

    z = round(x·Wᵀ) + scale·u·Bᵀ (..., m) float32 — the base product rounded to W's dtype alone, as PEFT's
    base layer rounds it —, u = x·Aᵀ (..., r) float32, y = round(bias + col_scale ⊙ z) (..., m) in x's dtype,
    col_scale (m,) float32 = μ/ν (the magnitude over the row norms of W + scale·B·A). No dropout. Returns
    ``(y, u, z)``, or ``(y, None, None)`` with ``need_z=False`` (nothing kept for :func:`dora_backward`).
    ``plan``: as :func:`lora_forward`'s ('split' or 'decode' for y).
    """
    return _C.dora_forward(x, W, A, B, scale, col_scale, bias, fan_in_fan_out, need_z, plan)


def dora_backward(g: Any, x: Any, u: Any, z: Any, W: Any, A: Any, B: Any, scale: float, col_scale: Any, *,
                  need_dx: bool = True, need_dc: bool = True, fan_in_fan_out: bool = False,
                  plan: Optional[Tuple[str, str, str]] = None
                  ) -> Tuple[Optional[np.ndarray], np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """:func:`dora_forward`'s adapter-only backward for g = ∂L/∂y (..., m), on g' = g ⊙ col_scale.

    v = g'·B;  dB = scale·g'ᵀ·u (m, r);  dA = scale·vᵀ·x (r, k);  dx = round(round(g')·W) + scale·v·A rounded
    to x's dtype (..., k), or ``None`` without ``need_dx``; dc = Σ_i g ⊙ z (m,) float32 (DoRA's magnitude
    gradient is dc / ν), or ``None`` without ``need_dc`` (z is then not read). ``plan``: as
    :func:`lora_backward`'s ('masked' for dx).
    """
    return _C.dora_backward(g, x, u, z, W, A, B, scale, col_scale, need_dx, need_dc, fan_in_fan_out, plan)


def dora_grad_scale(g: Any, col_scale: Any, z: Any = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The float32 DoRA layer's pass over g = ∂L/∂y (..., m): ``(g ⊙ col_scale, Σ_i g ⊙ z)`` — g' (g's shape),
    the gradient the LoRA backward then runs on, and dc (m,) (DoRA's magnitude gradient is dc / ν), or None for
    ``z=None`` — in one read of g and z (z̃ (..., m), the forward's sum before the column scale).
    """
    return _C.dora_grad_scale(g, col_scale, z)


def merge(W: np.ndarray, A: Any, B: Any, scale: float, *, fan_in_fan_out: bool = False) -> None:
    """In place: W (m, k) += scale·B·A; with ``fan_in_fan_out`` W is (k, m) and gets (B·A)ᵀ."""
    _C.merge(W, A, B, scale, fan_in_fan_out)


def unmerge(W: np.ndarray, A: Any, B: Any, scale: float, *, fan_in_fan_out: bool = False) -> None:
    """In place: W −= scale·B·A — the inverse of :func:`merge` up to fp32 rounding."""
    _C.merge(W, A, B, -scale, fan_in_fan_out)


def dropout_mask(n: int, k: int, p: float, seed: int) -> np.ndarray:
    """The (n, k) dropout multiplier the kernels use: 0 or 1/(1-p), a pure function of
    (seed, i·k + j), so it does not depend on threads or tiling."""
    return _C.dropout(np.ones((n, k), dtype=np.float32), p, seed)


def sgemm(a: Any, b: Any, alpha: float = 1.0, bias: Any = None,
          out: Optional[np.ndarray] = None) -> np.ndarray:
    """c (M, N) = alpha·a (M, K)·b (K, N) + bias: lorafuse's packed GEMM core on its own."""
    return _C.sgemm(a, b, alpha, bias, out)


def hgemm(a: Any, b: Any, alpha: float = 1.0, bias: Any = None, out: Optional[np.ndarray] = None,
          beta: float = 0.0) -> np.ndarray:
    """c (M, N) float32 = beta·out + alpha·a (M, K)·b (K, N) (+ bias (N,) float32 when beta == 0).

    a and b are each float32, float16 or bfloat16 — CPU torch tensors (any of the three), or NumPy
    float32 / float16 arrays — with any strides (transposed and strided views are read in place);
    products are exact and accumulated in fp32. Two bf16 operands with alpha == 1 on the
    ``avx512_bf16`` ISA run AVX512-BF16's vdpbf16ps on bf16 K-pairs, on the ``amx_bf16`` ISA AMX's
    tdpbf16ps on 16×16 tiles (both read bf16 denormals as 0 and flush denormal partial sums:
    tests/tolerances.py); everything else widens the half operands to fp32 while packing and runs
    the fp32 micro-kernels. On ``avx512_bf16``, 16-256 rows of a times a large column-contiguous b
    (b = Wᵀ, W ≥ 2M elements) run transposed, W's rows read in place — the same bits.
    ``_C.hgemm_path(a, b, alpha)`` says which: (path, a's dtype, b's dtype, orientation 'a_rows' or
    'w_rows'). ``beta`` is 0 or 1; beta=1 adds into ``out`` (required, no bias). ``out``: a
    C-contiguous float32 (M, N) array or tensor that overlaps no input. Returns c, a NumPy array
    (viewing ``out``'s memory when given).
    """
    return _C.hgemm(a, b, alpha, bias, out, beta)
