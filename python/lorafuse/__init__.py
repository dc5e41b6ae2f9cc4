"""lorafuse: fused LoRA kernels (C, CUDA) with a PEFT-compatible PyTorch layer.

NumPy users: :mod:`lorafuse.ops` (no torch needed). PyTorch users: ``from lorafuse import
LoraConfig, get_peft_model`` exactly as with PEFT, or ``lorafuse.patch_peft()`` to make stock PEFT
build lorafuse's fused layers (`lorafuse.peft_fused`); these names load torch on first use.
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
    "LoraConfig": "config",
    "TaskType": "config",
    "get_peft_model": "model",
    "PeftModel": "model",
    "LoraModel": "model",
    "LoraLinear": "layers",
    "cache_packed_weights": "layers",
    "patch_peft": "peft_fused",
    "unpatch_peft": "peft_fused",
    "peft_is_patched": "peft_fused",
    "fuse_peft_model": "peft_fused",
    "unfuse_peft_model": "peft_fused",
    "FusedLinear": "peft_fused",
}

__all__ = ["ops", "set_num_threads", "get_num_threads", "set_output_cache_limit", "output_cache_stats", "show_config",
           "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lorafuse' has no attribute {name!r}")


_init_from_env()
