"""Model-independent validation of PEFT LoRA adapter directories (no torch needed).

Everything an adapter directory can get wrong on its own is checked here, before any
model is touched: the config JSON (for LoRA: ``peft_type``, the types and ranges of ``r``,
``lora_alpha``, ``lora_dropout``, ``rank_pattern``/``alpha_pattern``, ``target_modules``, and
regular expressions that could hang PEFT's module matcher), the safetensors header (length cap, ``N + 8 <= size``,
duplicate keys, NUL bytes, dtype set), the payload (parsed by the ``safetensors``
package itself, never by hand), finiteness, and the LoRA rank of every ``lora_A`` /
``lora_B`` pair against ``r`` / ``rank_pattern``.

Nothing is ever unpickled: a directory that only holds ``adapter_model.bin`` (or
``.pt``/``.pth``) is refused with an explanation (see ``reliability.md`` §2:
``torch.load(weights_only=True)`` has had remote-code-execution CVEs).

Regular-expression policy.  ``target_modules`` (as a string), ``exclude_modules`` (as a
string), ``layers_pattern``, ``modules_to_save`` entries and ``rank_pattern`` /
``alpha_pattern`` keys are regular expressions that PEFT matches against every module
name.  Python's ``re`` has no time limit and does not release the GIL, so a hostile
pattern such as ``(a+)+$`` would hang the loader.  Each such pattern is parsed with
``re``'s own parser and refused when it is longer than :data:`MAX_PATTERN_LEN`, uses a
back-reference, nests a repetition or an alternation inside a repetition (the shapes
with exponential backtracking), or has more than
:data:`MAX_UNBOUNDED_REPEATS` unbounded repetitions (bounding polynomial backtracking
on module names of ~100 characters).  Every pattern PEFT itself writes
(e.g. ``.*\\.(q_proj|v_proj)``) passes.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Optional

import numpy as np

try:  # Python >= 3.11
    from re import _constants as _sre_constants
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.9 / 3.10
    import sre_constants as _sre_constants  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
KEY_PREFIX = "base_model.model."

MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20
MAX_PATTERN_LEN = 256
MAX_UNBOUNDED_REPEATS = 3

#: safetensors dtype -> (numpy view used for the finiteness check, exponent mask).
FLOAT_DTYPES: Mapping[str, tuple[type, int]] = {
    "F64": (np.uint64, 0x7FF0000000000000),
    "F32": (np.uint32, 0x7F800000),
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
}

LORA_PAIR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
EMBEDDING_PAIR_SUFFIXES = (".lora_embedding_A", ".lora_embedding_B")
ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")  # PEFT's LoraConfig.bias


class AdapterFileError(ValueError):
    """An adapter directory or file is invalid; the message names the problem."""


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype and shape of one tensor of an adapter file."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass
class AdapterFiles:
    """A validated adapter directory: its config, tensor table and raw weight bytes."""

    directory: str
    config: dict[str, Any]  # adapter_config.json as parsed; validated by `validate_config`
    tensors: dict[str, TensorInfo]
    weights: bytes = field(repr=False)

    @property
    def num_parameters(self) -> int:
        """Total number of elements over all tensors."""
        return sum(info.numel for info in self.tensors.values())


# --------------------------------------------------------------------------- regexes


def _subpatterns(av: Any) -> Iterator[Any]:
    """Yield the nested sub-patterns of one parsed regex node's argument."""
    if isinstance(av, _sre_parse.SubPattern):
        yield av
    elif isinstance(av, (tuple, list)):
        for item in av:
            yield from _subpatterns(item)


def _walk(pattern: Any) -> Iterator[tuple[Any, Any]]:
    """Yield every ``(opcode, argument)`` node of a parsed regex, depth first."""
    for op, av in pattern:
        yield op, av
        for sub in _subpatterns(av):
            yield from _walk(sub)


_REPEATS = {_sre_constants.MAX_REPEAT, _sre_constants.MIN_REPEAT}
_REPEATS |= {getattr(_sre_constants, "POSSESSIVE_REPEAT", _sre_constants.MAX_REPEAT)}
_BACKREFS = {_sre_constants.GROUPREF, _sre_constants.GROUPREF_EXISTS}


def _is_repeat(op: Any, av: Any) -> bool:
    """True for a repetition whose upper bound is more than one."""
    return op in _REPEATS and av[1] > 1


def check_pattern(pattern: str, what: str) -> None:
    """Refuse a regular expression that is invalid or could backtrack catastrophically.

    Raises:
        AdapterFileError: naming ``what`` (the config field) and the reason.
    """
    if not isinstance(pattern, str):
        raise AdapterFileError(f"{what}: expected a string pattern, got {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_LEN:
        raise AdapterFileError(f"{what}: pattern is {len(pattern)} characters long (limit {MAX_PATTERN_LEN})")
    try:
        parsed = _sre_parse.parse(pattern)
    except re.error as exc:
        raise AdapterFileError(f"{what}: invalid regular expression {pattern!r}: {exc}") from None
    unbounded = 0
    for op, av in _walk(parsed):
        if op in _BACKREFS:
            raise AdapterFileError(f"{what}: back-references are not allowed in {pattern!r}")
        if not _is_repeat(op, av):
            continue
        unbounded += av[1] == _sre_constants.MAXREPEAT
        for inner_op, inner_av in _walk(av[2]):
            if _is_repeat(inner_op, inner_av) or inner_op == _sre_constants.BRANCH:
                raise AdapterFileError(
                    f"{what}: pattern {pattern!r} nests a repetition or alternation inside a repetition "
                    "(catastrophic backtracking risk); rewrite it without nested quantifiers"
                )
    if unbounded > MAX_UNBOUNDED_REPEATS:
        raise AdapterFileError(
            f"{what}: pattern {pattern!r} has {unbounded} unbounded repetitions (limit {MAX_UNBOUNDED_REPEATS})"
        )


# --------------------------------------------------------------------------- config


class _DuplicateKey(Exception):
    """Raised by :func:`_reject_duplicates` inside ``json.loads``."""


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json`` object hook: refuse duplicate keys instead of keeping the last one."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _parse_json_object(raw: bytes, what: str) -> dict[str, Any]:
    """Decode UTF-8 JSON bytes that must hold one object with unique keys."""
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as exc:
        raise AdapterFileError(f"{what} has a duplicate key {exc.args[0]!r}") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise AdapterFileError(f"{what} is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(value, dict):
        raise AdapterFileError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _regex_fields(get: Any) -> Iterator[tuple[Any, str]]:
    """(pattern, field) for every config value PEFT matches as a regex; ``get(name)`` reads a field."""
    for name in ("target_modules", "exclude_modules"):
        value = get(name)
        if isinstance(value, str) and value.lower() != ALL_LINEAR:
            yield value, name
    layers_pattern = get("layers_pattern")
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern or []:
        yield pattern, "layers_pattern"
    for pattern in get("modules_to_save") or []:
        yield pattern, "modules_to_save"
    for name in ("rank_pattern", "alpha_pattern"):
        for pattern in get(name) or {}:
            yield pattern, f"{name} key"


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_lora(config: Mapping[str, Any]) -> bool:
    """PEFT writes ``"LORA"``; older files ``"PeftType.LORA"``."""
    return str(config.get("peft_type", "")).split(".")[-1].upper() == "LORA"


def _field_problem(config: Mapping[str, Any]) -> Optional[str]:
    """What is wrong with the LoRA fields of a config that PEFT would take as they are and fail
    on later (or never), if anything."""
    r, alpha, dropout = config.get("r", 8), config.get("lora_alpha", 8), config.get("lora_dropout", 0.0)
    if not _is_int(r) or r <= 0:
        return f"`r` should be a positive integer value but the value passed is {r!r}"
    if not _is_real(alpha):
        return f"lora_alpha must be a finite number, got {alpha!r}"
    if not _is_real(dropout) or not 0.0 <= dropout < 1.0:
        return f"lora_dropout must be a number in [0, 1), got {dropout!r}"
    if config.get("bias", "none") not in BIAS_MODES:
        return f"bias must be one of {BIAS_MODES}, got {config.get('bias')!r}"
    for name, check, what in (("rank_pattern", lambda v: _is_int(v) and v > 0, "positive ints"),
                              ("alpha_pattern", _is_real, "finite numbers")):
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and check(v) for k, v in pattern.items()):
            return f"{name} must map module-name patterns to {what}, got {pattern!r}"
    targets = config.get("target_modules")
    if not targets and not config.get("target_parameters"):
        return "target_modules is missing or empty: cannot tell which modules the adapter wraps"
    for name, may_be_str in (("target_modules", True), ("exclude_modules", True), ("layers_pattern", True),
                             ("modules_to_save", False)):
        value = config.get(name)
        if value is not None and not ((may_be_str and isinstance(value, str)) or _is_name_list(value)):
            kinds = "a string or a list of non-empty strings" if may_be_str else "a list of non-empty strings"
            return f"{name} must be {kinds}, got {value!r}"
    layers = config.get("layers_to_transform")
    items = [layers] if _is_int(layers) else layers
    if layers is not None and not (isinstance(items, list) and all(_is_int(i) and i >= 0 for i in items)):
        return f"layers_to_transform must be a non-negative int or a list of them, got {layers!r}"
    return None


def _is_name_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check a parsed LoRA ``adapter_config.json``: ``peft_type``, the fields of `_field_problem`,
    and the regular-expression policy of this module. Options PEFT has and these checks do not
    name (DoRA, ``lora_bias``, initialisations, ...) are PEFT's to interpret. Returns ``config``.

    Raises:
        AdapterFileError: naming the field and the offending value.
    """
    if not _is_lora(config):
        raise AdapterFileError(f"peft_type must be 'LORA', got {config.get('peft_type')!r}")
    problem = _field_problem(config)
    if problem:
        raise AdapterFileError(problem)
    for pattern, what in _regex_fields(config.get):
        check_pattern(pattern, what)
    return config


def read_regular_file(path: str, limit: Optional[int] = None) -> bytes:
    """The bytes of ``path``, which must be a regular file (not a FIFO or a device such as
    ``/dev/zero``, which would block or never end) of at most ``limit`` bytes."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AdapterFileError(f"{path} is not a regular file")
        if limit is not None and info.st_size > limit:
            raise AdapterFileError(f"{path} is {info.st_size} bytes (limit {limit})")
        return handle.read(info.st_size)


def read_config(path: str) -> dict[str, Any]:
    """Read and validate (`validate_config`) a LoRA ``adapter_config.json`` file."""
    config = _parse_json_object(read_regular_file(path, MAX_CONFIG_BYTES), path)
    try:
        return validate_config(config)
    except AdapterFileError as exc:
        raise AdapterFileError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------- safetensors


def _tensor_info(name: str, entry: Any) -> TensorInfo:
    """Validate one header entry (beyond what ``safetensors`` checks) and describe it."""
    if not name or "\x00" in name:
        raise AdapterFileError(f"invalid tensor name {name!r} (empty or containing a NUL byte)")
    if not isinstance(entry, dict):
        raise AdapterFileError(f"tensor {name!r}: header entry must be an object")
    dtype, shape = entry.get("dtype"), entry.get("shape")
    if dtype not in FLOAT_DTYPES:
        raise AdapterFileError(f"tensor {name!r}: dtype {dtype!r} is not a float type {sorted(FLOAT_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise AdapterFileError(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    return TensorInfo(name, dtype, tuple(shape))


def parse_header(data: bytes) -> dict[str, TensorInfo]:
    """Pre-validate a safetensors header with rules stricter than the reference reader.

    Checks the 8-byte length against :data:`MAX_HEADER_BYTES` and the buffer size,
    refuses duplicate keys, NUL bytes in names or metadata, non-string metadata and
    non-float dtypes.  Offsets and sizes are left to :func:`decode_weights`.
    """
    if len(data) < 8:
        raise AdapterFileError(f"safetensors file is {len(data)} bytes: too short for the 8-byte header length")
    (length,) = struct.unpack("<Q", data[:8])
    if length > MAX_HEADER_BYTES:
        raise AdapterFileError(f"safetensors header length {length} is absurd (limit {MAX_HEADER_BYTES} bytes)")
    if length + 8 > len(data):
        raise AdapterFileError(f"safetensors header length {length} + 8 exceeds the file size {len(data)} (truncated)")
    header = _parse_json_object(data[8 : 8 + length], "safetensors header")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(v, str) and "\x00" not in k + v for k, v in metadata.items()
    ):
        raise AdapterFileError("safetensors __metadata__ must map strings to strings without NUL bytes")
    return {name: _tensor_info(name, entry) for name, entry in header.items()}


def _check_finite(name: str, dtype: str, raw: bytes) -> None:
    """Refuse NaN or infinite values, read as integer bit patterns (works for bf16 too)."""
    view, mask = FLOAT_DTYPES[dtype]
    bits = np.frombuffer(raw, dtype=np.dtype(view).newbyteorder("<"))
    if np.any((bits & view(mask)) == view(mask)):
        raise AdapterFileError(f"tensor {name!r} contains NaN or infinite values")


def decode_weights(data: bytes) -> dict[str, TensorInfo]:
    """Fully validate safetensors bytes: header rules, the reference parser, finiteness.

    The payload is parsed by the ``safetensors`` package (``safetensors.deserialize``,
    no torch needed), which enforces offsets, sizes and the absence of trailing bytes.
    """
    import safetensors

    infos = parse_header(data)
    try:
        entries = safetensors.deserialize(data)
    except Exception as exc:  # SafetensorError is not importable on every version
        raise AdapterFileError(f"safetensors file rejected by the safetensors parser: {exc}") from None
    for name, entry in entries:
        _check_finite(name, infos[name].dtype, entry["data"])
    return infos


# --------------------------------------------------------------------------- adapter dir


def split_lora_key(key: str) -> Optional[tuple[str, str]]:
    """Split ``base_model.model.<module>.lora_A.weight`` into (module, suffix), else None."""
    for suffix in LORA_PAIR_SUFFIXES + EMBEDDING_PAIR_SUFFIXES:
        if key.startswith(KEY_PREFIX) and key.endswith(suffix):
            return key[len(KEY_PREFIX) : -len(suffix)], suffix
    return None


def allowed_ranks(config: Mapping[str, Any]) -> set[int]:
    """Ranks a LoRA pair may have under ``r`` and ``rank_pattern`` of a validated config (which
    module gets which rank is decided against the model, where module names are known)."""
    return {config.get("r", 8), *(config.get("rank_pattern") or {}).values()}


def _lora_rank(key: str, info: TensorInfo) -> Optional[int]:
    """The rank of a LoRA ``A`` tensor (its dim 0: (r, in_features[, kernel...]) for Linear, Conv and
    Embedding LoRA alike), None for any other tensor. B's shape is not checked: PEFT's variants store B
    in other shapes (grouped convolutions (out, r / groups, ...), block-diagonal LoRA)."""
    split = split_lora_key(key)
    if split is None or split[1] not in (LORA_PAIR_SUFFIXES[0], EMBEDDING_PAIR_SUFFIXES[0]):
        return None
    return info.shape[0] if info.shape else None


def _pair_problem(key: str, info: TensorInfo, tensors: Mapping[str, TensorInfo], ranks: set[int]) -> Optional[str]:
    """What is wrong with one ``lora_A``/``lora_B`` (or embedding) tensor, if anything."""
    module, suffix = split_lora_key(key)  # type: ignore[misc]
    pair = LORA_PAIR_SUFFIXES if suffix in LORA_PAIR_SUFFIXES else EMBEDDING_PAIR_SUFFIXES
    partner = KEY_PREFIX + module + pair[suffix == pair[0]]
    if partner not in tensors:
        return f"{key} has no partner {partner}"
    if len(info.shape) < 2 or info.numel == 0:  # Linear: 2-D; Conv: (r, in, k...)
        return f"{key} must be a non-empty tensor of 2 or more dimensions, has shape {list(info.shape)}"
    rank = _lora_rank(key, info)
    if rank is not None and rank not in ranks:
        return f"{key} has rank {rank} but the config allows r in {sorted(ranks)}"
    return None


def _check_ranks(config: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> None:
    """Check every LoRA pair: both halves present, A's rank allowed by the config; and no rank of the
    config above every rank in the file (a module targeted but absent from the file gets an adapter of
    the config's rank when PEFT loads it: an edited ``r`` of 2²² would allocate gigabytes; a legitimate
    ``r`` above every rank in the file, where ``rank_pattern`` sets every target's rank, stays within the
    layer widths)."""
    ranks = allowed_ranks(config)
    found = [rank for key, info in tensors.items() if (rank := _lora_rank(key, info)) is not None]
    widest = max((d for key, info in tensors.items() if split_lora_key(key) is not None for d in info.shape), default=0)
    if found and max(ranks) > max(max(found), widest):
        raise AdapterFileError(f"the config allows r up to {max(ranks)} (r, rank_pattern), above every LoRA tensor's "
                               f"rank (max {max(found)}) and every layer width in the file (max {widest}): "
                               "refusing to build adapters that large")
    problems = [
        problem
        for key, info in sorted(tensors.items())
        if split_lora_key(key) is not None and (problem := _pair_problem(key, info, tensors, ranks))
    ]
    if problems:
        raise AdapterFileError("LoRA tensors disagree with the config: " + "; ".join(problems))


def _refuse_pickles(directory: str, names: Iterable[str]) -> None:
    pickles = sorted(set(names) & set(PICKLE_NAMES))
    if pickles:
        raise AdapterFileError(
            f"{directory} holds {', '.join(pickles)} but no {WEIGHTS_NAME}: lorafuse never unpickles weights "
            "(a pickle can run arbitrary code when loaded, and torch.load(weights_only=True) has had RCE bugs). "
            "Convert it to safetensors in a trusted environment, e.g. "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'adapter_model.safetensors')"
        )


def _read_weights(directory: str, lora_config: Optional[Mapping[str, Any]]) -> tuple[dict[str, TensorInfo], bytes]:
    """``adapter_model.safetensors`` of ``directory``, fully validated (`decode_weights`); for a LoRA
    config also PEFT's key prefix and every pair's rank (`_check_ranks`)."""
    path = os.path.join(directory, WEIGHTS_NAME)
    weights = read_regular_file(path)
    try:
        tensors = decode_weights(weights)
        if lora_config is not None:
            _check_key_grammar(tensors)
            _check_ranks(lora_config, tensors)
    except AdapterFileError as exc:
        raise AdapterFileError(f"{path}: {exc}") from None
    return tensors, weights


def read_adapter_dir(directory: str) -> AdapterFiles:
    """Read and fully validate a LoRA adapter directory without touching any model.

    Raises:
        AdapterFileError: for every problem listed in the module docstring.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise AdapterFileError(f"{directory} is not a directory")
    names = os.listdir(directory)
    if not names:
        raise AdapterFileError(f"{directory} is empty: expected {CONFIG_NAME} and {WEIGHTS_NAME}")
    if WEIGHTS_NAME not in names:
        _refuse_pickles(directory, names)
        raise AdapterFileError(f"{directory} has no {WEIGHTS_NAME}")
    if CONFIG_NAME not in names:
        raise AdapterFileError(f"{directory} has no {CONFIG_NAME}")
    config = read_config(os.path.join(directory, CONFIG_NAME))
    tensors, weights = _read_weights(directory, config)
    return AdapterFiles(directory, config, tensors, weights)


def check_peft_dir(directory: str) -> None:
    """What can be checked of any PEFT adapter directory before PEFT itself reads it (PEFT also loads
    Conv, Embedding, DoRA and other methods' adapters): ``adapter_config.json`` of at most 1 MiB
    holding one JSON object with unique keys; for a LoRA config, `validate_config` (fields and the
    regular-expression policy) and every LoRA pair's rank against ``r``/``rank_pattern``; pickled
    weights refused, and a directory with a config but no ``adapter_model.safetensors``; the safetensors
    file fully validated (`decode_weights`: header rules, the reference parser, finite values). A
    directory without ``adapter_config.json`` is left to PEFT's own error.

    Raises:
        AdapterFileError: naming the file and the problem.
    """
    directory = os.fspath(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        return
    config = _parse_json_object(read_regular_file(config_path, MAX_CONFIG_BYTES), config_path)
    lora = _is_lora(config)
    if lora:
        try:
            validate_config(config)
        except AdapterFileError as exc:
            raise AdapterFileError(f"{config_path}: {exc}") from None
    names = os.listdir(directory)
    if WEIGHTS_NAME not in names:
        _refuse_pickles(directory, names)
        raise AdapterFileError(f"{directory} has no {WEIGHTS_NAME}")
    _read_weights(directory, config if lora else None)


def _check_key_grammar(tensors: Mapping[str, TensorInfo]) -> None:
    """Every tensor name must carry PEFT's ``base_model.model.`` prefix."""
    if not tensors:
        raise AdapterFileError("the file holds no tensors")
    bad = sorted(name for name in tensors if not name.startswith(KEY_PREFIX))
    if bad:
        raise AdapterFileError(f"tensor names without the {KEY_PREFIX!r} prefix: {bad}")
