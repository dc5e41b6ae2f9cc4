"""Put LoRA adapters into an existing model with PEFT's structure and API.

``get_peft_model(model, config)`` returns a `PeftModel` whose ``base_model`` is a
`LoraModel` whose ``model`` is the user's (modified in place) model, so state-dict keys
are PEFT's: ``base_model.model.<path>.lora_A.<adapter>.weight``.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from .config import LoraConfig, TaskType
from .layers import LoraLinear
from .tuners_utils import (MIN_TARGET_MODULES_FOR_OPTIMIZATION, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
                           ModulesToSaveWrapper, check_target_module_exists, get_pattern_key, linear_module_names,
                           minimal_target_modules, wrap_modules_to_save)

__all__ = ["LoraModel", "PeftModel", "get_peft_model"]

# PEFT's task models add their heads to modules_to_save (PeftModelForSequenceClassification etc.).
_TASK_HEADS = {TaskType.SEQ_CLS: ["classifier", "score"], TaskType.TOKEN_CLS: ["classifier", "score"],
               TaskType.QUESTION_ANS: ["qa_outputs"]}
_COMBINATIONS = ("linear", "cat", "svd")


def _submodule_parent(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    parent_name, _, child = key.rpartition(".")
    return model.get_submodule(parent_name), child


class LoraModel(nn.Module):
    """The tuner: owns ``peft_config`` and the user's ``model`` with `LoraLinear` layers injected."""

    prefix = "lora_"

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {adapter_name: config}
        self.active_adapter: Union[str, list[str]] = adapter_name
        try:
            self.inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        except Exception:
            del self.peft_config[adapter_name]
            raise
        self.model.peft_config = self.peft_config

    # ------------------------------------------------------------------ helpers
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    def lora_layers(self) -> Iterator[LoraLinear]:
        """Every `LoraLinear` in the model."""
        return (m for m in self.model.modules() if isinstance(m, LoraLinear))

    def _wrappers(self) -> Iterator[ModulesToSaveWrapper]:
        return (m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper))

    def _require_adapters(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"Adapter {missing[0]} not found. Available adapters: {sorted(self.peft_config)}")

    # ---------------------------------------------------------------- injection
    def _prepare_config(self, config: LoraConfig, model: nn.Module) -> None:
        """Resolve target_modules None (PEFT's default for the model type) and "all-linear"."""
        if config.target_modules is None:
            model_config = getattr(model, "config", None)
            model_type = getattr(model_config, "model_type", None)
            if isinstance(model_config, dict):
                model_type = model_config.get("model_type")
            targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
            if targets is None:
                raise ValueError("Please specify `target_modules` in `peft_config` (no default for model type "
                                 f"{model_type!r}).")
            config.target_modules = targets if isinstance(targets, str) else set(targets)
        if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
            config.target_modules = linear_module_names(model, config)

    def inject_adapter(self, model: nn.Module, adapter_name: str, activate: bool = True,
                       autocast_adapter_dtype: bool = True) -> None:
        """Wrap every targeted module in a `LoraLinear` (or add the adapter to an existing one).

        activate: make the new adapter's modules_to_save copies active (first adapter only);
        autocast_adapter_dtype: fp16/bf16 bases get float32 adapters (PEFT's default).
        """
        config = self.peft_config[adapter_name]
        self._check_new_adapter_config(config)
        self._prepare_config(config, model)
        inside_lora = {f"{n}." for n, m in model.named_modules() if isinstance(m, LoraLinear)}
        keys = [k for k, _ in model.named_modules() if k and not any(k.startswith(p) for p in inside_lora)]
        self._minimise_targets(config, keys)
        matched = [k for k in keys if check_target_module_exists(config, k)]
        if not matched:
            raise ValueError(f"Target modules {config.target_modules} not found in the base model. "
                             "Please check the target modules and try again.")
        replaced: list[tuple[nn.Module, str, nn.Module]] = []
        try:
            for key in matched:
                self._create_and_replace(config, adapter_name, key, replaced, autocast_adapter_dtype)
            if config.modules_to_save:  # checks all names before wrapping any
                wrap_modules_to_save(model, config.modules_to_save, adapter_name, activate, config.inference_mode)
        except Exception:  # roll back: the model is left as it was
            for parent, child, original in replaced:
                setattr(parent, child, original)
            for layer in self.lora_layers():
                layer.delete_adapter(adapter_name)
            raise
        self._mark_only_adapters_as_trainable()
        if config.inference_mode:
            for layer in self.lora_layers():
                for attr in layer.adapter_layer_names:
                    if adapter_name in getattr(layer, attr):
                        getattr(layer, attr)[adapter_name].requires_grad_(False)

    @staticmethod
    def _minimise_targets(config: LoraConfig, keys: list[str]) -> None:
        """Replace 20+ listed targets by the minimal suffix set, as PEFT does (this is what gets saved)."""
        targets = config.target_modules
        if isinstance(targets, str) or targets is None or len(targets) < MIN_TARGET_MODULES_FOR_OPTIMIZATION:
            return
        ends = tuple(f".{t}" for t in targets)
        others = [k for k in keys if k not in targets and not k.endswith(ends)]
        minimal = minimal_target_modules(targets, others)
        if len(minimal) < len(targets):
            config.target_modules = minimal

    def _check_new_adapter_config(self, config: LoraConfig) -> None:
        if sum(c.bias != "none" for c in self.peft_config.values()) > 1:
            raise ValueError("LoraModel supports only 1 adapter with bias. When using multiple adapters, set bias "
                             "to 'none' for all adapters.")

    def _create_and_replace(self, config: LoraConfig, adapter_name: str, key: str,
                            replaced: list[tuple[nn.Module, str, nn.Module]], autocast_adapter_dtype: bool) -> None:
        """Add the adapter at ``key``; new wrappers are recorded in ``replaced`` as (parent, name, original)."""
        parent, child = _submodule_parent(self.model, key)
        target = getattr(parent, child)
        rank_key = get_pattern_key(config.rank_pattern, key)
        alpha_key = get_pattern_key(config.alpha_pattern, key)
        r = config.rank_pattern[rank_key] if rank_key is not None else config.r
        alpha = config.alpha_pattern[alpha_key] if alpha_key is not None else config.lora_alpha
        if isinstance(target, LoraLinear):
            target.update_layer(adapter_name, r, alpha, config.lora_dropout, config.init_lora_weights,
                                config.use_rslora, autocast_adapter_dtype)
            return
        new = LoraLinear(target, adapter_name, r, alpha, config.lora_dropout, config.fan_in_fan_out,
                         config.init_lora_weights, config.use_rslora, autocast_adapter_dtype)
        config.fan_in_fan_out = new.fan_in_fan_out  # PEFT corrects the config in place, with the warning
        if adapter_name not in self.active_adapters:
            new.set_adapter(self.active_adapters)
        setattr(parent, child, new)
        replaced.append((parent, child, target))

    def _mark_only_adapters_as_trainable(self) -> None:
        """Freeze all but adapter weights (and wrapped modules_to_save); then biases per the active config."""
        keep = {id(p) for layer in self.lora_layers() for p in [*layer.lora_A.parameters(),
                                                                 *layer.lora_B.parameters()]}
        keep.update(id(p) for wrapper in self._wrappers() for p in wrapper.parameters())  # they manage their own
        for p in self.model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
        for name in self.active_adapters:
            bias = self.peft_config[name].bias if name in self.peft_config else "none"
            if bias == "all":
                for pname, p in self.model.named_parameters():
                    if pname == "bias" or pname.endswith(".bias"):
                        p.requires_grad_(True)
            elif bias == "lora_only":
                for layer in self.lora_layers():
                    if layer.base_layer.bias is not None:
                        layer.base_layer.bias.requires_grad_(True)

    # -------------------------------------------------------------- switching
    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Activate one adapter or (list) several, whose outputs are summed; unmerges merged layers first."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._require_adapters(names)
        for layer in self.lora_layers():
            if layer.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                layer.unmerge()
            layer.set_adapter(names, inference_mode=inference_mode)
        for wrapper in self._wrappers():
            wrapper.set_adapter([n for n in names if n in wrapper.modules_to_save], inference_mode)
        self.active_adapter = adapter_name

    def _set_adapter_layers(self, enabled: bool) -> None:
        for module in list(self.lora_layers()) + list(self._wrappers()):
            module.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        """Re-enable every adapter layer."""
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        """Disable every adapter layer (output = base model unless a bias was trained)."""
        for name in self.active_adapters:
            bias = self.peft_config[name].bias
            if bias != "none":
                warnings.warn(f"Careful, disabling adapter layers with bias configured to be '{bias}' does not "
                              "produce the same output as the base model would without adaption.")
        self._set_adapter_layers(False)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` everywhere; it must not be merged."""
        self._require_adapters([adapter_name])
        merged = sorted({a for layer in self.lora_layers() for a in layer.merged_adapters} & {adapter_name})
        if merged:
            raise ValueError(f"Cannot delete adapter(s) {merged} while they are merged. Please unmerge them first.")
        del self.peft_config[adapter_name]
        new_active: Optional[list[str]] = None
        for layer in self.lora_layers():
            layer.delete_adapter(adapter_name)
            if new_active is None:
                new_active = layer.active_adapters
        new_active = new_active or []
        for wrapper in self._wrappers():
            wrapper.delete_adapter(adapter_name, new_active)
        self.active_adapter = new_active[0] if len(new_active) == 1 else new_active

    # ------------------------------------------------------------------ merging
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """W += s·B·A in every layer for the given (default: active) adapters; LoRA weights kept."""
        if adapter_names is not None:
            self._require_adapters(list(adapter_names))
        for layer in self.lora_layers():
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        """Undo `merge_adapter` in every layer."""
        for layer in self.lora_layers():
            layer.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Merge, then replace every adapter layer by its base layer; returns the plain model."""
        return self._unload_and_optionally_merge(True, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Remove all adapters without merging; returns the plain (original) model."""
        return self._unload_and_optionally_merge(False)

    def _unload_and_optionally_merge(self, merge: bool, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None) -> nn.Module:
        if merge and adapter_names is not None:
            self._require_adapters(list(adapter_names))
        keys = [k for k, m in self.model.named_modules() if isinstance(m, (LoraLinear, ModulesToSaveWrapper))]
        for key in keys:
            try:
                target = self.model.get_submodule(key)
            except AttributeError:  # inside a module replaced earlier in this loop
                continue
            parent, child = _submodule_parent(self.model, key)
            if isinstance(target, LoraLinear):
                if merge:
                    target.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                elif target.merged:
                    target.unmerge()
                setattr(parent, child, target.get_base_layer())
            else:
                setattr(parent, child, target.unwrapped())
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    # --------------------------------------------------------- weighted adapter
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None,
                             svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                             svd_driver: Optional[str] = None) -> None:
        """PEFT's add_weighted_adapter for "linear", "cat" and "svd"; the new adapter is not activated."""
        if adapter_name in self.peft_config:
            return
        combination_type, new_rank, targets = self._check_add_weighted_adapter(adapters, combination_type,
                                                                               svd_rank)
        self.peft_config[adapter_name] = replace(self.peft_config[adapters[0]], r=new_rank, lora_alpha=new_rank,
                                                 target_modules=targets, alpha_pattern={}, rank_pattern={})
        self.inject_adapter(self.model, adapter_name, activate=False)
        for layer in self.lora_layers():
            if adapter_name not in layer.lora_A:
                continue
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
            if not present:
                raise ValueError("No matching LoRAs found. Please raise an issue on GitHub.")
            new_a, new_b = _combine(layer, present, combination_type, new_rank, svd_clamp, svd_full_matrices,
                                    svd_driver)
            target_a, target_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            target_a.data = torch.zeros_like(target_a.data)
            target_b.data = torch.zeros_like(target_b.data)
            target_a.data[: new_a.shape[0], :] = new_a.to(target_a.dtype)
            target_b.data[:, : new_b.shape[1]] = new_b.to(target_b.dtype)
            target_a.requires_grad_(False)
            target_b.requires_grad_(False)

    def _check_add_weighted_adapter(self, adapters: list[str], combination_type: str,
                                    svd_rank: Optional[int]) -> tuple[str, int, Union[str, set[str]]]:
        self._require_adapters(list(adapters))
        for wrapper in self._wrappers():
            if sum(a in wrapper.modules_to_save for a in adapters) > 1:
                raise ValueError("Cannot add weighted adapters if they target the same module with "
                                 "modules_to_save.")
        combination_type = "linear" if len(adapters) == 1 else combination_type
        if combination_type not in _COMBINATIONS:
            raise ValueError(f"Invalid combination_type: {combination_type} (lorafuse supports {_COMBINATIONS})")
        configs = [self.peft_config[a] for a in adapters]
        ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
        if combination_type == "linear":
            if len(set(ranks)) != 1:
                raise ValueError("All adapters must have the same r value when using combination_type linear, "
                                 "ties, dare_ties or dare_linear.")
            new_rank = ranks[0]
        elif combination_type == "cat":
            new_rank = sum(ranks)
        else:
            new_rank = svd_rank or max(ranks)
        kinds = {type(c.target_modules) for c in configs}
        if len(kinds) > 1:
            raise ValueError("all adapter configs should follow the same target modules type. Combining adapters "
                             "with `target_modules` type being a mix of list/set and string is not supported.")
        if kinds == {str}:
            return combination_type, new_rank, "|".join(f"({c.target_modules})" for c in configs)
        return combination_type, new_rank, set().union(*(c.target_modules for c in configs))


def _combine(layer: LoraLinear, present: list[tuple[str, float]], kind: str, new_rank: int,
             svd_clamp: Optional[float], full_matrices: bool,
             driver: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """New (A, B) for one layer from [(adapter, weight)] exactly as PEFT combines them."""
    if kind == "cat":
        a = torch.cat([layer.lora_A[n].weight.data * w * layer.scaling[n] for n, w in present], dim=0)
        b = torch.cat([layer.lora_B[n].weight.data for n, _ in present], dim=1)
        return a, b
    if kind == "linear":
        a = b = None
        for n, w in present:
            ws = w * layer.scaling[n]
            sign = 1 if ws >= 0 else -1
            term_a = layer.lora_A[n].weight.data * (abs(ws) ** 0.5 * sign)
            term_b = layer.lora_B[n].weight.data * abs(ws) ** 0.5
            a = term_a if a is None else a + term_a
            b = term_b if b is None else b + term_b
        return a, b
    delta = sum(layer.get_delta_weight(n) * w for n, w in present)
    if layer.fan_in_fan_out:
        delta = delta.T
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    u = u[:, :new_rank] @ torch.diag(s[:new_rank])
    vh = vh[:new_rank, :]
    if svd_clamp is not None:
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), svd_clamp)
        u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
    return vh, u


class PeftModel(nn.Module):
    """PEFT's `PeftModel` for LoRA: ``self.base_model`` is the `LoraModel`; attributes pass through."""

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        heads = _TASK_HEADS.get(peft_config.task_type)
        if heads:
            if peft_config.modules_to_save is None:
                peft_config.modules_to_save = list(heads)
            else:
                peft_config.modules_to_save.extend(heads)
        self.base_model = LoraModel(model, peft_config, adapter_name, autocast_adapter_dtype)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def peft_type(self) -> str:
        return "LORA"

    def get_base_model(self) -> nn.Module:
        """The user's model (with adapter layers in it)."""
        return self.base_model.model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_base_model().generate(*args, **kwargs)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, adapter weights included in "all" (PEFT)."""
        trainable = total = 0
        for _, param in self.named_parameters():
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print PEFT's exact line: ``trainable params: … || all params: … || trainable%: …``."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: run the base model (adapter layers disabled), re-enabled on exit."""
        try:
            self.base_model.disable_adapter_layers()
            yield
        finally:
            self.base_model.enable_adapter_layers()

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, autocast_adapter_dtype: bool = True) -> None:
        """Inject a new adapter (not activated, frozen); the name must be new."""
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
        if adapter_name in LoraModel.prefix:
            warnings.warn(f"Adapter name '{adapter_name}' should not be contained in the prefix "
                          f"'{LoraModel.prefix}'. This may lead to reinitialization of the adapter weights during "
                          "loading.")
        if getattr(peft_config, "peft_type", None) != "LORA":
            raise ValueError(f"Cannot combine adapters with different peft types. Found LORA and "
                             f"{getattr(peft_config, 'peft_type', type(peft_config).__name__)}.")
        self.peft_config[adapter_name] = peft_config
        try:
            self.base_model.inject_adapter(self.base_model.model, adapter_name, activate=False,
                                           autocast_adapter_dtype=autocast_adapter_dtype)
        except Exception:
            self.peft_config.pop(adapter_name, None)
            raise

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Activate one adapter (trainable unless inference_mode)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} not found.")
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter (error if missing or merged)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        self.base_model.delete_adapter(adapter_name)

    # adapter files: implemented by lorafuse.io (owned separately)
    def save_pretrained(self, save_directory: str, selected_adapters: Optional[list[str]] = None,
                        **kwargs: Any) -> None:
        """Write adapter_config.json + adapter_model.safetensors per adapter (PEFT's layout)."""
        from . import io

        io.save_pretrained(self, save_directory, selected_adapters, **kwargs)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, **kwargs: Any) -> Any:
        """Load a saved adapter under ``adapter_name`` (not activated)."""
        from . import io

        return io.load_adapter(self, model_id, adapter_name, is_trainable, **kwargs)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, **kwargs: Any) -> "PeftModel":
        """Wrap ``model`` with the adapter saved in ``model_id``."""
        from . import io

        return io.from_pretrained(cls, model, model_id, adapter_name, is_trainable, **kwargs)


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                   autocast_adapter_dtype: bool = True) -> PeftModel:
    """PEFT's `get_peft_model` for LoRA: modifies ``model`` in place and wraps it in a `PeftModel`.

    autocast_adapter_dtype: as in PEFT, fp16/bf16 models get float32 adapters; pass False to
    keep them in the model's dtype (then half-precision layers can run on fused kernels).
    """
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"peft_config must be a lorafuse LoraConfig, got {type(peft_config).__name__}")
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        warnings.warn("You are trying to modify a model with PEFT for a second time. If you want to reload the "
                      "model with a different config, make sure to call `.unload()` before.")
    if adapter_name in LoraModel.prefix:
        warnings.warn(f"Adapter name '{adapter_name}' should not be contained in the prefix '{LoraModel.prefix}'.")
    old_name = peft_config.base_model_name_or_path
    new_name = model.__dict__.get("name_or_path", None) or None  # "" (from-config models) is no Hub id
    peft_config.base_model_name_or_path = new_name
    if old_name is not None and old_name != new_name:
        warnings.warn(f"The PEFT config's `base_model_name_or_path` was renamed from '{old_name}' to '{new_name}'. "
                      "Please ensure that the correct base model is loaded when loading this checkpoint.")
    return PeftModel(model, peft_config, adapter_name, autocast_adapter_dtype)
