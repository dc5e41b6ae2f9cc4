"""lorafuse as the compute inside PEFT: `FusedLinear`, a subclass of PEFT's own LoRA ``Linear`` whose
forward runs the fused kernels where they apply, and the switch that makes stock PEFT create it.

    lorafuse.patch_peft()     # peft.get_peft_model, PeftModel.from_pretrained, load_adapter,
                              # add_adapter, inject_adapter_in_model — and so Trainer, trl,
                              # accelerate — put `FusedLinear` on nn.Linear / Conv1D targets
    lorafuse.unpatch_peft()   # stock PEFT again (layers made meanwhile keep their class)

Model-level entry points (`lorafuse.get_peft_model`, `lorafuse.PeftModel.from_pretrained`,
`lorafuse.fuse_peft_model`) live in `lorafuse.peft_api`; they need no patching.

Mechanism (docs/DESIGN.md §2): PEFT builds every LoRA layer through the dispatchers of
``LoraModel._create_new_module``; ``dispatch_default`` makes ``lora.Linear`` for nn.Linear and
transformers' Conv1D. `patch_peft` wraps that one function: the Linear it returns gets the class
`FusedLinear`. `FusedLinear` adds no state — no parameter or buffer, nothing in a state dict; only the
opt-in packed-W cache, a run-time attribute — so switching the class of a live layer is safe both
ways, and everything except the forward is PEFT's own code: state dicts and files, merge/unmerge,
adapter add/set/delete, modules_to_save, ``disable_adapter``, gradient checkpointing, mixed-adapter
batches, DoRA and the other variants.

The forward is fused (`lorafuse.autograd.fused_linear`: C kernels for float32 CPU, CUDA kernels for
fp32/fp16/bf16 and PEFT's default fp32 adapters on bf16; `lorafuse.dora` for a DoRA adapter: CPU fp32, bf16 /
fp16 bases with fp32 or same-dtype adapters, CUDA with adapters of the base's dtype) when adapters are enabled
and unmerged, exactly one active adapter is plain LoRA or DoRA (no other variant, no ``lora_bias``), the base
layer is a plain nn.Linear / Conv1D, none of the modules PEFT's forward would call (base, lora_A, lora_B, dropout, DoRA
magnitude) has hooks or a forward set on the instance (accelerate's offload hooks: `layers.unhooked`), no
torch.func transform or forward-mode AD is active (`layers.under_transform`), no extra forward argument is
given (``adapter_names`` means PEFT's mixed batch), and a kernel takes the operands' dtypes
(`layers.fused_operands`). Anything else runs
PEFT's forward unchanged. ``layer.lorafuse_path`` tells which ran last: 'c' or 'cuda' (the fused
kernels) or 'peft'; ``layer.backend`` which would run now for an input of the base weight's dtype.

While patched, ``PeftModel.from_pretrained`` and ``load_adapter`` also validate a local adapter
directory with `lorafuse.io_validate.check_peft_dir` before PEFT reads it: a hostile or broken
directory (pickled weights only, a malformed safetensors header, non-finite values, regular expressions
that could hang the module matcher, LoRA ranks that contradict the config) raises ``AdapterFileError``
and the model is left untouched; nothing is ever unpickled. Hub ids (not a local directory) go to PEFT
as they are. ``save_pretrained`` writes atomically (`lorafuse.atomic.atomic_directory_write`).
With dropout 0 the fused result is PEFT's math up to fp32 summation order; with dropout the mask comes
from lorafuse's seeded hash (x̃ is never stored), not from torch's RNG stream as in PEFT.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any, Callable, Iterator, Optional

import torch
from peft import PeftModel
from peft.tuners.lora import layer as _peft_layer
from peft.tuners.lora import model as _peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .atomic import atomic_directory_write
from .autograd import fused_linear
from .dora import ROW_NORMS_ATTR, dora_magnitude, dora_operands, forget_row_norms, kept_row_norms
from .io_validate import AdapterFileError, check_peft_dir
from .layers import fused_operands, plain_base, under_transform, unhooked
from .qlora import (FusedLinear4bit, FusedLinear8bitLt, PeftLinear4bit, PeftLinear8bitLt,
                    dispatch_lorafuse_quant)
from .weight_cache import PackedWeightOption

__all__ = ["FusedLinear", "patch_peft", "unpatch_peft", "peft_is_patched"]

PeftLinear = _peft_layer.Linear
_STOCK_DISPATCH: Callable[..., Optional[nn.Module]] = _peft_model.dispatch_default
_STOCK_FROM_PRETRAINED = PeftModel.__dict__["from_pretrained"]  # a classmethod object
_STOCK_LOAD_ADAPTER = PeftModel.__dict__["load_adapter"]
_STOCK_SAVE_PRETRAINED = PeftModel.__dict__["save_pretrained"]


class FusedLinear(PackedWeightOption, PeftLinear):
    """PEFT's ``lora.Linear`` (same constructor, parameters, state-dict keys, methods) with a fused
    forward: x (..., in_features) → (..., out_features). See the module docstring for when it is fused."""

    lorafuse_path: Optional[str] = None  # 'c', 'cuda' or 'peft': the path of the last forward

    def merge(self, *args: Any, **kwargs: Any) -> None:
        """PEFT's merge; W changes through ``.data`` (no version bump), so what is kept of W goes first."""
        self._forget_weight()
        super().merge(*args, **kwargs)

    def unmerge(self, *args: Any, **kwargs: Any) -> None:
        """PEFT's unmerge, what is kept of W dropped first (see `merge`)."""
        self._forget_weight()
        super().unmerge(*args, **kwargs)

    def _forget_weight(self) -> None:
        """Drop the kept panels and row norms of W (it is about to change)."""
        if self._weight_cache is not None:
            self._weight_cache.clear()
        forget_row_norms(self)

    def _lorafuse_operands(self, x: torch.Tensor) -> Optional[tuple]:
        """(`fused_linear` or `dora_linear`, its arguments), or None where PEFT's forward must run."""
        if self._disable_adapters or self.merged_adapters:
            return None
        active = self.active_adapters
        if len(active) != 1:
            return None
        name, modules = active[0], self._modules  # submodules read from _modules: no nn.Module.__getattr__
        lin_a = modules["lora_A"]._modules.get(name)
        magnitude = dora_magnitude(self, name)  # None: no DoRA adapter
        if (lin_a is None or x.shape[-1] != self.in_features
                or (magnitude is None and name in getattr(self, "lora_variant", {})) or self.lora_bias.get(name)):
            return None
        base, lin_b = modules["base_layer"], modules["lora_B"]._modules[name]
        dropout = modules["lora_dropout"]._modules[name]
        # every module PEFT's forward would call must be called as its class says: `layers.lora_unhooked`'s list,
        # built here from the modules this call already holds (the helper's lookups again: +0.4 µs a call)
        called = (base, lin_a, lin_b, dropout) if magnitude is None else (
            base, lin_a, lin_b, dropout, modules["lora_magnitude_vector"]._modules[name])
        if not plain_base(base) or not unhooked(*called) or under_transform():
            return None
        fused = fused_operands(x, base, lin_a, lin_b, dropout, float(self.scaling[name]), bool(self.fan_in_fan_out),
                               self._weight_cache)
        if fused is None or magnitude is None:
            return None if fused is None else (fused_linear, fused)
        return dora_operands(fused, magnitude, kept_row_norms(self))

    @property
    def backend(self) -> str:
        """'c', 'cuda' or 'peft': the path a forward would take now (adapter state, autocast) for an
        input of the base weight's dtype and device."""
        weight = self.get_base_layer().weight
        probe = torch.empty(0, self.in_features, dtype=weight.dtype, device=weight.device)
        try:
            fused = self._lorafuse_operands(probe)
        except TypeError:  # the dtype check of fused_operands: PEFT's path reports it
            fused = None
        return "peft" if fused is None else "cuda" if weight.is_cuda else "c"

    def _get_name(self) -> str:
        return "Linear"  # its repr stays PEFT's "lora.Linear(...)"; extra_repr names lorafuse

    def extra_repr(self) -> str:
        return f"lorafuse fused forward (last path: {self.lorafuse_path or 'none yet'})"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        fused = None if args or kwargs else self._lorafuse_operands(x)
        # the instance dict directly: nn.Module.__setattr__ costs µs on every call
        self.__dict__["lorafuse_path"] = "peft" if fused is None else "cuda" if x.is_cuda else "c"
        if fused is None:
            return super().forward(x, *args, **kwargs)
        run, operands = fused
        return run(*operands)


# what a FusedLinear keeps in its instance dict (no state: run-time attributes only)
RUNTIME_ATTRS = ("_weight_cache", "lorafuse_path", ROW_NORMS_ATTR)


# PEFT's LoRA layer classes and their lorafuse subclasses (the bnb 4-bit / 8-bit ones where bitsandbytes is installed)
FUSED_CLASSES: dict[type, type] = {PeftLinear: FusedLinear}
if PeftLinear4bit is not None:
    from peft.tuners.lora import bnb as _peft_bnb

    FUSED_CLASSES[PeftLinear4bit] = FusedLinear4bit
    FUSED_CLASSES[PeftLinear8bitLt] = FusedLinear8bitLt
    # PEFT's dispatchers for bnb's bases, which patch_peft wraps (`_fused_bnb_dispatch`)
    _STOCK_DISPATCH_BNB: dict[str, Callable[..., Optional[nn.Module]]] = {
        name: getattr(_peft_bnb, name) for name in ("dispatch_bnb_4bit", "dispatch_bnb_8bit")}
else:  # pragma: no cover - without bitsandbytes
    _peft_bnb, _STOCK_DISPATCH_BNB = None, {}


def fuse_layer(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """``module`` with its lorafuse class (`FusedLinear`, `lorafuse.qlora.FusedLinear4bit` / `FusedLinear8bitLt`) if
    it is exactly one of PEFT's LoRA layer classes fused (``lora.Linear``, ``lora.bnb.Linear4bit`` /
    ``Linear8bitLt``), in place."""
    new = FUSED_CLASSES.get(type(module))
    if new is not None:
        module.__class__ = new
    return module


def _dispatch_fused(target: nn.Module, adapter_name: str, **kwargs: Any) -> Optional[nn.Module]:
    """PEFT's ``dispatch_default``, with its ``lora.Linear`` made a `FusedLinear`; a `lorafuse.quant.Linear4bit` /
    `lorafuse.quant8.Linear8bit` target (which stock PEFT does not know) gets a `lorafuse.qlora.LoraLinear4bit` /
    `LoraLinear8bit`."""
    return dispatch_lorafuse_quant(target, adapter_name, **kwargs) or fuse_layer(
        _STOCK_DISPATCH(target, adapter_name, **kwargs))


@contextlib.contextmanager
def fused_dispatch() -> Iterator[None]:
    """PEFT builds lorafuse's layers (`_dispatch_fused`) inside this block, as under `patch_peft`: for lorafuse's
    own entry points, which also convert afterwards (`fuse_peft_model`) but must reach `LoraLinear4bit` /
    `LoraLinear8bit` for lorafuse's quantized modules while PEFT creates the layers. Stock PEFT's dispatch again
    after it (unless patched)."""
    before = _peft_model.dispatch_default
    _peft_model.dispatch_default = _dispatch_fused
    try:
        yield
    finally:
        _peft_model.dispatch_default = before


def _fused_bnb_dispatch(name: str) -> Callable[..., Optional[nn.Module]]:
    """PEFT's ``dispatch_bnb_4bit`` / ``dispatch_bnb_8bit``, with the layer it makes given its lorafuse class."""
    stock = _STOCK_DISPATCH_BNB[name]

    def dispatch(target: nn.Module, adapter_name: str, **kwargs: Any) -> Optional[nn.Module]:
        return fuse_layer(stock(target, adapter_name, **kwargs))

    dispatch.__name__ = dispatch.__qualname__ = f"lorafuse_{name}"
    return dispatch


_FUSED_DISPATCH_BNB = {name: _fused_bnb_dispatch(name) for name in _STOCK_DISPATCH_BNB}


def _is_local_dir(model_id: Any) -> bool:
    """Whether ``model_id`` names a local directory (else PEFT treats it as a Hub id)."""
    return isinstance(model_id, (str, os.PathLike)) and os.path.isdir(model_id)


def validate_local(model_id: Any, kwargs: dict) -> None:
    """`check_peft_dir` on ``model_id`` (+ ``subfolder``) when it names a local directory."""
    if _is_local_dir(model_id):
        check_peft_dir(os.path.join(os.fspath(model_id), kwargs.get("subfolder") or ""))


class _Snapshot:
    """What a failed load must give back of ``model`` (a PeftModel, or the base model PEFT's
    ``from_pretrained`` wraps in place): the module at every path, requires_grad, instance attributes."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.flags = {name: param.requires_grad for name, param in model.named_parameters()}
        self.attrs = set(model.__dict__)

    def restore(self, adapter: str) -> None:
        """Undo a failed load of adapter ``adapter``: PEFT's ``delete_adapter`` where its config was kept,
        the adapter dropped from every layer that got it, every module path that now holds a different
        module (a new LoRA layer or modules_to_save wrapper) given its old module back, requires_grad and
        the instance attributes as they were. (Base weights that an initialisation rewrote while loading
        — PiSSA, OLoRA, CorDA — stay rewritten.)"""
        model = self.model
        if isinstance(model, PeftModel) and adapter in model.peft_config:
            model.delete_adapter(adapter)
        for path, module in list(model.named_modules()):
            if path in self.modules and self.modules[path] is not module:
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent), child, self.modules[path])
            elif isinstance(module, BaseTunerLayer):
                module.delete_adapter(adapter)
            elif isinstance(module, AuxiliaryTrainingWrapper):
                module.delete_adapter(adapter, None)
        for name, param in model.named_parameters():
            if name in self.flags:
                param.requires_grad_(self.flags[name])
        for attr in set(model.__dict__) - self.attrs:  # e.g. the peft_config PEFT sets on a base model
            del model.__dict__[attr]


# what PEFT raises for files it cannot use (bad config values, tensors that do not fit the model)
_PEFT_LOAD_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError, NotImplementedError)


def all_or_nothing(model: nn.Module, model_id: Any, adapter: str, load: Callable[[], Any]) -> Any:
    """``load()`` — PEFT loading adapter ``adapter`` from ``model_id`` into ``model`` — and if PEFT fails on
    a local directory, ``model`` restored (`_Snapshot`) and the error raised as ``AdapterFileError``
    naming the directory (PEFT's exception chained). Hub ids are PEFT's business as they are."""
    if not _is_local_dir(model_id):
        return load()
    snapshot = _Snapshot(model)
    try:
        return load()
    except _PEFT_LOAD_ERRORS as exc:
        snapshot.restore(adapter)
        raise AdapterFileError(f"{os.fspath(model_id)}: PEFT could not load this adapter: "
                               f"{type(exc).__name__}: {exc}") from exc


def from_pretrained(cls: type, model: nn.Module, model_id: Any, *args: Any, **kwargs: Any) -> PeftModel:
    """PEFT's ``PeftModel.from_pretrained`` (as a classmethod of ``cls``) after `validate_local`, all or
    nothing (`all_or_nothing`: the base ``model`` PEFT wraps in place is given back as it was)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_pretrained: model must be a torch.nn.Module, got {type(model).__name__}")
    validate_local(model_id, kwargs)
    name = inspect.signature(_STOCK_FROM_PRETRAINED.__func__).bind(cls, model, model_id, *args, **kwargs)
    adapter = name.arguments.get("adapter_name", "default")
    return all_or_nothing(model, model_id, adapter,
                          lambda: _STOCK_FROM_PRETRAINED.__func__(cls, model, model_id, *args, **kwargs))


def load_adapter(self: PeftModel, model_id: Any, *args: Any, **kwargs: Any) -> Any:
    """PEFT's ``PeftModel.load_adapter`` after `validate_local`, all or nothing (`all_or_nothing`)."""
    validate_local(model_id, kwargs)
    name = inspect.signature(_STOCK_LOAD_ADAPTER).bind(self, model_id, *args, **kwargs).arguments["adapter_name"]
    if name in self.peft_config:  # PEFT refuses an existing name; nothing of ours to undo
        return _STOCK_LOAD_ADAPTER(self, model_id, *args, **kwargs)
    return all_or_nothing(self, model_id, name, lambda: _STOCK_LOAD_ADAPTER(self, model_id, *args, **kwargs))


def save_pretrained(self: PeftModel, save_directory: str, *args: Any, **kwargs: Any) -> None:
    """PEFT's ``PeftModel.save_pretrained``, each file it writes moved into place atomically
    (`atomic_directory_write`): a reader never sees a partial adapter, a failed save changes nothing."""
    bound = inspect.signature(_STOCK_SAVE_PRETRAINED).bind(self, save_directory, *args, **kwargs)
    if not bound.arguments.get("is_main_process", True):
        return _STOCK_SAVE_PRETRAINED(self, save_directory, *args, **kwargs)  # PEFT writes nothing then
    atomic_directory_write(os.fspath(save_directory),
                           lambda staging: _STOCK_SAVE_PRETRAINED(self, staging, *args, **kwargs))


def patch_peft() -> None:
    """From now on, LoRA layers that stock PEFT creates on nn.Linear / Conv1D are `FusedLinear` (on
    bitsandbytes' Linear4bit / Linear8bitLt `lorafuse.qlora.FusedLinear4bit` / `FusedLinear8bitLt`), local
    adapter directories are validated before PEFT loads them, and ``save_pretrained`` writes atomically
    (idempotent). Layers that exist already keep their class: `lorafuse.fuse_peft_model` converts them."""
    _peft_model.dispatch_default = _dispatch_fused
    for name, dispatch in _FUSED_DISPATCH_BNB.items():
        setattr(_peft_bnb, name, dispatch)
    PeftModel.from_pretrained = classmethod(from_pretrained)
    PeftModel.load_adapter = load_adapter
    PeftModel.save_pretrained = save_pretrained


def unpatch_peft() -> None:
    """Stock PEFT again: new LoRA layers are PEFT's ``lora.Linear``, its loaders and saver its own (idempotent)."""
    _peft_model.dispatch_default = _STOCK_DISPATCH
    for name, dispatch in _STOCK_DISPATCH_BNB.items():
        setattr(_peft_bnb, name, dispatch)
    PeftModel.from_pretrained = _STOCK_FROM_PRETRAINED
    PeftModel.load_adapter = _STOCK_LOAD_ADAPTER
    PeftModel.save_pretrained = _STOCK_SAVE_PRETRAINED


def peft_is_patched() -> bool:
    """Whether `patch_peft` is in effect."""
    return _peft_model.dispatch_default is _dispatch_fused
