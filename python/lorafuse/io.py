"""Save and load LoRA adapters in Hugging Face PEFT's on-disk format.

A directory holds ``adapter_config.json`` (PEFT's keys, ``peft_type: "LORA"``,
``inference_mode: true``) and ``adapter_model.safetensors`` (PEFT's tensor names,
``base_model.model.<module>.lora_A.weight``, adapter name removed, metadata
``{"format": "pt"}``).  Adapters other than ``"default"`` live in ``<dir>/<name>/``.

Writing is atomic per file: a temporary file in the same directory, flush + fsync,
``os.replace``, fsync of the directory.  The weights are written before the config, so an
interrupted save leaves every file under its final name either complete-new or
complete-old (a killed process may leave a hidden ``.adapter_*.tmp`` file behind; loaders
ignore it).

Loading is all-or-nothing.  :func:`lorafuse.io_validate.read_adapter_dir` validates the
files on their own; then the tensor names and shapes are compared with the ones the model
would get (target modules found in the base model, rank per ``rank_pattern``, base
in/out features), and only then is the model mutated (``add_adapter`` + copy).  If anything
fails after the mutation the adapter is deleted again.  Nothing is ever unpickled.

The model side is lorafuse's ``PeftModel`` (``peft_config``, ``get_base_model()``,
``add_adapter``/``delete_adapter``/``unload``, `LoraLinear` layers holding
``lora_A[name]``/``lora_B[name]``, `ModulesToSaveWrapper`), whose structure and state-dict
keys are PEFT's.  LoRA on Linear and GPT-2 ``Conv1D`` layers is supported; files with
other PEFT features (embedding LoRA, DoRA, ``lora_bias``) are refused before the model is
touched, because their tensors have no place in the model.
"""

from __future__ import annotations

import copy
import enum
import json
import os
import re
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from .io_validate import (
    ALL_LINEAR,
    CONFIG_NAME,
    KEY_PREFIX,
    WEIGHTS_NAME,
    AdapterFileError,
    AdapterFiles,
    read_adapter_dir,
)
from .tuners_utils import check_target_module_exists, get_pattern_key, is_conv1d, linear_module_names

__all__ = ["AdapterFileError", "save_pretrained", "load_adapter", "from_pretrained", "adapter_state_dict"]

#: Per-adapter containers of a LoRA layer, as PEFT names them.
LORA_CONTAINERS = ("lora_A", "lora_B")


# --------------------------------------------------------------------------- model structure


def _is_lora_layer(module: nn.Module) -> bool:
    return isinstance(getattr(module, "lora_A", None), nn.ModuleDict)


def _is_saved_wrapper(module: nn.Module) -> bool:
    return isinstance(getattr(module, "modules_to_save", None), nn.ModuleDict) and hasattr(module, "original_module")


def _unwrap(module: nn.Module) -> nn.Module:
    """The plain module under LoRA layers and modules_to_save wrappers."""
    while True:
        if _is_lora_layer(module) and hasattr(module, "base_layer"):
            module = module.base_layer
        elif _is_saved_wrapper(module):
            module = module.original_module
        else:
            return module


def _outer_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` without the insides of LoRA layers and modules_to_save wrappers."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s) for s in skip):
            continue
        if _is_lora_layer(module) or _is_saved_wrapper(module):
            skip.append(name + ".")
        yield name, module


def _mentions_adapter(key: str, names: Sequence[str]) -> bool:
    """PEFT's filter: does a state-dict key belong to one of the adapters ``names``?"""
    return any(f".{n}." in key or key.endswith(f".{n}") for n in names)


def _strip_adapter_name(key: str, name: str) -> str:
    """PEFT's ``_remove_adapter_name_from_state_dict_key``."""
    if key.endswith(f".{name}"):
        return key[: -len(name) - 1]
    head, _, suffix = key.rpartition(".")
    return f"{re.sub(re.escape(f'.{name}') + '$', '', head)}.{suffix}"


def _lora_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """LoRA parameters of adapter ``name`` under PEFT's file names (live tensors)."""
    out: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if not _is_lora_layer(module):
            continue
        for container in LORA_CONTAINERS:
            entries = getattr(module, container)
            if name in entries:
                for param_name, param in entries[name].named_parameters():
                    out[f"{path}.{container}.{param_name}"] = param
    return out


def _saved_module_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """modules_to_save copies of adapter ``name``: ``X.modules_to_save.<name>.w`` -> ``X.w``."""
    return {
        f"{path}.{key}": tensor
        for path, module in model.named_modules()
        if _is_saved_wrapper(module) and name in module.modules_to_save
        for key, tensor in module.modules_to_save[name].state_dict(keep_vars=True).items()
    }


def _bias_tensors(model: nn.Module, name: str, bias: str) -> dict[str, torch.Tensor]:
    """Biases PEFT saves for ``bias="all"`` / ``"lora_only"`` (none for ``"none"``)."""
    if bias == "lora_only":
        return {
            f"{path}.base_layer.bias": module.base_layer.bias
            for path, module in model.named_modules()
            if _is_lora_layer(module) and getattr(module.base_layer, "bias", None) is not None
        }
    if bias != "all":
        return {}
    others = [n for n in model.peft_config if n != name]
    return {
        _strip_adapter_name(key, name): tensor
        for key, tensor in model.state_dict(keep_vars=True).items()
        if (key == "bias" or key.endswith(".bias")) and not _mentions_adapter(key, others)
    }


def adapter_state_dict(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors PEFT's ``get_peft_model_state_dict`` selects, keyed as in the file.

    The values are the model's live parameters (not copies): loading writes into them.
    """
    config = peft_model.peft_config[adapter_name]
    out = _bias_tensors(peft_model, adapter_name, getattr(config, "bias", "none"))
    out.update(_lora_tensors(peft_model, adapter_name))
    out.update(_saved_module_tensors(peft_model, adapter_name))
    return out


# --------------------------------------------------------------------------- saving


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same dir, fsync, replace, fsync dir."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; PEFT's files are ordinary 0644 files
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _file_tensors(live: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous, non-aliased CPU copies; refuses non-finite values."""
    out = {key: t.detach().to("cpu", copy=True).contiguous() for key, t in live.items()}
    bad = sorted(key for key, t in out.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if bad:
        raise AdapterFileError(f"refusing to save non-finite (NaN/inf) tensors: {bad}")
    return out


def _plain(value: Any) -> Any:
    """JSON-ready value: enums to their value, sets to sorted lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value


def config_to_json(peft_model: nn.Module, adapter_name: str) -> str:
    """``adapter_config.json`` text as PEFT's ``save_pretrained`` writes it."""
    config = {k: _plain(v) for k, v in peft_model.peft_config[adapter_name].to_dict().items()}
    config.pop("runtime_config", None)
    config["inference_mode"] = True
    base = peft_model.get_base_model()
    name_or_path = config.get("base_model_name_or_path") or getattr(base, "name_or_path", None)
    config["base_model_name_or_path"] = name_or_path or None
    if config.get("task_type") is None:
        config["auto_mapping"] = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
    return json.dumps(config, indent=2, sort_keys=True)


def save_pretrained(
    peft_model: nn.Module,
    save_directory: str,
    selected_adapters: Optional[Sequence[str]] = None,
    safe_serialization: bool = True,
    is_main_process: bool = True,
) -> None:
    """Write adapters in PEFT's layout: ``default`` in ``save_directory``, others in ``save_directory/<name>``.

    ``safe_serialization`` and ``is_main_process`` are PEFT's arguments: pickles are never
    written (False is refused), and only the main process writes (in distributed runs).

    Raises:
        ValueError: unknown adapter names, ``save_directory`` is a file, ``safe_serialization=False``,
            or non-finite weights.
    """
    from safetensors.torch import save as safetensors_save

    if not safe_serialization:
        raise ValueError("safe_serialization=False would write a pickle (adapter_model.bin); lorafuse writes "
                         "only safetensors, which PEFT reads too")
    save_directory = os.fspath(save_directory)
    names = list(peft_model.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = sorted(set(names) - set(peft_model.peft_config))
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; the model has {sorted(peft_model.peft_config)}")
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {save_directory} is a file, not a directory")
    payloads = {
        name: (
            safetensors_save(_file_tensors(adapter_state_dict(peft_model, name)), metadata={"format": "pt"}),
            config_to_json(peft_model, name),
        )
        for name in names
    }
    if not is_main_process:
        return
    for name, (weights, config) in payloads.items():
        directory = save_directory if name == "default" else os.path.join(save_directory, name)
        os.makedirs(directory, exist_ok=True)
        atomic_write(os.path.join(directory, WEIGHTS_NAME), weights)
        atomic_write(os.path.join(directory, CONFIG_NAME), config.encode("utf-8"))


# --------------------------------------------------------------------------- expected tensors


def _lora_shapes(path: str, module: nn.Module, rank: int, config: Any) -> dict[str, tuple[int, ...]]:
    """File tensors (name -> shape) a LoRA on ``module`` has; refuses module types LoRA cannot wrap."""
    key = KEY_PREFIX + path
    if isinstance(module, nn.Linear):
        out_f, in_f = module.weight.shape
    elif is_conv1d(module):
        in_f, out_f = module.weight.shape
    else:
        raise AdapterFileError(
            f"target module {path} is a {type(module).__name__}; lorafuse's LoRA wraps only Linear and Conv1D"
        )
    shapes = {f"{key}.lora_A.weight": (rank, in_f), f"{key}.lora_B.weight": (out_f, rank)}
    if config.bias == "lora_only" and getattr(module, "bias", None) is not None:
        shapes[f"{key}.base_layer.bias"] = tuple(module.bias.shape)
    return shapes


def _resolve_all_linear(base: nn.Module, config: Any) -> Any:
    """A copy of ``config`` with PEFT's ``"all-linear"`` shorthand expanded to module names."""
    targets = config.target_modules
    if not (isinstance(targets, str) and targets.lower() == ALL_LINEAR):
        return config
    resolved = copy.copy(config)
    resolved.target_modules = linear_module_names(base, config)
    return resolved


def expected_tensors(base: nn.Module, config: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor (file name -> shape) an adapter with ``config`` on ``base`` has.

    ``bias="all"`` biases are not predicted here (their names depend on how other adapters
    wrapped the model); they are checked exactly after injection.

    Raises:
        AdapterFileError: no module matches target_modules, or a target cannot hold a LoRA.
    """
    config = _resolve_all_linear(base, config)
    saved = list(config.modules_to_save or [])
    shapes: dict[str, tuple[int, ...]] = {}
    matched = 0
    for name, module in _outer_modules(base):
        plain = _unwrap(module)
        if saved and name and any(name.endswith(m) for m in saved):
            shapes.update({f"{KEY_PREFIX}{name}.{k}": tuple(t.shape) for k, t in plain.state_dict().items()})
        elif name and check_target_module_exists(config, name):
            pattern = get_pattern_key(config.rank_pattern or {}, name)
            rank = config.rank_pattern[pattern] if pattern is not None else config.r
            shapes.update(_lora_shapes(name, plain, rank, config))
            matched += 1
    if not matched:
        raise AdapterFileError(
            f"Target modules {_plain(config.target_modules)} not found in the base model {type(base).__name__}"
        )
    return shapes


def _is_free_bias(key: str) -> bool:
    """A ``bias="all"`` key, i.e. a bias that is not part of a LoRA container."""
    return key.endswith(".bias") and not any(f".{c}." in key for c in LORA_CONTAINERS)


def _canonical_bias(key: str) -> str:
    """A bias key without the wrapper segments PEFT inserts (``base_layer`` etc.)."""
    return re.sub(r"\.(base_layer|original_module|modules_to_save)(?=\.)", "", key)


def expected_biases(base: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every bias of ``base`` (``bias="all"``), keyed canonically as :func:`_canonical_bias` does."""
    return {
        f"{KEY_PREFIX}{name}.bias": tuple(plain.bias.shape)
        for name, module in _outer_modules(base)
        for plain in [_unwrap(module)]
        if "bias" in dict(plain.named_parameters(recurse=False))
    }


def check_tensors(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                  directory: str) -> None:
    """Compare the file's tensor shapes with ``expected``; one error lists every difference."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [
        f"{k}: file {list(found[k])} vs model {list(expected[k])}"
        for k in sorted(set(found) & set(expected))
        if tuple(found[k]) != tuple(expected[k])
    ]
    problems = [
        f"{label} ({len(items)}): {items}"
        for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                             ("shape mismatches", mismatched))
        if items
    ]
    if problems:
        raise AdapterFileError(f"{directory} does not fit this model: " + "; ".join(problems))


def check_against_base(base: nn.Module, config: Any, files: AdapterFiles) -> None:
    """Everything about the file that the un-mutated base model can tell (names, shapes, ranks).

    ``bias="all"`` biases are compared by their canonical names (how other adapters wrapped
    the model changes their keys); they are checked exactly after injection.
    """
    found = {k: info.shape for k, info in files.tensors.items()}
    if config.bias == "all":
        biases = {_canonical_bias(k): found.pop(k) for k in list(found) if _is_free_bias(k)}
        check_tensors(expected_biases(base), biases, files.directory)
    try:
        expected = expected_tensors(base, config)
    except AdapterFileError as exc:
        raise AdapterFileError(f"{files.directory}: {exc}") from None
    if config.bias == "all":
        expected = {k: v for k, v in expected.items() if not _is_free_bias(k)}
    check_tensors(expected, found, files.directory)


# --------------------------------------------------------------------------- loading


def _plan(base: nn.Module, config: Any, files: AdapterFiles) -> dict[str, torch.Tensor]:
    """Check the files against ``base`` without mutating anything; return the tensors to load."""
    from safetensors.torch import load as safetensors_load

    check_against_base(base, config, files)
    return safetensors_load(files.weights)


def _fill(peft_model: nn.Module, adapter_name: str, files: AdapterFiles, tensors: Mapping[str, torch.Tensor],
          is_trainable: bool) -> None:
    """Exact key/shape check against the injected adapter, then copy the weights in."""
    live = adapter_state_dict(peft_model, adapter_name)
    found = {k: info.shape for k, info in files.tensors.items()}
    check_tensors({k: tuple(v.shape) for k, v in live.items()}, found, files.directory)
    with torch.no_grad():
        for key, target in live.items():
            target.copy_(tensors[key])
    trainable = {**_lora_tensors(peft_model, adapter_name), **_saved_module_tensors(peft_model, adapter_name)}
    for tensor in trainable.values():
        if isinstance(tensor, nn.Parameter):
            tensor.requires_grad_(is_trainable)


def _wrapper_paths(model: nn.Module) -> set[str]:
    """Paths of the LoRA layers and modules_to_save wrappers in ``model``."""
    return {name for name, module in model.named_modules() if _is_lora_layer(module) or _is_saved_wrapper(module)}


def _unwrap_new(model: nn.Module, keep: set[str]) -> None:
    """Put back the original module wherever a wrapper not in ``keep`` was inserted."""
    for name in sorted(_wrapper_paths(model) - keep, key=len, reverse=True):
        parent_name, _, child = name.rpartition(".")
        wrapper = model.get_submodule(name)
        original = wrapper.base_layer if _is_lora_layer(wrapper) else wrapper.original_module
        setattr(model.get_submodule(parent_name), child, original)


def _grad_flags(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    return [(param, param.requires_grad) for param in model.parameters()]


@contextmanager
def _undo_on_error(flags: list[tuple[nn.Parameter, bool]], undo: Callable[[], None]) -> Iterator[None]:
    """On any exception: run ``undo``, then restore the ``requires_grad`` flags saved in ``flags``."""
    try:
        yield
    except BaseException:
        undo()
        for param, flag in flags:
            param.requires_grad_(flag)
        raise


def load_adapter(peft_model: nn.Module, model_id_dir: str, adapter_name: str, is_trainable: bool = False) -> None:
    """Validate the directory completely, then add it to ``peft_model`` as ``adapter_name``.

    The adapter is added but not activated (PEFT's behaviour).  On any error the model is
    left exactly as it was.

    Raises:
        AdapterFileError: naming the problem (see :mod:`lorafuse.io_validate`).
    """
    if adapter_name in peft_model.peft_config:
        raise AdapterFileError(f"adapter {adapter_name!r} already exists; delete it first or pick another name")
    files = read_adapter_dir(model_id_dir)
    config = files.lora_config
    config.inference_mode = not is_trainable
    tensors = _plan(peft_model.get_base_model(), config, files)
    wrapped_before = _wrapper_paths(peft_model)

    def undo() -> None:
        if adapter_name in peft_model.peft_config:
            peft_model.delete_adapter(adapter_name)
        _unwrap_new(peft_model, wrapped_before)

    with _undo_on_error(_grad_flags(peft_model), undo):
        peft_model.add_adapter(adapter_name, config)
        _fill(peft_model, adapter_name, files, tensors, is_trainable)


def from_pretrained(
    cls: type,
    model: nn.Module,
    model_id_dir: str,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> nn.Module:
    """Wrap ``model`` in ``cls`` with the adapter saved in ``model_id_dir``.

    ``cls(model, config, adapter_name=adapter_name)`` builds the wrapper (as PEFT's
    ``PeftModel`` does).  Unless ``is_trainable``, every parameter is frozen and the model
    is put in eval mode.  Everything is validated before ``model`` is modified; if loading
    fails afterwards, the wrapper is unloaded and the ``requires_grad`` flags restored.
    """
    files = read_adapter_dir(model_id_dir)
    config = files.lora_config
    config.inference_mode = not is_trainable
    tensors = _plan(model, config, files)
    flags = _grad_flags(model)
    with _undo_on_error(flags, lambda: None):
        peft_model = cls(model, config, adapter_name=adapter_name)

    def undo() -> None:
        peft_model.delete_adapter(adapter_name)
        peft_model.unload()

    with _undo_on_error(flags, undo):
        _fill(peft_model, adapter_name, files, tensors, is_trainable)
    if not is_trainable:
        peft_model.requires_grad_(False)
        peft_model.eval()
    return peft_model
