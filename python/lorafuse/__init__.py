"""lorafuse: fused LoRA kernels (C, CUDA), the compute inside Hugging Face PEFT.

NumPy users: :mod:`lorafuse.ops` (no torch needed). PyTorch users: ``from lorafuse import
LoraConfig, get_peft_model, PeftModel`` exactly as with PEFT — the models are real ``peft.PeftModel``
objects with fused LoRA layers (`lorafuse.peft_api`) — or ``lorafuse.patch_peft()`` to make stock
PEFT build them (`lorafuse.peft_fused`). These names load torch and peft on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from . import ops
from ._C import __version__
from ._runtime import (_init_from_env, get_num_threads, output_cache_stats, set_num_threads, set_output_cache_limit,
                       show_config)

# torch-dependent names, imported on first access so that `import lorafuse` needs only NumPy
_LAZY = {
    "LoraConfig": "peft_api",
    "TaskType": "peft_api",
    "LoraModel": "peft_api",
    "get_peft_model": "peft_api",
    "PeftModel": "peft_api",
    "fuse_peft_model": "peft_api",
    "unfuse_peft_model": "peft_api",
    "FusedLinear": "peft_fused",
    "FusedLinear4bit": "qlora",
    "FusedLinear8bitLt": "qlora",
    "patch_peft": "peft_fused",
    "unpatch_peft": "peft_fused",
    "peft_is_patched": "peft_fused",
    "cache_packed_weights": "layers",
    "quantize": "quant",
    "load_quantized": "quant_load",
}

__all__ = ["ops", "set_num_threads", "get_num_threads", "set_output_cache_limit", "output_cache_stats", "show_config",
           "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lorafuse' has no attribute {name!r}")


_init_from_env()
