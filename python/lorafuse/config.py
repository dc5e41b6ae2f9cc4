"""`LoraConfig`: PEFT's LoRA configuration, field for field, validated on construction.

The field names, defaults and `adapter_config.json` keys are PEFT's (peft 0.21), so that
``from peft import LoraConfig`` can become ``from lorafuse import LoraConfig``. PEFT options
that lorafuse does not implement (DoRA, LoftQ, ...) are not constructor arguments; when a
PEFT file carries them, `LoraConfig.from_dict` keeps them (and writes them back out
unchanged) and warns if their value would change the model.
"""

from __future__ import annotations

import copy
import enum
import math
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

__all__ = ["LoraConfig", "TaskType", "PEFT_ONLY_DEFAULTS"]


class TaskType(str, enum.Enum):
    """PEFT's task types (`peft.TaskType`); the value is what `adapter_config.json` stores."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


# Keys PEFT 0.21 writes to adapter_config.json for options lorafuse does not implement,
# with PEFT's defaults. A loaded value equal to the default is harmless; any other value is
# kept for the round trip but warned about, since the adapter would not behave as in PEFT.
PEFT_ONLY_DEFAULTS: dict[str, Any] = {
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "use_dora": False,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "monteclora_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}

_BIAS_MODES = ("none", "all", "lora_only")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_harmless(value: Any, default: Any) -> bool:
    """A PEFT-only key's value that leaves the model as lorafuse builds it (its default, or empty)."""
    return value == default or (not value and not default)


def _as_name_set(value: Any, name: str) -> Union[str, set[str], None]:
    """None, a regex string, or any iterable of module names (returned as a set, as PEFT does)."""
    if value is None or isinstance(value, str):
        return value
    try:
        names = set(value)
    except TypeError:
        raise ValueError(f"{name} must be None, a string or a list of strings, got {value!r}") from None
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{name} must contain non-empty strings only, got {sorted(map(repr, names))}")
    return names


@dataclass
class LoraConfig:
    """Configuration of a LoRA adapter, with PEFT's names and defaults.

    Adapter weights per targeted layer: ``A`` (r, in_features), ``B`` (out_features, r);
    the layer computes ``y = base(x) + scaling · B(A(dropout(x)))`` with
    ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` when ``use_rslora``).

    target_modules: list → a module whose full name equals an entry or ends with
    ``"." + entry``; str → ``re.fullmatch`` against the full name; ``"all-linear"`` → every
    Linear/Conv1D except the output head; None → PEFT's default for the model type.
    """

    task_type: Optional[Union[str, TaskType]] = None
    peft_type: str = "LORA"
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    r: int = 8
    target_modules: Optional[Union[list[str], set[str], str]] = None
    exclude_modules: Optional[Union[list[str], set[str], str]] = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # PEFT-only keys read from a file (see PEFT_ONLY_DEFAULTS); not a PEFT field.
    peft_extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.peft_type != "LORA":
            raise ValueError(f"peft_type must be 'LORA', got {self.peft_type!r}")
        if self.task_type is not None:
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                raise ValueError(
                    f"task_type must be one of {[t.value for t in TaskType]} or None, got {self.task_type!r}"
                ) from None
        if not _is_int(self.r) or self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r!r}")
        if not _is_real(self.lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {self.lora_alpha!r}")
        if not _is_real(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in _BIAS_MODES:
            raise ValueError(f"bias must be one of {_BIAS_MODES}, got {self.bias!r}")
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights == "gaussian"):
            raise ValueError(
                f"init_lora_weights must be True, False or 'gaussian' (other PEFT initialisations are not "
                f"supported by lorafuse), got {self.init_lora_weights!r}"
            )
        for flag in ("fan_in_fan_out", "use_rslora", "inference_mode"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        self.target_modules = _as_name_set(self.target_modules, "target_modules")
        self.exclude_modules = _as_name_set(self.exclude_modules, "exclude_modules")
        self._check_modules_to_save()
        self._check_layers()
        self._check_patterns()

    def _check_modules_to_save(self) -> None:
        if self.modules_to_save is None:
            return
        if isinstance(self.modules_to_save, str):
            raise ValueError(f"modules_to_save must be a list of module names, got the string {self.modules_to_save!r}")
        self.modules_to_save = list(self.modules_to_save)
        if not all(isinstance(m, str) and m for m in self.modules_to_save):
            raise ValueError(f"modules_to_save must contain non-empty strings only, got {self.modules_to_save!r}")

    def _check_layers(self) -> None:
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        pat = self.layers_pattern
        if pat is not None and not (isinstance(pat, str) or
                                    (isinstance(pat, (list, tuple)) and all(isinstance(p, str) for p in pat))):
            raise ValueError(f"layers_pattern must be a str or a list of str, got {pat!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        layers = self.layers_to_transform
        if layers is not None:
            items = [layers] if _is_int(layers) else layers
            if not isinstance(items, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in items):
                raise ValueError(f"layers_to_transform must be a non-negative int or a list of them, got {layers!r}")
            if isinstance(layers, tuple):
                self.layers_to_transform = list(layers)

    def _check_patterns(self) -> None:
        for name, check, what in (("rank_pattern", lambda v: _is_int(v) and v > 0, "positive ints"),
                                  ("alpha_pattern", _is_real, "finite numbers")):
            pattern = getattr(self, name)
            if pattern is None:
                setattr(self, name, {})
                continue
            if not isinstance(pattern, dict) or not all(isinstance(k, str) and check(v) for k, v in pattern.items()):
                raise ValueError(f"{name} must map module-name patterns to {what}, got {pattern!r}")

    @property
    def scaling(self) -> float:
        """``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA) for modules without a pattern override."""
        return self.scale_for(self.r, self.lora_alpha)

    def scale_for(self, r: int, alpha: float) -> float:
        """Scaling of a layer with rank ``r`` and ``alpha`` (PEFT: ``alpha / r`` or ``alpha / sqrt(r)``)."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        """The dict PEFT's `LoraConfig.to_dict()` gives (sets as sorted lists, enums as strings).

        `adapter_config.json` is ``json.dumps(config.to_dict(), indent=2, sort_keys=True)``.
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "peft_extra":
                continue
            value = copy.deepcopy(getattr(self, f.name))
            if isinstance(value, set):
                value = sorted(value)
            if isinstance(value, TaskType):
                value = value.value
            out[f.name] = value
        for key, default in PEFT_ONLY_DEFAULTS.items():
            out[key] = copy.deepcopy(self.peft_extra.get(key, default))
        for key, value in self.peft_extra.items():
            out.setdefault(key, copy.deepcopy(value))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraConfig":
        """Build from an `adapter_config.json` dict; never fails on keys PEFT knows and lorafuse doesn't.

        Such keys are kept in ``peft_extra`` (so `to_dict` writes them back); a warning names
        those whose value differs from PEFT's default. Keys PEFT itself does not know
        (written by a newer PEFT) are kept too, with a warning.
        """
        d = dict(d)
        d.pop("runtime_config", None)  # PEFT never saves it
        own = {f.name for f in fields(cls)} - {"peft_extra"}
        extra = {k: d.pop(k) for k in list(d) if k not in own}
        changed = sorted(k for k, v in extra.items() if not _is_harmless(v, PEFT_ONLY_DEFAULTS.get(k)))
        if changed:
            warnings.warn(
                f"lorafuse ignores these adapter_config keys, which it does not support: {changed}; "
                "the adapter may not behave as it does in PEFT."
            )
        if str(d.get("peft_type", "LORA")).split(".")[-1] == "LORA":
            d["peft_type"] = "LORA"
        return cls(**d, peft_extra=extra)
