"""lorafuse: fused LoRA kernels (C, CUDA) with a PEFT-compatible PyTorch layer.

NumPy users: :mod:`lorafuse.ops`. PyTorch users: ``from lorafuse import LoraConfig,
get_peft_model`` exactly as with PEFT.
"""
from . import ops
from ._C import __version__
from ._runtime import get_num_threads, set_num_threads, show_config, _init_from_env

__all__ = ["ops", "set_num_threads", "get_num_threads", "show_config", "__version__"]

_init_from_env()
