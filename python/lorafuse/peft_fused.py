"""lorafuse as the compute inside PEFT: a subclass of PEFT's own LoRA ``Linear`` whose forward runs the
fused kernels where they apply, and the switch that makes stock PEFT create it.

    lorafuse.patch_peft()          # peft.get_peft_model, PeftModel.from_pretrained, load_adapter,
                                   # add_adapter, inject_adapter_in_model — and so Trainer, trl,
                                   # accelerate — put `FusedLinear` on nn.Linear / Conv1D targets
    lorafuse.unpatch_peft()        # stock PEFT again (layers made meanwhile keep their class)
    lorafuse.fuse_peft_model(m)    # an existing PEFT model's LoRA Linear layers become FusedLinear, in place
    lorafuse.unfuse_peft_model(m)  # and back

Mechanism (docs/DESIGN.md): PEFT builds every LoRA layer through the dispatchers of
``LoraModel._create_new_module``; ``dispatch_default`` makes ``lora.Linear`` for nn.Linear and
transformers' Conv1D. `patch_peft` wraps that one function: the Linear it returns gets the class
`FusedLinear`. `FusedLinear` adds no state — no parameter or buffer, nothing in a state dict; only the
opt-in packed-W cache, a run-time attribute — so switching the class of a live layer is safe both ways, and everything except the forward is
PEFT's own code: state dicts and files, merge/unmerge, adapter add/set/delete, modules_to_save,
``disable_adapter``, gradient checkpointing, mixed-adapter batches, DoRA and the other variants.

The forward is fused (`lorafuse.autograd.fused_linear`: C kernels for float32 CPU, CUDA kernels for
fp32/fp16/bf16 and PEFT's default fp32 adapters on bf16) when adapters are enabled and unmerged, exactly
one active adapter is plain LoRA (no DoRA or other variant, no ``lora_bias``), the base layer is a plain
nn.Linear / Conv1D without hooks, no extra forward argument is given (``adapter_names`` means PEFT's
mixed batch), and a kernel takes the operands' dtypes (`layers.fused_operands`). Anything else runs
PEFT's forward unchanged. ``layer.lorafuse_path`` tells which ran last: 'fused' or 'peft'.

While patched, ``PeftModel.from_pretrained`` and ``load_adapter`` also validate a local adapter
directory with `lorafuse.io_validate.check_peft_dir` before PEFT reads it: a hostile or broken LoRA
directory (pickled weights only, a malformed safetensors header, non-finite values, regular expressions
that could hang the module matcher, ranks that contradict the config) raises ``AdapterFileError`` and
the model is left untouched; nothing is ever unpickled. Other PEFT methods' directories get the checks
that do not depend on the method (config JSON, no pickles, the safetensors file). Hub ids (not a local
directory) go to PEFT as they are.
With dropout 0 the fused result is PEFT's math up to fp32 summation order; with dropout the mask comes
from lorafuse's seeded hash (x̃ is never stored), not from torch's RNG stream as in PEFT.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
from peft import PeftModel
from peft.tuners.lora import layer as _peft_layer
from peft.tuners.lora import model as _peft_model
from torch import nn

from .autograd import fused_linear
from .io_validate import check_peft_dir
from .layers import fused_operands, plain_base
from .weight_cache import PackedWeightOption

__all__ = ["FusedLinear", "patch_peft", "unpatch_peft", "peft_is_patched", "fuse_peft_model", "unfuse_peft_model"]

PeftLinear = _peft_layer.Linear
_STOCK_DISPATCH: Callable[..., Optional[nn.Module]] = _peft_model.dispatch_default
_STOCK_FROM_PRETRAINED = PeftModel.__dict__["from_pretrained"]  # a classmethod object
_STOCK_LOAD_ADAPTER = PeftModel.__dict__["load_adapter"]


class FusedLinear(PackedWeightOption, PeftLinear):
    """PEFT's ``lora.Linear`` (same parameters, state-dict keys, methods) with a fused forward:
    x (..., in_features) → (..., out_features). See the module docstring for when it is fused."""

    lorafuse_path: Optional[str] = None  # 'fused' or 'peft': the path of the last forward

    def merge(self, *args: Any, **kwargs: Any) -> None:
        """PEFT's merge; W changes through ``.data`` (no version bump), so the kept panels go first."""
        if self._weight_cache is not None:
            self._weight_cache.clear()
        super().merge(*args, **kwargs)

    def unmerge(self, *args: Any, **kwargs: Any) -> None:
        """PEFT's unmerge, the kept panels dropped first (see `merge`)."""
        if self._weight_cache is not None:
            self._weight_cache.clear()
        super().unmerge(*args, **kwargs)

    def _lorafuse_operands(self, x: torch.Tensor) -> Optional[tuple]:
        """`fused_linear`'s arguments, or None where PEFT's forward must run."""
        if self._disable_adapters or self.merged_adapters:
            return None
        active = self.active_adapters
        if len(active) != 1:
            return None
        name, modules = active[0], self._modules  # submodules read from _modules: no nn.Module.__getattr__
        lin_a = modules["lora_A"]._modules.get(name)
        if (lin_a is None or x.shape[-1] != self.in_features or name in getattr(self, "lora_variant", ())
                or getattr(self, "use_dora", {}).get(name) or self.lora_bias.get(name)):
            return None
        base = modules["base_layer"]
        if not plain_base(base):
            return None
        return fused_operands(x, base, lin_a, modules["lora_B"]._modules[name], modules["lora_dropout"]._modules[name],
                              float(self.scaling[name]), bool(self.fan_in_fan_out), self._weight_cache)

    def _get_name(self) -> str:
        return "Linear"  # its repr stays PEFT's "lora.Linear(...)"; extra_repr names lorafuse

    def extra_repr(self) -> str:
        return f"lorafuse fused forward (last path: {self.lorafuse_path or 'none yet'})"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        fused = None if args or kwargs else self._lorafuse_operands(x)
        # the instance dict directly: nn.Module.__setattr__ costs µs on every call
        self.__dict__["lorafuse_path"] = "peft" if fused is None else "fused"
        if fused is None:
            return super().forward(x, *args, **kwargs)
        return fused_linear(*fused)


def _dispatch_fused(target: nn.Module, adapter_name: str, **kwargs: Any) -> Optional[nn.Module]:
    """PEFT's ``dispatch_default``, with its ``lora.Linear`` made a `FusedLinear`."""
    module = _STOCK_DISPATCH(target, adapter_name, **kwargs)
    if type(module) is PeftLinear:
        module.__class__ = FusedLinear
    return module


def _validate_local(model_id: Any, kwargs: dict) -> None:
    """`check_peft_dir` on ``model_id`` (+ ``subfolder``) when it names a local directory."""
    if not isinstance(model_id, (str, os.PathLike)) or not os.path.isdir(model_id):
        return
    check_peft_dir(os.path.join(os.fspath(model_id), kwargs.get("subfolder") or ""))


def _from_pretrained(cls: type, model: nn.Module, model_id: Any, *args: Any, **kwargs: Any) -> PeftModel:
    """PEFT's ``PeftModel.from_pretrained`` after `_validate_local`."""
    _validate_local(model_id, kwargs)
    return _STOCK_FROM_PRETRAINED.__func__(cls, model, model_id, *args, **kwargs)


def _load_adapter(self: PeftModel, model_id: Any, *args: Any, **kwargs: Any) -> Any:
    """PEFT's ``PeftModel.load_adapter`` after `_validate_local`."""
    _validate_local(model_id, kwargs)
    return _STOCK_LOAD_ADAPTER(self, model_id, *args, **kwargs)


def patch_peft() -> None:
    """From now on, LoRA layers that stock PEFT creates on nn.Linear / Conv1D are `FusedLinear`, and
    local adapter directories are validated before PEFT loads them (idempotent). Layers that exist
    already keep their class: `fuse_peft_model` converts them."""
    _peft_model.dispatch_default = _dispatch_fused
    PeftModel.from_pretrained = classmethod(_from_pretrained)
    PeftModel.load_adapter = _load_adapter


def unpatch_peft() -> None:
    """Stock PEFT again: new LoRA layers are PEFT's ``lora.Linear``, its loaders its own (idempotent)."""
    _peft_model.dispatch_default = _STOCK_DISPATCH
    PeftModel.from_pretrained = _STOCK_FROM_PRETRAINED
    PeftModel.load_adapter = _STOCK_LOAD_ADAPTER


def peft_is_patched() -> bool:
    """Whether `patch_peft` is in effect."""
    return _peft_model.dispatch_default is _dispatch_fused


def _swap(model: nn.Module, old: type, new: type) -> int:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (a PEFT model), got {type(model).__name__}")
    count = 0
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new
            count += 1
    return count


def fuse_peft_model(model: nn.Module) -> int:
    """Make every PEFT ``lora.Linear`` in ``model`` a `FusedLinear`, in place (weights, adapters,
    optimizer state and hooks are untouched). Returns how many layers were converted."""
    return _swap(model, PeftLinear, FusedLinear)


def unfuse_peft_model(model: nn.Module) -> int:
    """Undo `fuse_peft_model`: every `FusedLinear` in ``model`` becomes PEFT's ``lora.Linear`` again."""
    return _swap(model, FusedLinear, PeftLinear)
