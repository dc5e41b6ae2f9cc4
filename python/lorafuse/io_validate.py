"""Model-independent validation of PEFT LoRA adapter directories (no torch needed).

Everything an adapter directory can get wrong on its own is checked here, before any
model is touched: the config JSON (types, ranges and ``peft_type`` through
:class:`lorafuse.config.LoraConfig`, plus regular expressions that could hang the
matcher), the safetensors header (length cap, ``N + 8 <= size``,
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

from .config import LoraConfig

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
    config: dict[str, Any]
    lora_config: LoraConfig
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


def _check_patterns(config: LoraConfig) -> None:
    """Run :func:`check_pattern` over every config value PEFT matches as a regex."""
    for pattern, what in _regex_fields(lambda name: getattr(config, name)):
        check_pattern(pattern, what)


def validate_config(config: dict[str, Any]) -> LoraConfig:
    """Build the `LoraConfig` of a parsed ``adapter_config.json`` and vet its regexes.

    Types, ranges and ``peft_type`` are checked by `LoraConfig` itself; this adds that
    ``target_modules`` must be present (a saved adapter always names its modules) and the
    regular-expression policy of this module.

    Raises:
        AdapterFileError: naming the field and the offending value.
    """
    try:
        lora_config = LoraConfig.from_dict(config)
    except (TypeError, ValueError) as exc:
        raise AdapterFileError(str(exc)) from None
    if not lora_config.target_modules:
        raise AdapterFileError("target_modules is missing or empty: cannot tell which modules the adapter wraps")
    _check_patterns(lora_config)
    return lora_config


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


def read_config(path: str) -> tuple[dict[str, Any], LoraConfig]:
    """Read and validate an ``adapter_config.json`` file: the raw dict and its `LoraConfig`."""
    config = _parse_json_object(read_regular_file(path, MAX_CONFIG_BYTES), path)
    try:
        return config, validate_config(config)
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


def allowed_ranks(config: LoraConfig) -> set[int]:
    """Ranks a LoRA pair may have under ``r`` and ``rank_pattern`` (which module gets which
    rank is decided against the model, where module names are known)."""
    return {config.r, *config.rank_pattern.values()}


def _pair_problem(key: str, info: TensorInfo, tensors: Mapping[str, TensorInfo], ranks: set[int]) -> Optional[str]:
    """What is wrong with one ``lora_A``/``lora_B`` (or embedding) tensor, if anything."""
    module, suffix = split_lora_key(key)  # type: ignore[misc]
    pair = LORA_PAIR_SUFFIXES if suffix in LORA_PAIR_SUFFIXES else EMBEDDING_PAIR_SUFFIXES
    is_a = suffix == pair[0]
    partner = tensors.get(KEY_PREFIX + module + pair[is_a])
    if partner is None:
        return f"{key} has no partner {KEY_PREFIX + module + pair[is_a]}"
    if len(info.shape) != 2 or info.numel == 0:
        return f"{key} must be a non-empty 2-D tensor, has shape {list(info.shape)}"
    rank = info.shape[0 if is_a else 1]
    if len(partner.shape) == 2 and partner.shape[1 if is_a else 0] != rank:
        return f"{key} has rank {rank} but its partner has shape {list(partner.shape)}"
    if rank not in ranks:
        return f"{key} has rank {rank} but the config allows r in {sorted(ranks)}"
    return None


def _check_ranks(config: LoraConfig, tensors: Mapping[str, TensorInfo]) -> None:
    """Check every LoRA pair: both halves present, 2-D, equal ranks allowed by the config."""
    ranks = allowed_ranks(config)
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


def read_adapter_dir(directory: str) -> AdapterFiles:
    """Read and fully validate an adapter directory without touching any model.

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
    config, lora_config = read_config(os.path.join(directory, CONFIG_NAME))
    weights = read_regular_file(os.path.join(directory, WEIGHTS_NAME))
    try:
        tensors = decode_weights(weights)
        _check_key_grammar(tensors)
        _check_ranks(lora_config, tensors)
    except AdapterFileError as exc:
        raise AdapterFileError(f"{os.path.join(directory, WEIGHTS_NAME)}: {exc}") from None
    return AdapterFiles(directory, config, lora_config, tensors, weights)


def check_peft_dir(directory: str) -> None:
    """What can be checked of any PEFT adapter directory before PEFT itself reads it, without
    lorafuse's own limits on what an adapter may be (PEFT also loads Conv, Embedding, DoRA and other
    methods' adapters): ``adapter_config.json`` of at most 1 MiB holding one JSON object with unique
    keys; for a LoRA config, no regular expression that could hang PEFT's module matcher
    (:func:`check_pattern`); pickled weights refused; the safetensors file fully validated
    (`decode_weights`: header rules, the reference parser, finite values). A directory without
    ``adapter_config.json`` is left to PEFT's own error.

    Raises:
        AdapterFileError: naming the file and the problem.
    """
    directory = os.fspath(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        return
    config = _parse_json_object(read_regular_file(config_path, MAX_CONFIG_BYTES), config_path)
    if str(config.get("peft_type", "")).split(".")[-1].upper() == "LORA":
        for pattern, what in _regex_fields(config.get):
            if isinstance(pattern, str):
                try:
                    check_pattern(pattern, what)
                except AdapterFileError as exc:
                    raise AdapterFileError(f"{config_path}: {exc}") from None
    names = os.listdir(directory)
    if WEIGHTS_NAME not in names:
        _refuse_pickles(directory, names)
        return
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    try:
        decode_weights(read_regular_file(weights_path))
    except AdapterFileError as exc:
        raise AdapterFileError(f"{weights_path}: {exc}") from None


def _check_key_grammar(tensors: Mapping[str, TensorInfo]) -> None:
    """Every tensor name must carry PEFT's ``base_model.model.`` prefix."""
    if not tensors:
        raise AdapterFileError("the file holds no tensors")
    bad = sorted(name for name in tensors if not name.startswith(KEY_PREFIX))
    if bad:
        raise AdapterFileError(f"tensor names without the {KEY_PREFIX!r} prefix: {bad}")
