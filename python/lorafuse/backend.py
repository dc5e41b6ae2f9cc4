"""The kernel dispatch and the math around it, below autograd: which kernel module runs a LoRA linear
(`kernels_for`), the forward and adapter-only backward on that module or in torch, the dropout seeds.

Math (DESIGN.md §1), x (..., k), W (m, k) — or (k, m) with fan_in_fan_out —, A (r, k), B (m, r):

    u  = drop(x) · Aᵀ                    (..., r)
    y  = x · Wᵀ + b + s · u · Bᵀ         (..., m)
    dB = s · gᵀ · u,   dA = s · (g·B)ᵀ · drop(x),   dx = g · W + s · drop'((g·B) · A)

The data path runs one way: the layer (`lorafuse.layers`) → `lorafuse.autograd` (eager) or
`lorafuse.compiled` (torch.compile) → this module → `lorafuse.ops` / `lorafuse.cuda` → `_C` / `_C_cuda`.
Kernel modules: `lorafuse.ops` (C) for float32 CPU tensors, `lorafuse.cuda` for CUDA tensors, else the
pure-torch math below (any dtype or device; also the float64 reference for `torch.autograd.gradcheck`).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Optional

import torch
from torch import Tensor

from .cuda import adapter_dtypes_fuse
from .weight_cache import PackedWeightCache

__all__ = ["KERNEL_DTYPES", "cpu_adapter_dtypes_fuse", "kernels_for", "cpu_kernels", "backend_name", "forward",
           "adapter_backward", "base_grads", "torch_backward", "mask_for", "dropout_mask", "draw_seed",
           "draw_seed_tensor", "seed_tensor", "DISPATCH"]

_SEED_HIGH = 2**31 - 1  # dropout seeds are drawn from [0, _SEED_HIGH)


def draw_seed_tensor() -> Tensor:
    """A (1,) int64 dropout seed from torch's default RNG — the one draw of both paths (eager
    `draw_seed` reads it as an int), so a compiled run with Inductor's `fallback_random`
    draws the seeds an eager run draws."""
    return torch.randint(0, _SEED_HIGH, (1,))


def seed_tensor(dropout_p: float, seed: Optional[int] = None) -> Tensor:
    """The (1,) int64 dropout seed for the operators: ``seed`` as given, else (p > 0) a fresh draw,
    else 0 (no dropout: unused)."""
    if seed is not None:
        return torch.full((1,), seed, dtype=torch.int64)
    if dropout_p > 0.0:
        return draw_seed_tensor()
    return torch.zeros(1, dtype=torch.int64)


# the base dtypes a kernel takes, per device type (adapter dtypes: `adapter_dtypes_fuse` on CUDA,
# `cpu_adapter_dtypes_fuse` on the CPU)
KERNEL_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16),
                 "cuda": (torch.float32, torch.float16, torch.bfloat16)}


def cpu_adapter_dtypes_fuse(dtype: torch.dtype, adtype: torch.dtype) -> bool:
    """Whether the C kernels take adapters of ``adtype`` on a base of ``dtype``: the base's own dtype,
    or float32 on a bf16 / fp16 base (PEFT's default, ``autocast_adapter_dtype=True``)."""
    return adtype == dtype or (adtype == torch.float32 and dtype in (torch.bfloat16, torch.float16))
_loaded: dict[str, Optional[ModuleType]] = {}


def _load(module: str, entry_points: tuple[str, ...]) -> Optional[ModuleType]:
    """Import ``lorafuse.<module>`` once; None if missing, unbuilt, or lacking the entry points."""
    if module not in _loaded:
        try:
            mod: Optional[ModuleType] = importlib.import_module(f"lorafuse.{module}")
        except ImportError:
            mod = None
        if mod is not None and not all(hasattr(mod, e) for e in entry_points):
            mod = None
        _loaded[module] = mod
    return _loaded[module]


def kernels_for(*tensors: torch.Tensor) -> Optional[ModuleType]:
    """THE dispatch rule: the kernel module for these tensors, or None for the torch path (the
    layer applies its first case itself, `cpu_kernels`, having read x's device and dtypes).

    The first tensor is on the base side (x, W or g), the last an adapter (B); every tensor has one
    of those two dtypes. CPU fp32/bf16/fp16 with same-dtype adapters or float32 adapters on a half base
    → `lorafuse.ops`; CUDA, all on one device, fp32/fp16/bf16
    with same-dtype adapters or float32 adapters on bf16 → `lorafuse.cuda` if it exposes
    `lora_forward` and `lora_backward` with the `ops` signatures; anything else (other dtypes, mixed
    devices, empty inputs) → None. Called on every forward, so it is a plain loop.
    """
    first = tensors[0]
    dtype, adtype, on_cpu = first.dtype, tensors[-1].dtype, first.is_cpu
    for t in tensors:
        if (t.dtype != dtype and t.dtype != adtype) or t.is_cpu != on_cpu:
            return None
    if first.numel() == 0:
        return None
    if on_cpu:
        return cpu_kernels() if dtype in KERNEL_DTYPES["cpu"] and cpu_adapter_dtypes_fuse(dtype, adtype) else None
    device = first.device
    if device.type != "cuda" or dtype not in KERNEL_DTYPES["cuda"] or any(t.device != device for t in tensors):
        return None
    if adtype != dtype and not adapter_dtypes_fuse(dtype, adtype):
        return None
    return _load("cuda", ("lora_forward", "lora_backward"))


def cpu_kernels() -> Optional[ModuleType]:
    """`lorafuse.ops` (the C kernels for float32 CPU tensors), or None where it is not built."""
    return _load("ops", ("lora_forward", "lora_backward", "dropout_mask"))


def backend_name(*tensors: torch.Tensor) -> str:
    """'c', 'cuda' or 'torch': which implementation `kernels_for` picks for these tensors."""
    kern = kernels_for(*tensors)
    if kern is None:
        return "torch"
    return "cuda" if tensors[0].device.type == "cuda" else "c"


def draw_seed() -> int:
    """A dropout seed from torch's default RNG, so `torch.manual_seed` makes runs reproducible."""
    return int(draw_seed_tensor().item())


def dropout_mask(n: int, k: int, p: float, seed: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(n, k) mask of 0 or 1/(1-p): exactly the kernels' (`lorafuse.ops.dropout_mask`), for the torch path."""
    from . import ops

    return torch.from_numpy(ops.dropout_mask(n, k, p, seed)).to(device=device, dtype=dtype)


def _tensor(a: Any) -> torch.Tensor:
    """A kernel result as a tensor: the CPU kernels return NumPy arrays, wrapped without a copy — a
    bfloat16 result comes as a uint16 array of its bits (NumPy has no bfloat16) and is viewed as one."""
    if isinstance(a, torch.Tensor):
        return a
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if t.dtype == torch.uint16 else t


_NO_KWARGS: dict = {}
DISPATCH: Any = object()  # `kern` argument: not chosen yet, ask `kernels_for`


def _packed(cache: Optional[PackedWeightCache], weight: torch.Tensor, fifo: bool, for_backward: bool) -> dict:
    """``packed_w=...`` for a C kernel call when the layer keeps W's packed panels, else nothing
    (callers skip the call when there is no cache: the default path stays as it was)."""
    pack = cache.get(weight, fifo, for_backward) if cache is not None and weight.is_cpu else None
    return _NO_KWARGS if pack is None else {"packed_w": pack}


def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
             lora_b: torch.Tensor, scale: float, dropout_p: float, seed: int,
             fifo: bool, need_u: bool = True, weight_cache: Optional[PackedWeightCache] = None,
             kern: Any = DISPATCH) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[ModuleType]]:
    """x (..., k) → (y (..., m), u (..., r), the kernel module used or None for torch), on the
    kernels or in torch; u may be None when not needed (the kernels may then merge the rank-r
    term into W's packed panels instead).

    The kernels take the tensors as they are (the binding views them through DLPack and flattens
    the leading dims itself; tensors that require grad are only read) and allocate y and u.
    ``weight_cache``: the layer's kept panels of W (C kernels only), or None. ``kern``: the
    kernel module (or None for torch) when the caller has already chosen it, else `kernels_for`."""
    if kern is DISPATCH:
        kern = (kernels_for(x, weight, lora_a, lora_b) if bias is None
                else kernels_for(x, weight, bias, lora_a, lora_b))
    if kern is not None:
        y, u = kern.lora_forward(x, weight, lora_a, lora_b, scale, bias, dropout_p=dropout_p, seed=seed,
                                 fan_in_fan_out=fifo, need_u=need_u,
                                 **(_NO_KWARGS if weight_cache is None else _packed(weight_cache, weight, fifo, False)))
        return _tensor(y), None if u is None else _tensor(u), kern
    k = x.shape[-1]
    y, u = _torch_forward(x.detach().reshape(-1, k), weight.detach(), None if bias is None else bias.detach(),
                          lora_a.detach(), lora_b.detach(), scale, dropout_p, seed, fifo)
    return y.view(*x.shape[:-1], y.shape[-1]), u.view(*x.shape[:-1], u.shape[-1]), None


def base_grads(grad: torch.Tensor, x: torch.Tensor, fifo: bool, need_w: bool,
               need_b: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """dW (W's layout: (m, k), or (k, m) with fan_in_fan_out) and db (m) — each None unless asked
    for — when the base layer trains: torch math on grad (..., m) and x (..., k)."""
    if not (need_w or need_b):
        return None, None
    g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    dW = (x2.t() @ g2 if fifo else g2.t() @ x2) if need_w else None
    return dW, (g2.sum(0) if need_b else None)


def adapter_backward(grad: torch.Tensor, x: torch.Tensor, u: torch.Tensor, weight: torch.Tensor,
                     lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, dropout_p: float, seed: int, fifo: bool,
                     need_dx: bool, kern: Optional[ModuleType],
                     weight_cache: Optional[PackedWeightCache] = None
                     ) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """grad (..., m) → dx (x's shape) or None, dA (r, k), dB (m, r), on the kernel module ``kern``
    (None: the torch math); u (..., r) is the forward's. No autograd graph is recorded."""
    if kern is not None:
        packed = _packed(weight_cache, weight, fifo, True) if need_dx and weight_cache is not None else _NO_KWARGS
        dx, dA, dB = kern.lora_backward(grad, x, u, weight, lora_a, lora_b, scale, need_dx=need_dx,
                                        dropout_p=dropout_p, seed=seed, fan_in_fan_out=fifo, **packed)
        return (None if dx is None else _tensor(dx)), _tensor(dA), _tensor(dB)
    k, m = x.shape[-1], grad.shape[-1]
    x2 = x.detach().reshape(-1, k)
    dx, dA, dB = torch_backward(grad.reshape(-1, m), x2, u.reshape(-1, u.shape[-1]), weight.detach(), lora_a.detach(),
                                 lora_b.detach(), scale, mask_for(x2.to(lora_a.dtype), dropout_p, seed), fifo, need_dx)
    return (None if dx is None else dx.view(x.shape)), dA, dB


def _torch_forward(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                   lora_b: torch.Tensor, scale: float, dropout_p: float, seed: int,
                   fifo: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference forward on (n, k) input: returns y (n, m) and u (n, r). The rank-r term is computed in
    the adapters' dtype (x cast to it, as PEFT does) and added to the base's output in that dtype, the
    sum then cast to x's dtype; on the CPU u is float32 (as the C kernels keep it)."""
    xa = x2.to(lora_a.dtype)
    mask = mask_for(xa, dropout_p, seed)
    u = (xa if mask is None else xa * mask) @ lora_a.t()
    y = x2 @ (weight if fifo else weight.t())
    if bias is not None:
        y = y + bias
    y = (y + scale * (u @ lora_b.t())).to(x2.dtype)
    return y, (u.to(torch.promote_types(u.dtype, torch.float32)) if x2.is_cpu else u)


def mask_for(x2: torch.Tensor, dropout_p: float, seed: int) -> Optional[torch.Tensor]:
    """The (n, k) dropout multiplier for x2 (`dropout_mask`), or None without dropout."""
    return dropout_mask(*x2.shape, dropout_p, seed, dtype=x2.dtype, device=x2.device) if dropout_p else None


def torch_backward(g: torch.Tensor, x2: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scale: float, mask: Optional[torch.Tensor], fifo: bool,
                    need_dx: bool) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Reference adapter-only backward on (n, ·) matrices: dx (n, k) or None, dA (r, k), dB (m, r);
    mask: the forward's dropout multiplier (n, k) or None, in the adapters' dtype. The adapter
    products run in the adapters' dtype (g, x and u cast to it), dx's rank-r part is cast to g's."""
    adt = lora_a.dtype
    ga, xa = g.to(adt), x2.to(adt)
    v = ga @ lora_b
    dB = scale * (ga.t() @ u.to(adt))
    dA = scale * (v.t() @ (xa * mask if mask is not None else xa))
    dx = None
    if need_dx:
        dxd = v @ lora_a
        dx = g @ (weight.t() if fifo else weight) + (scale * (dxd * mask if mask is not None else dxd)).to(g.dtype)
    return dx, dA, dB


