"""Which modules get an adapter (PEFT's matching rules) and PEFT's `ModulesToSaveWrapper`."""

from __future__ import annotations

import copy
import functools
import re
from typing import Any, Iterable, Optional, Union

from torch import nn

from .config import LoraConfig, TaskType

__all__ = [
    "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
    "ModulesToSaveWrapper",
    "check_target_module_exists",
    "conv1d_class",
    "get_pattern_key",
    "is_conv1d",
    "linear_module_names",
    "minimal_target_modules",
    "wrap_modules_to_save",
]

# PEFT's `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING` (peft 0.21, utils/constants.py).
TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: dict[str, Union[list[str], str]] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "blip-2": ["q", "v", "q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    "layoutlm": ["query", "value"], "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"], "gpt_bigcode": ["c_attn"], "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"], "RefinedWeb": ["query_key_value"], "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"], "codegen": ["qkv_proj"], "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)", "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

SEQ_CLS_HEAD_NAMES = ("score", "classifier")


@functools.lru_cache(maxsize=None)
def conv1d_class() -> Optional[type]:
    """transformers' GPT-2 style `Conv1D` class (weight stored (in, out)), or None without transformers
    (looked up once: the fused layers ask on every forward)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """True for an instance of transformers' `Conv1D` (or a subclass)."""
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


def check_target_module_exists(config: LoraConfig, key: str) -> bool:
    """PEFT's `check_target_module_exists`: does module ``key`` (full dotted name) get an adapter?

    Order: exclude_modules, then modules_to_save (never adapted), then target_modules
    (str → re.fullmatch; collection → exact name or ``"." + entry`` suffix, narrowed by
    layers_to_transform / layers_pattern).
    """
    excluded = config.exclude_modules
    if excluded:
        if isinstance(excluded, str):
            if re.fullmatch(excluded, key):
                return False
        elif key in excluded or any(key.endswith(f".{e}") for e in excluded):
            return False
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
        return False
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    return _in_selected_layer(config, key)


def _in_selected_layer(config: LoraConfig, key: str) -> bool:
    """Apply layers_to_transform / layers_pattern exactly as PEFT (first numbered segment wins)."""
    layers = config.layers_to_transform
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    patterns = config.layers_pattern
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def get_pattern_key(pattern_keys: Iterable[str], key: str) -> Optional[str]:
    """First rank/alpha pattern matching ``key`` on a ``.`` boundary (PEFT's `get_pattern_key`), else None."""
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return None


MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20


def minimal_target_modules(targets: set[str], other_names: Iterable[str]) -> set[str]:
    """PEFT's `_find_minimal_target_modules`: fewest dotted suffixes that select ``targets`` and no other name.

    Used (as in PEFT) when 20 or more names are targeted, so the saved config lists e.g.
    ``{"q_proj", "v_proj"}`` rather than every full module name.
    """
    def suffixes(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))][::-1]

    taken = {s for name in other_names for s in suffixes(name)}
    required: set[str] = set()
    for name, candidates in sorted(((n, suffixes(n)) for n in targets), key=lambda item: item[1]):
        for suffix in candidates:
            if suffix in required or suffix in taken:
                continue
            if not any(name.endswith("." + req) for req in required):
                required.add(suffix)
                break
    return required


def linear_module_names(model: nn.Module, config: LoraConfig) -> set[str]:
    """PEFT's ``"all-linear"``: every Linear/Conv1D except the output head and adapter internals."""
    from .layers import LoraLinear

    names = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoraLinear)) or is_conv1d(m)}
    exclude: set[str] = set()
    head = _output_head(model, config)
    if head is not None:
        exclude.update(n for n, m in model.named_modules() if m is head)
    for prefix, module in model.named_modules():
        if isinstance(module, LoraLinear):
            exclude.update(f"{prefix}.{suffix}" for suffix, _ in module.named_modules() if suffix)
    return names - exclude


def _output_head(model: nn.Module, config: LoraConfig) -> Optional[nn.Module]:
    get_output = getattr(model, "get_output_embeddings", None)
    if not callable(get_output) or not hasattr(model, "config"):
        return None  # not a transformers PreTrainedModel: PEFT excludes nothing
    head = get_output()
    if head is None and config.task_type == TaskType.SEQ_CLS:
        head = next((getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if getattr(model, n, None) is not None), None)
    return head


class ModulesToSaveWrapper(nn.Module):
    """PEFT's wrapper for a module trained in full: ``original_module`` plus one trainable copy per adapter.

    State-dict keys: ``<name>.original_module.*`` and ``<name>.modules_to_save.<adapter>.*``.
    Forward runs the active adapter's copy, or the original when none is active or adapters are disabled.
    """

    def __init__(self, module_to_save: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict({})
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.update(adapter_name)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def update(self, adapter_name: str) -> None:
        """Add a frozen copy of the original module for ``adapter_name`` (trainable once activated)."""
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
            self.modules_to_save[adapter_name].requires_grad_(False)
        self.original_module.requires_grad_(False)

    def set_adapter(self, adapter_names: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Activate one adapter (trainable unless inference_mode) or none (``[]``)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        names = [n for n in names if n in self.modules_to_save]
        if len(names) > 1:
            raise ValueError(f"Attempted to set multiple ({names}) adapters at once for modules_to_save.")
        for module in self.modules_to_save.values():
            module.requires_grad_(False)
        self._active_adapter = names
        if names:
            self.modules_to_save[names[0]].requires_grad_(not inference_mode)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled
        for name, module in self.modules_to_save.items():
            module.requires_grad_(enabled and name in self._active_adapter)

    def delete_adapter(self, adapter_name: str, new_active: list[str]) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
            self.set_adapter([n for n in new_active if n in self.modules_to_save][:1])

    def active_module(self) -> nn.Module:
        """The module forward runs: the active adapter's copy, else the original."""
        if self._disable_adapters or not self._active_adapter:
            return self.original_module
        return self.modules_to_save[self._active_adapter[0]]

    def unwrapped(self) -> nn.Module:
        """What unloading leaves in place: the active adapter's copy, else the original (PEFT)."""
        return self.modules_to_save[self._active_adapter[0]] if self._active_adapter else self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module(), name)


def wrap_modules_to_save(model: nn.Module, module_names: list[str], adapter_name: str,
                         activate: bool, inference_mode: bool) -> None:
    """PEFT's `_set_trainable`: wrap every module whose name ends with an entry (plain `endswith`)."""
    from .layers import LoraLinear

    keys = [k for k, _ in model.named_modules() if k and any(k.endswith(t) for t in module_names)]
    for key in keys:  # check everything before changing anything
        parent_name = key.rpartition(".")[0]
        if parent_name and isinstance(model.get_submodule(parent_name), nn.ModuleDict) and isinstance(
                model.get_submodule(parent_name.rpartition(".")[0]), LoraLinear):
            raise ValueError(
                f"modules_to_save entry matches {key!r}, a child of a LoRA layer; make sure the adapter name "
                f"{adapter_name!r} does not conflict with the targeted module names."
            )
    for key in keys:
        parent_name, _, child_name = key.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(parent, ModulesToSaveWrapper):
            continue  # inside a wrapper: handled through the wrapper itself
        target = getattr(parent, child_name)
        if isinstance(target, ModulesToSaveWrapper):
            target.update(adapter_name)
            wrapper = target
        else:
            wrapper = ModulesToSaveWrapper(target, adapter_name)
            setattr(parent, child_name, wrapper)
        if activate:
            wrapper.set_adapter(adapter_name, inference_mode=inference_mode)
