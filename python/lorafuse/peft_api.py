"""lorafuse's front end: PEFT's own API, returning real PEFT models whose LoRA layers are `FusedLinear`.

    from lorafuse import LoraConfig, get_peft_model, PeftModel   # instead of: from peft import ...
    model = get_peft_model(base, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    isinstance(model, peft.PeftModel)                            # True: Trainer, trl, accelerate see PEFT
    model = PeftModel.from_pretrained(base, "adapter_dir")       # validated before PEFT reads it

``LoraConfig``, ``TaskType`` and ``LoraModel`` are PEFT's own classes. `get_peft_model` and
`PeftModel.from_pretrained` call PEFT and then `fuse_peft_model`, which converts a PEFT model in place,
with no global patch (`lorafuse.patch_peft` is the global switch for code that calls PEFT directly):

- every PEFT ``lora.Linear`` becomes a `FusedLinear` (its forward fused where the kernels apply), every
  ``lora.bnb.Linear4bit`` / ``Linear8bitLt`` (LoRA on bitsandbytes' 4-bit / 8-bit base) a
  `lorafuse.qlora.FusedLinear4bit` / `FusedLinear8bitLt`;
- the tuner (``model.base_model``, PEFT's ``LoraModel``) becomes `FusedLoraModel`, so adapters added
  later (``add_adapter``, ``load_adapter``) on new target modules get `FusedLinear` layers too;
- the PEFT model (``PeftModelForCausalLM`` etc.) becomes its lorafuse twin: the same class with
  ``load_adapter`` validating a local directory first (`lorafuse.io_validate.check_peft_dir`: hostile
  files raise ``AdapterFileError``, the model untouched, nothing unpickled) and ``save_pretrained``
  writing atomically. The twin keeps PEFT's class name, so reprs and ``isinstance`` checks are PEFT's.

None of these classes adds state, so `unfuse_peft_model` returns the model to stock PEFT exactly.
"""

from __future__ import annotations

from typing import Any

import peft
from peft import LoraConfig, LoraModel, TaskType
from peft.peft_model import PeftModel as _PeftModel
from torch import nn

from . import peft_fused
from .peft_fused import FUSED_CLASSES, RUNTIME_ATTRS, fuse_layer, load_adapter, save_pretrained

__all__ = ["LoraConfig", "TaskType", "LoraModel", "FusedLoraModel", "PeftModel", "get_peft_model",
           "fuse_peft_model", "unfuse_peft_model"]


class FusedLoraModel(LoraModel):
    """PEFT's ``LoraModel`` (the tuner, ``peft_model.base_model``) whose new LoRA Linear layers are `FusedLinear`."""

    @staticmethod
    def _create_new_module(lora_config: LoraConfig, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module:
        with peft_fused.fused_dispatch():
            return fuse_layer(LoraModel._create_new_module(lora_config, adapter_name, target, **kwargs))

    def _get_name(self) -> str:
        return "LoraModel"  # the repr stays PEFT's


def _twin(stock: type) -> type:
    """A subclass of the PEFT model class ``stock`` with the validated loader and the atomic saver.
    Named like ``stock`` (reprs unchanged); its qualified name, under which pickle finds it, is
    ``Fused<name>`` in this module."""
    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:  # direct construction, converted too
        stock.__init__(self, *args, **kwargs)
        fuse_peft_model(self)

    twin = type(stock.__name__, (stock,), {"__init__": __init__, "load_adapter": load_adapter,
                                           "save_pretrained": save_pretrained, "__module__": __name__,
                                           "__qualname__": "Fused" + stock.__name__,
                                           "__doc__": f"PEFT's {stock.__name__}, converted by lorafuse."})
    globals()[twin.__qualname__] = twin
    return twin


# PEFT's generic model and its task models (PeftModelForCausalLM, ...), each with its twin
_TWINS: dict[type, type] = {cls: _twin(cls) for cls in (_PeftModel, *(
    c for c in _PeftModel.__subclasses__() if c.__module__ == _PeftModel.__module__))}
_STOCK_OF = {twin: stock for stock, twin in _TWINS.items()}
_LAYERS = FUSED_CLASSES
_STOCK_LAYERS = {v: k for k, v in _LAYERS.items()}
_TUNERS = {LoraModel: FusedLoraModel}


def _swap(model: nn.Module, *tables: dict[type, type]) -> int:
    """Set the class of ``model`` and of every submodule whose exact class is a key of a table to the
    table's value; returns how many LoRA layers changed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (a PEFT model), got {type(model).__name__}")
    layers = 0
    for module in model.modules():
        for table in tables:
            new = table.get(type(module))
            if new is not None:
                layers += table is _LAYERS or table is _STOCK_LAYERS
                module.__class__ = new
                if table is _STOCK_LAYERS:  # a stock layer again: nothing of lorafuse left (packed W, path)
                    for attr in RUNTIME_ATTRS:
                        module.__dict__.pop(attr, None)
    return layers


def fuse_peft_model(model: nn.Module) -> int:
    """Convert a PEFT model (or any module holding PEFT LoRA layers) to lorafuse in place: layers,
    tuner and model class as in the module docstring. Weights, adapters, optimizer state and hooks are
    untouched. Returns how many LoRA Linear layers were converted."""
    return _swap(model, _LAYERS, _TUNERS, _TWINS)


def unfuse_peft_model(model: nn.Module) -> int:
    """Undo `fuse_peft_model`: stock PEFT classes again. Returns how many layers were converted."""
    return _swap(model, _STOCK_LAYERS, {v: k for k, v in _TUNERS.items()}, _STOCK_OF)


def get_peft_model(model: nn.Module, peft_config: peft.PeftConfig, adapter_name: str = "default",
                   **kwargs: Any) -> peft.PeftModel:
    """``peft.get_peft_model(model, peft_config, adapter_name, **kwargs)`` (same arguments, e.g.
    ``autocast_adapter_dtype``, ``low_cpu_mem_usage``), converted by `fuse_peft_model`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"get_peft_model: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(peft_config, peft.PeftConfig):
        raise TypeError(f"get_peft_model: peft_config must be a peft.PeftConfig (e.g. lorafuse.LoraConfig), "
                        f"got {type(peft_config).__name__}")
    if not isinstance(adapter_name, str):
        raise TypeError(f"get_peft_model: adapter_name must be a string, got {type(adapter_name).__name__}")
    if not adapter_name:
        raise ValueError("get_peft_model: adapter_name must be a non-empty string")
    with peft_fused.fused_dispatch():
        peft_model = peft.get_peft_model(model, peft_config, adapter_name, **kwargs)
    fuse_peft_model(peft_model)
    return peft_model


PeftModel = _TWINS[_PeftModel]
PeftModel.__doc__ = ("PEFT's ``PeftModel`` as lorafuse converts it (`fuse_peft_model`); "
                     "``PeftModel.from_pretrained`` returns PEFT's model for the adapter's task type, converted.")


def _from_pretrained(cls: type, model: nn.Module, model_id: Any, *args: Any, **kwargs: Any) -> peft.PeftModel:
    """``peft.PeftModel.from_pretrained`` (same arguments) on a local directory validated first and
    rolled back if PEFT fails (`lorafuse.peft_fused.from_pretrained`), the result converted by
    `fuse_peft_model`."""
    with peft_fused.fused_dispatch():
        peft_model = peft_fused.from_pretrained(_PeftModel, model, model_id, *args, **kwargs)
    fuse_peft_model(peft_model)
    return peft_model


PeftModel.from_pretrained = classmethod(_from_pretrained)
