"""What a LoRA layer (`lorafuse.FusedLinear`, PEFT's ``lora.Linear`` layout) hands to the fused kernels.

PEFT's layout: ``base_layer`` (the original nn.Linear or transformers Conv1D, frozen),
``lora_A[adapter]`` (Linear in_features → r, weight (r, in_features)), ``lora_B[adapter]`` (Linear
r → out_features, weight (out_features, r)), ``lora_dropout[adapter]`` (nn.Dropout or nn.Identity).
`fused_operands` turns one adapter of such a layer into `fused_linear`'s arguments, or declines.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.modules.module as _module_mod
from torch import nn
from torch.compiler import is_compiling

from .backend import DISPATCH, KERNEL_DTYPES, cpu_adapter_dtypes_fuse, cpu_kernels, draw_seed, seed_tensor
from .cuda import adapter_dtypes_fuse
from .weight_cache import PackedWeightCache, PackedWeightOption

__all__ = ["cache_packed_weights", "conv1d_class", "fused_operands", "lora_unhooked", "plain_base", "under_transform",
           "unhooked"]


try:  # transformers' GPT-2 style Conv1D (weight stored (in, out)); PEFT needs transformers anyway
    from transformers.pytorch_utils import Conv1D as _Conv1D
except ImportError:  # pragma: no cover - lorafuse[torch] without transformers
    _Conv1D = None

# base layers whose output is exactly x·Wᵀ + b (x·W + b for Conv1D): the fused kernels compute them
_PLAIN_BASES = (nn.Linear,) if _Conv1D is None else (nn.Linear, _Conv1D)


def conv1d_class() -> Optional[type]:
    """transformers' `Conv1D` class, or None without transformers."""
    return _Conv1D


def _param_of(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """module.<name> without nn.Module.__getattr__: the registered parameter (None for a Linear
    built with bias=False), or — when a wrapper such as FSDP has replaced it by a plain tensor
    attribute — that attribute."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


# nn.Linear subclasses of model code whose forward is x·Wᵀ + b as it stands (module.qualname): Falcon's
# `input @ self.weight.T` (+ bias). Named, not imported (no model module loaded for it); tests/test_peft_parity_archs.py
# holds each to PEFT's result, so a changed forward upstream fails there.
_LINEAR_EQUIVALENTS = frozenset({"transformers.models.falcon.modeling_falcon.FalconLinear"})


def plain_base(base: nn.Module) -> bool:
    """A plain Linear/Conv1D (or a subclass in _LINEAR_EQUIVALENTS; no other subclass): its class's forward is
    exactly x·Wᵀ + b, so it can be fused (whether the instance is called as its class says: `unhooked`)."""
    cls = type(base)
    return cls in _PLAIN_BASES or f"{cls.__module__}.{cls.__qualname__}" in _LINEAR_EQUIVALENTS


def unhooked(*modules: nn.Module) -> bool:
    """Calling each module is exactly its class's forward, so a fused kernel may stand in for the calls: no forward
    or backward hooks of its own, no forward set on the instance — accelerate's offload and device-map hooks
    replace it, and the weights may sit on the meta device until they run; a user's wrapper too — and no global
    module hooks (torch.nn.modules.module.register_module_forward_hook …)."""
    if (_module_mod._global_forward_hooks or _module_mod._global_forward_pre_hooks
            or _module_mod._global_backward_hooks or _module_mod._global_backward_pre_hooks):
        return False
    for m in modules:
        d = m.__dict__  # read as a dict: an attribute lookup each cost 2-3× as much (µs per layer call in all)
        if (d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"]
                or "forward" in d):
            return False
    return True


def under_transform() -> bool:
    """A torch.func transform (grad, vmap, jvp, jacrev …: per-sample gradients, for one) or a forward-mode AD
    level is active. lorafuse's autograd Functions run C kernels, so they can have neither a vmap rule nor a jvp:
    PEFT's forward (torch ops all through) runs there instead. Not while torch.compile traces: its AOTAutograd
    runs under functorch's interpreters itself, and the compiled path is lorafuse's registered op (`compiled`)."""
    return not is_compiling() and (torch._C._functorch.peek_interpreter_stack() is not None
                                   or _forward_ad._current_level >= 0)


def lora_unhooked(layer: nn.Module, name: str) -> bool:
    """`unhooked` over every module PEFT's forward of adapter ``name`` calls: the base layer, lora_A, lora_B,
    lora_dropout and, for a DoRA adapter, its lora_magnitude_vector module."""
    mods = layer._modules
    magnitude = mods["lora_magnitude_vector"]._modules.get(name)
    return unhooked(mods["base_layer"], mods["lora_A"]._modules[name], mods["lora_B"]._modules[name],
                    mods["lora_dropout"]._modules[name], *(() if magnitude is None else (magnitude,)))


def fused_operands(x: torch.Tensor, base: nn.Module, lin_a: nn.Module, lin_b: nn.Module, dropout: nn.Module,
                   scaling: float, fan_in_fan_out: bool,
                   weight_cache: Optional[PackedWeightCache] = None) -> Optional[tuple]:
    """`fused_linear`'s arguments — (x, W, bias, A, B, scale, dropout p, seed, fan_in_fan_out, W's
    cache, the kernel module) — for one adapter (lin_a, lin_b, dropout) on a plain base layer, or
    None where no kernel takes these operands: a device other than CPU or CUDA, a base dtype no kernel
    takes (float64), adapter dtypes no kernel takes (on CUDA an fp16 base with fp32 adapters). The
    caller has checked the layer's state (one active adapter, not merged, no hooks, x's width).

    Under autocast to a half dtype (CPU or CUDA) every operand is cast to it first, as autocast casts
    PEFT's linears: the base and the adapters compute in that dtype, and autograd casts the adapters'
    gradients back. A half base with PEFT's default fp32 adapters goes to the kernels as it is.
    Runs on every call, on caches a kernel has just
    flushed, where each tensor attribute read costs µs: each attribute is read once, and the C
    kernels are picked here for CPU input (no `kernels_for`, which reads every operand's
    dtype and device; an operand on another device is then refused by the binding's TypeError)."""
    on_cpu = x.is_cpu
    if not on_cpu and x.device.type != "cuda":
        return None
    device_type = "cpu" if on_cpu else "cuda"
    autocast = torch.is_autocast_enabled(device_type)
    weight, lora_a, lora_b = _param_of(base, "weight"), _param_of(lin_a, "weight"), _param_of(lin_b, "weight")
    bias = _param_of(base, "bias")
    if autocast:
        cast = torch.get_autocast_dtype(device_type)
        if cast not in (torch.float16, torch.bfloat16) or not weight.dtype.is_floating_point:
            return None
        x, weight, lora_a, lora_b = x.to(cast), weight.to(cast), lora_a.to(cast), lora_b.to(cast)
        bias = None if bias is None else bias.to(cast)
    dtype = weight.dtype
    if x.dtype != dtype:
        raise TypeError(f"lorafuse: input dtype {x.dtype} does not match the base layer's weight dtype "
                        f"{dtype}; cast the input or the model.")
    if dtype not in KERNEL_DTYPES["cpu" if on_cpu else "cuda"]:
        return None
    adtype = lora_a.dtype
    fuse = cpu_adapter_dtypes_fuse if on_cpu else adapter_dtypes_fuse
    if lora_b.dtype != adtype or not fuse(dtype, adtype):
        return None
    p = float(dropout.p) if dropout.training and isinstance(dropout, nn.Dropout) else 0.0
    # while torch.compile traces: no kernel module (the custom operators pick theirs when they
    # run; importing one is not traceable) and a seed tensor drawn in the graph
    compiling = is_compiling()
    kern = cpu_kernels() if not compiling and on_cpu and 0 not in x.shape else DISPATCH
    seed = seed_tensor(p) if compiling else draw_seed() if p > 0.0 else 0
    return (x, weight, bias, lora_a, lora_b, scaling, p, seed, fan_in_fan_out, weight_cache, kern)


def cache_packed_weights(model: nn.Module, enabled: bool = True) -> int:
    """``set_packed_weight_cache`` on every lorafuse LoRA layer (`lorafuse.FusedLinear`) of ``model``;
    returns how many.

    Opt-in speed for training and inference with frozen float32 CPU weights: each layer keeps
    W's packed panels (about one extra copy of W per direction used, made on first use).
    """
    layers = [m for m in model.modules() if isinstance(m, PackedWeightOption)]
    for layer in layers:
        layer.set_packed_weight_cache(enabled)
    return len(layers)
