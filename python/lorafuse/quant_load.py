"""A transformers checkpoint that bitsandbytes quantized, loaded without bitsandbytes.

    model = lorafuse.load_quantized("path/to/llama-bnb-4bit")        # its config.json names the quantization
    model = lorafuse.get_peft_model(model, lorafuse.LoraConfig(...))   # LoraLinear4bit / LoraLinear8bit layers

A directory written by ``save_pretrained`` of a model loaded with ``BitsAndBytesConfig(load_in_4bit=True)`` or
``load_in_8bit=True`` (or quantized by `lorafuse.quantize`) holds bitsandbytes' storage as it is: for a 4-bit
linear layer the packed codes (``weight``) and its quant state (``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``), for an 8-bit
one the int8 codes, ``SCB`` and ``weight_format``. transformers refuses to load it where bitsandbytes is not
installed. `load_quantized` builds the model from its config with empty weights (accelerate's
``init_empty_weights``: no memory for them), puts `quant.Linear4bit` / `quant8.Linear8bit` where the config
quantized nn.Linear layers (every one but ``llm_int8_skip_modules`` and the output embedding, as transformers
does), and loads the safetensors files into it
as they are — the same bits, read by the same kernels as bitsandbytes' modules (tests/test_quant_load.py).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from torch import nn

from .quant import Linear4bit, QuantState
from .quant8 import Linear8bit

__all__ = ["load_quantized"]


def _state_dict(path: str) -> dict:
    """Every tensor of the directory's safetensors files (``model.safetensors`` or the shards its index
    names), read without unpickling."""
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"load_quantized: {path!r} holds no model.safetensors (nor its index)")
    state: dict = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return state


def _placeholder(linear: nn.Linear, load_in_4bit: bool) -> nn.Module:
    """An empty lorafuse quantized module of ``linear``'s shape and bias, for the checkpoint to load into."""
    bias = None if linear.bias is None else torch.zeros(linear.out_features)
    if not load_in_4bit:
        return Linear8bit(linear.in_features, linear.out_features, bias=bias)
    state = QuantState(absmax=torch.zeros(0), shape=torch.Size((linear.out_features, linear.in_features)),
                       code=torch.zeros(16), blocksize=64, quant_type="nf4", dtype=torch.float32)
    return Linear4bit(linear.in_features, linear.out_features, torch.zeros(0, 1, dtype=torch.uint8), state, bias)


def load_quantized(path: str, *, model_class: Any = None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The transformers model saved in the directory ``path`` by ``save_pretrained`` of a bitsandbytes-quantized
    model (4-bit NF4 / FP4 or 8-bit), with lorafuse's quantized modules holding the stored bits — bitsandbytes is
    not needed. ``model_class``: a transformers auto class or model class (default ``AutoModelForCausalLM``);
    ``dtype``: the non-quantized parameters' dtype (default the config's ``dtype``, else as stored). The model
    is in eval mode, as ``from_pretrained`` leaves it. Raises ValueError for a directory without a bitsandbytes
    ``quantization_config`` or without safetensors weights, and for weights that do not fit the model."""
    import transformers
    from accelerate import init_empty_weights

    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise ValueError(f"load_quantized: {path!r} is not a directory")
    path = os.fspath(path)
    config = transformers.AutoConfig.from_pretrained(path)
    qc = getattr(config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes":
        raise ValueError(f"load_quantized: {path!r} was not quantized by bitsandbytes (config.json has no "
                         "quantization_config with quant_method 'bitsandbytes')")
    four = bool(qc.get("load_in_4bit") or qc.get("_load_in_4bit"))
    if not four and not (qc.get("load_in_8bit") or qc.get("_load_in_8bit")):
        raise ValueError(f"load_quantized: {path!r}'s quantization_config loads neither in 4 nor in 8 bits")
    skip = set(qc.get("llm_int8_skip_modules") or ())
    del config.quantization_config  # the model is built plain, then its linear layers replaced
    dtype = dtype if dtype is not None else getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    cls = model_class or transformers.AutoModelForCausalLM
    build = getattr(cls, "from_config", None) or cls._from_config  # an auto class, or a model class
    with init_empty_weights(include_buffers=False):
        model = build(config, **({"dtype": dtype} if dtype is not None else {}))
    head = model.get_output_embeddings()  # transformers never quantizes the output embedding either
    for name, module in list(model.named_modules()):
        if (type(module) is nn.Linear and module is not head and name not in skip
                and name.rsplit(".", 1)[-1] not in skip):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _placeholder(module, four))
    state = _state_dict(path)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        tied = {k for k in missing if k.endswith("lm_head.weight")}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"load_quantized: the checkpoint does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"load_quantized: tensors the checkpoint did not hold: {left[:5]}")
    config.quantization_config = qc  # as from_pretrained keeps it: save_pretrained writes it again
    return model.eval()
