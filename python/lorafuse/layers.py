"""`LoraLinear`: PEFT's `lora.Linear` layout, running on lorafuse's fused autograd function.

Parameters and state-dict keys are PEFT's: ``base_layer.*`` (the original module, frozen),
``lora_A.<adapter>.weight`` (r, in_features), ``lora_B.<adapter>.weight`` (out_features, r);
``lora_dropout`` is a ModuleDict of `nn.Dropout`/`nn.Identity` as in PEFT.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.compiler import is_compiling

from .autograd import DISPATCH, backend_name, cpu_kernels, draw_seed, fused_linear, kernels_for
from .cuda import adapter_dtypes_fuse
from .compiled import seed_tensor
from .tuners_utils import conv1d_class, is_conv1d
from .weight_cache import PackedWeightCache, PackedWeightOption

__all__ = ["LoraLinear", "cache_packed_weights", "fused_operands", "plain_base"]


def _adapter_dtype(weight: torch.Tensor, autocast_adapter_dtype: bool) -> torch.dtype:
    """PEFT's adapter dtype: the base's float dtype; fp16/bf16 become float32 with autocast_adapter_dtype."""
    if not weight.dtype.is_floating_point or (autocast_adapter_dtype and weight.dtype in (torch.float16,
                                                                                          torch.bfloat16)):
        return torch.float32
    return weight.dtype


def _param_of(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """module.<name> without nn.Module.__getattr__: the registered parameter (None for a Linear
    built with bias=False), or — when a wrapper such as FSDP has replaced it by a plain tensor
    attribute — that attribute."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def plain_base(base: nn.Module) -> bool:
    """A plain Linear/Conv1D (not a subclass) without hooks: its output is exactly x·Wᵀ + b, so it can be fused."""
    return type(base) in (nn.Linear, conv1d_class()) and not (base._forward_hooks or base._forward_pre_hooks
                                                              or base._backward_hooks or base._backward_pre_hooks)


def fused_operands(x: torch.Tensor, base: nn.Module, lin_a: nn.Module, lin_b: nn.Module, dropout: nn.Module,
                   scaling: float, fan_in_fan_out: bool,
                   weight_cache: Optional[PackedWeightCache] = None) -> Optional[tuple]:
    """`fused_linear`'s arguments — (x, W, bias, A, B, scale, dropout p, seed, fan_in_fan_out, W's
    cache, the kernel module) — for one adapter (lin_a, lin_b, dropout) on a plain base layer, or
    None where no kernel takes these operands: autocast on the CPU, adapter dtypes no kernel takes
    (an fp16 base with fp32 adapters; any half-precision base on the CPU). The caller has checked
    the layer's state (one active adapter, not merged, no hooks, x's width).

    Under CUDA autocast to a half dtype every operand is cast to it first (as autocast casts PEFT's
    linears: the base and the adapters compute in that dtype); a bf16 layer with PEFT's default fp32
    adapters goes to the CUDA kernels as it is. Runs on every call, on caches a kernel has just
    flushed, where each tensor attribute read costs µs: each attribute is read once, and the C
    kernels are picked here for float32 CPU input (no `kernels_for`, which reads every operand's
    dtype and device; an operand on another device is then refused by the binding's TypeError)."""
    on_cpu = x.is_cpu
    autocast = torch.is_autocast_enabled("cpu" if on_cpu else x.device.type)
    if autocast and (on_cpu or x.device.type != "cuda"):
        return None
    weight, lora_a, lora_b = _param_of(base, "weight"), _param_of(lin_a, "weight"), _param_of(lin_b, "weight")
    bias = _param_of(base, "bias")
    if autocast:
        cast = torch.get_autocast_dtype("cuda")
        if cast not in (torch.float16, torch.bfloat16) or not weight.dtype.is_floating_point:
            return None
        x, weight, lora_a, lora_b = x.to(cast), weight.to(cast), lora_a.to(cast), lora_b.to(cast)
        bias = None if bias is None else bias.to(cast)
    dtype = weight.dtype
    if x.dtype != dtype:
        raise TypeError(f"lorafuse: input dtype {x.dtype} does not match the base layer's weight dtype "
                        f"{dtype}; cast the input or the model.")
    adtype = lora_a.dtype
    if lora_b.dtype != adtype or (adtype != dtype and (on_cpu or not adapter_dtypes_fuse(dtype, adtype))):
        return None
    p = float(dropout.p) if dropout.training and isinstance(dropout, nn.Dropout) else 0.0
    # while torch.compile traces: no kernel module (the custom operators pick theirs when they
    # run; importing one is not traceable) and a seed tensor drawn in the graph
    compiling = is_compiling()
    kern = cpu_kernels() if not compiling and on_cpu and dtype == torch.float32 and 0 not in x.shape else DISPATCH
    seed = seed_tensor(p) if compiling else draw_seed() if p > 0.0 else 0
    return (x, weight, bias, lora_a, lora_b, scaling, p, seed, fan_in_fan_out, weight_cache, kern)


class LoraLinear(PackedWeightOption, nn.Module):
    """A LoRA-adapted `nn.Linear` or transformers `Conv1D`: ``y = base(x) + Σ_a s_a · B_a(A_a(drop_a(x)))``.

    x (..., in_features) → y (..., out_features). With one active adapter and matching
    dtypes, forward and backward run through `lorafuse.autograd.LoraLinearFunction` (C
    kernels for float32 CPU); several active adapters or mixed dtypes (e.g. a bf16 base with
    float32 adapters) take PEFT's own torch formulation.
    """

    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False,
                 init_lora_weights: Union[bool, str] = True, use_rslora: bool = False,
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        if isinstance(base_layer, nn.Linear):
            if fan_in_fan_out:
                warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                              "Setting fan_in_fan_out to False.")
                fan_in_fan_out = False
            in_features, out_features = base_layer.in_features, base_layer.out_features
        elif is_conv1d(base_layer):
            if not fan_in_fan_out:
                warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. "
                              "Setting fan_in_fan_out to True.")
                fan_in_fan_out = True
            in_features, out_features = base_layer.weight.shape
        else:
            raise ValueError(
                f"Target module {base_layer} is not supported. Currently, only `torch.nn.Linear` and "
                "`transformers.pytorch_utils.Conv1D` are supported."
            )
        if not base_layer.weight.dtype.is_floating_point:
            raise ValueError(f"Target module {type(base_layer).__name__} has a {base_layer.weight.dtype} weight; "
                             "quantized base layers are not supported.")
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict({})
        self.lora_A = nn.ModuleDict({})
        self.lora_B = nn.ModuleDict({})
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapter: list[str] = [adapter_name]
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora,
                          autocast_adapter_dtype)

    # ----------------------------------------------------------------- adapters
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                     init_lora_weights: Union[bool, str] = True, use_rslora: bool = False,
                     autocast_adapter_dtype: bool = True) -> None:
        """Add adapter ``adapter_name``: A (r, in), B (out, r), PEFT's init and RNG use.

        The adapter takes the base weight's device and dtype, except that fp16/bf16 bases get
        float32 adapters unless ``autocast_adapter_dtype`` is False (PEFT's default and option;
        same-dtype adapters are what lets half-precision layers use the fused kernels).
        """
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        if adapter_name in self.lora_A:
            raise ValueError(f"Adapter {adapter_name!r} already exists on this layer.")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self._reset_lora_parameters(adapter_name, init_lora_weights)
        weight = self.base_layer.weight
        dtype = _adapter_dtype(weight, autocast_adapter_dtype)
        self.lora_A[adapter_name].to(device=weight.device, dtype=dtype)
        self.lora_B[adapter_name].to(device=weight.device, dtype=dtype)
        self.set_adapter(self.active_adapters)

    def _reset_lora_parameters(self, adapter_name: str, init_lora_weights: Union[bool, str]) -> None:
        if init_lora_weights is False:
            return
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif init_lora_weights == "gaussian":
            nn.init.normal_(a, std=1 / self.r[adapter_name])
        else:
            raise ValueError(f"Unknown initialization {init_lora_weights!r}")
        nn.init.zeros_(b)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    def set_adapter(self, adapter_names: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Activate ``adapter_names``; their A/B become trainable (unless inference_mode), others frozen."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for layer_name in self.adapter_layer_names:
            for key, layer in getattr(self, layer_name).items():
                layer.requires_grad_(key in names and not inference_mode)
        self._active_adapter = names

    def enable_adapters(self, enabled: bool) -> None:
        """Toggle the adapters; disabled adapters are frozen and skipped (merged ones unmerged lazily)."""
        if enabled:
            self.set_adapter(self.active_adapters)
        else:
            for layer_name in self.adapter_layer_names:
                getattr(self, layer_name).requires_grad_(False)
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``; if it was active, fall back to the remaining active or first available one."""
        for attr in self.adapter_layer_names + self.other_param_names:
            if adapter_name in getattr(self, attr):
                del getattr(self, attr)[adapter_name]
        if adapter_name not in self._active_adapter:
            return
        remaining = [a for a in self._active_adapter if a != adapter_name]
        if not remaining and self.lora_A:
            remaining = [sorted(self.lora_A.keys())[0]]
            warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                          f"{remaining[0]}.")
        self.set_adapter(remaining)

    # -------------------------------------------------------------------- merge
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling · B @ A`` in the base weight's layout: (out, in), or (in, out) with fan_in_fan_out."""
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        upcast = a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16)
        compute = torch.float32 if upcast else a.dtype
        delta = (b.to(compute) @ a.to(compute)) * self.scaling[adapter_name]
        return (delta.t() if self.fan_in_fan_out else delta).to(a.dtype)

    def _apply_delta(self, adapter_name: str, sign: int, safe_merge: bool = False) -> None:
        """W ± delta in place (the C kernel for float32 CPU, no m×k temporary)."""
        if self._weight_cache is not None:  # W changes behind its version counter
            self._weight_cache.clear()
        weight = self.base_layer.weight
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        ops = kernels_for(weight, a, b) if weight.device.type == "cpu" else None
        if ops is not None and not safe_merge and weight.is_contiguous():
            fn = ops.merge if sign > 0 else ops.unmerge
            fn(weight.detach(), a.detach(), b.detach(), self.scaling[adapter_name],
               fan_in_fan_out=self.fan_in_fan_out)
            return
        delta = self.get_delta_weight(adapter_name).to(weight.dtype)
        if not safe_merge:
            weight.data.add_(delta, alpha=sign)
            return
        merged = weight.data.clone().add_(delta, alpha=sign)
        if not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
        weight.data = merged

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """W += s·B·A for the given (default: active) adapters not merged yet; warns about merged ones (PEFT)."""
        names = self.active_adapters if adapter_names is None else adapter_names
        if isinstance(names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {names!r}.")
        if self.merged:
            already = set(self.merged_adapters)
            names = [n for n in names if n not in already]
            if names:
                warnings.warn(f"Already following adapters were merged {','.join(self.merged_adapters)}. "
                              f"You are now additionally merging {','.join(names)}.")
            else:
                warnings.warn("All adapters are already merged, nothing to do.")
        for name in names:
            if name in self.lora_A:
                self._apply_delta(name, +1, safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo merges, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A:
                self._apply_delta(name, -1)

    # ------------------------------------------------------------------ forward
    @property
    def backend(self) -> str:
        """'c', 'cuda' or 'torch': the implementation forward uses for inputs of the base weight's dtype."""
        active = [a for a in self._active_adapter if a in self.lora_A]
        if len(active) != 1 or not self._fusable_base():
            return "torch"
        return backend_name(self.base_layer.weight, self.lora_A[active[0]].weight, self.lora_B[active[0]].weight)

    def _fusable_base(self) -> bool:
        """`plain_base`: only a plain Linear/Conv1D without hooks is computed from its weight directly;
        subclasses keep their own forward, through PEFT's formulation."""
        return plain_base(self._modules["base_layer"])

    def _fused_operands(self, x: torch.Tensor) -> Optional[tuple]:
        """`fused_linear`'s arguments for the fused path (`fused_operands`), or None when forward must
        take the general route: adapters disabled or merged, not exactly one active adapter, hooks,
        a wrong input width (that route reports it), or what `fused_operands` declines.
        Runs on every call: it reads the submodules' dicts directly (no nn.Module.__getattr__)."""
        active = self._active_adapter
        if self._disable_adapters or self.merged_adapters or len(active) != 1 or not self._fusable_base():
            return None
        name, modules = active[0], self._modules
        lin_a = modules["lora_A"]._modules.get(name)
        if lin_a is None or x.shape[-1] != self.in_features:
            return None
        return fused_operands(x, modules["base_layer"], lin_a, modules["lora_B"]._modules[name],
                              modules["lora_dropout"]._modules[name], float(self.scaling[name]),
                              bool(self.fan_in_fan_out), self._weight_cache)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x (..., in_features) → (..., out_features)."""
        fused = None if args or kwargs else self._fused_operands(x)
        if fused is not None:
            return fused_linear(*fused)
        base = self.base_layer
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        active = [a for a in self._active_adapter if a in self.lora_A]
        if self.merged or not active:
            return base(x, *args, **kwargs)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LoraLinear: expected input (..., {self.in_features}), got {tuple(x.shape)}")
        return self._torch_forward(x, active, *args, **kwargs)

    def _torch_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """PEFT's formulation: base(x) + Σ B(A(dropout(x in adapter dtype))) · s, cast back."""
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in active:
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            xa = x if x.dtype == lora_a.weight.dtype else x.to(lora_a.weight.dtype)
            result = result + lora_b(lora_a(self.lora_dropout[name](xa))) * self.scaling[name]
        return result.to(result_dtype)

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}"]
        for name in self.lora_A:
            dropout = self.lora_dropout[name]
            p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            parts.append(f"{name}: r={self.r[name]}, lora_alpha={self.lora_alpha[name]}, lora_dropout={p}")
        parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def cache_packed_weights(model: nn.Module, enabled: bool = True) -> int:
    """``set_packed_weight_cache`` on every lorafuse LoRA layer of ``model`` (`LoraLinear`, and the
    PEFT-native `lorafuse.FusedLinear`); returns how many.

    Opt-in speed for training and inference with frozen float32 CPU weights: each layer keeps
    W's packed panels (about one extra copy of W per direction used, made on first use).
    """
    layers = [m for m in model.modules() if isinstance(m, PackedWeightOption)]
    for layer in layers:
        layer.set_packed_weight_cache(enabled)
    return len(layers)
