"""Hostile and broken adapter directories: a clear ValueError, and the model exactly as before.

Each case starts from a valid adapter directory, breaks one thing, and is loaded both with
``load_adapter`` into a lorafuse model that already holds an adapter and with
``PeftModel.from_pretrained`` onto a plain base model.  After the expected error, the
state dict (names and values), module types, adapters and requires_grad flags must be
unchanged.  The pickle cases also prove that nothing was unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save as st_save  # noqa: E402

from lorafuse.config import LoraConfig  # noqa: E402
from lorafuse.io_validate import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError, check_pattern  # noqa: E402
from lorafuse.model import PeftModel, get_peft_model  # noqa: E402
from test_io_roundtrip import randomize_adapters, tiny_llama  # noqa: E402

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
MARKER_NAME = "PWNED"


class Payload:
    """Unpickling this creates the file ``self.path`` (an arbitrary-code-execution stand-in)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def craft(header: str, payload: bytes = b"", length: int | None = None) -> bytes:
    """Hand-made safetensors bytes: 8-byte length, header text, payload."""
    raw = header.encode("utf-8")
    return struct.pack("<Q", len(raw) if length is None else length) + raw + payload


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid adapter directory (llama q_proj/v_proj, r=4) written by lorafuse."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, seed=3)
    directory = tmp_path_factory.mktemp("good")
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def host() -> Any:
    """A lorafuse model that already holds an adapter: the target of load_adapter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["k_proj"]))


@pytest.fixture(scope="module")
def plain() -> Any:
    """A plain transformers model: the target of from_pretrained."""
    return tiny_llama()


def snapshot(model: Any) -> tuple:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kinds = [(n, type(m).__name__) for n, m in model.named_modules()]
    grads = [(n, p.requires_grad) for n, p in model.named_parameters()]
    return state, kinds, grads, sorted(getattr(model, "peft_config", {}) or {})


def assert_unchanged(before: tuple, after: tuple) -> None:
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]


# ----------------------------------------------------------------------------- mutations


def tensors_of(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load((d / WEIGHTS_NAME).read_bytes())


def edit_config(d: Path, **changes: Any) -> None:
    config = json.loads((d / CONFIG_NAME).read_text())
    config.update(changes)
    (d / CONFIG_NAME).write_text(json.dumps(config))


def edit_tensors(d: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = tensors_of(d)
    change(tensors)
    (d / WEIGHTS_NAME).write_bytes(st_save(tensors, metadata={"format": "pt"}))


def edit_bytes(d: Path, change: Callable[[bytes], bytes]) -> None:
    (d / WEIGHTS_NAME).write_bytes(change((d / WEIGHTS_NAME).read_bytes()))


def _remove_pair(t: dict) -> None:
    del t[f"{Q0}.lora_A.weight"], t[f"{Q0}.lora_B.weight"]


def _add_unexpected(t: dict) -> None:
    up = "base_model.model.model.layers.0.mlp.up_proj"
    t[f"{up}.lora_A.weight"], t[f"{up}.lora_B.weight"] = torch.zeros(4, 32), torch.zeros(48, 4)


def _pickle_only(d: Path) -> None:
    (d / WEIGHTS_NAME).unlink()
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"w": Payload(d / MARKER_NAME)}))


def _pickle_renamed(d: Path) -> None:
    (d / WEIGHTS_NAME).write_bytes(pickle.dumps({"w": Payload(d / MARKER_NAME)}))


def _header_with(text: str) -> Callable[[Path], None]:
    return lambda d: (d / WEIGHTS_NAME).write_bytes(craft(text, b"\0" * 16))


ENTRY = '{"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}'

#: id -> (how to break the good directory, what the error must say)
CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty dir": (lambda d: [p.unlink() for p in d.iterdir()], "is empty"),
    "missing weights": (lambda d: (d / WEIGHTS_NAME).unlink(), "has no adapter_model.safetensors"),
    "missing config": (lambda d: (d / CONFIG_NAME).unlink(), "has no adapter_config.json"),
    "config not json": (lambda d: (d / CONFIG_NAME).write_text("{'r': 4,"), "not valid UTF-8 JSON"),
    "config is a list": (lambda d: (d / CONFIG_NAME).write_text("[1, 2]"), "must be a JSON object"),
    "config too big": (lambda d: (d / CONFIG_NAME).write_text(" " * (2 << 20)), "limit 1048576"),
    "duplicate config keys": (lambda d: (d / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": 4, "r": 8}'),
                              "has a duplicate key .r."),
    "wrong peft_type": (lambda d: edit_config(d, peft_type="IA3"), "peft_type must be 'LORA'"),
    "r as string": (lambda d: edit_config(d, r="4"), "`r` should be a positive integer"),
    "negative r": (lambda d: edit_config(d, r=-1), "`r` should be a positive integer"),
    "alpha NaN": (lambda d: edit_config(d, lora_alpha=float("nan")), "lora_alpha must be a finite number"),
    "bad bias mode": (lambda d: edit_config(d, bias="some"), "bias must be one of"),
    "no target_modules": (lambda d: edit_config(d, target_modules=None), "target_modules is missing"),
    "r disagrees with tensors": (lambda d: edit_config(d, r=8), r"rank 4 but the config allows r in \[8\]"),
    "rank_pattern disagrees": (lambda d: edit_config(d, rank_pattern={"layers.0.self_attn.q_proj": 2}),
                               r"shape mismatches.*q_proj.lora_A.weight: file \[4, 32\] vs model \[2, 32\]"),
    "half a pair": (lambda d: edit_tensors(d, lambda t: t.pop(f"{Q0}.lora_B.weight")), "has no partner"),
    "missing tensors": (lambda d: edit_tensors(d, _remove_pair),
                        r"missing tensors \(2\): \['base_model.model.model.layers.0.self_attn.q_proj.lora_A"),
    "unexpected tensors": (lambda d: edit_tensors(d, _add_unexpected), r"unexpected tensors \(2\):.*up_proj"),
    "shape mismatch": (lambda d: edit_tensors(d, lambda t: t.update({f"{Q0}.lora_A.weight": torch.ones(4, 48)})),
                       r"q_proj.lora_A.weight: file \[4, 48\] vs model \[4, 32\]"),
    "zero-element tensors": (lambda d: edit_tensors(d, lambda t: t.update({f"{Q0}.lora_A.weight": torch.ones(4, 0)})),
                             "non-empty 2-D"),
    "NaN values": (lambda d: edit_tensors(d, lambda t: t[f"{Q0}.lora_B.weight"].fill_(float("nan"))),
                   "NaN or infinite"),
    "non-float dtype": (lambda d: edit_tensors(d, lambda t: t.update({f"{Q0}.lora_A.weight": torch.ones(4, 32,
                                                                                            dtype=torch.int64)})),
                        "not a float type"),
    "target modules absent": (lambda d: edit_config(d, target_modules=["nonexistent_proj"]),
                              "Target modules .*nonexistent_proj.* not found in the base model"),
    "unsupported target type": (lambda d: edit_config(d, target_modules=["embed_tokens"]),
                                "embed_tokens is a Embedding; lorafuse's LoRA wraps only Linear and Conv1D"),
    "deeply nested config": (lambda d: (d / CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000),
                             "not valid UTF-8 JSON"),
    "evil target regex": (lambda d: edit_config(d, target_modules="(a+)+$"), "nested"),
    "evil rank_pattern key": (lambda d: edit_config(d, rank_pattern={"(q|qq)+_proj": 2}), "nested"),
    "too many wildcards": (lambda d: edit_config(d, target_modules=".*.*.*.*q_proj"), "unbounded repetitions"),
    "backreference": (lambda d: edit_config(d, target_modules=r"(.)\1.*"), "back-references"),
    "truncated file": (lambda d: edit_bytes(d, lambda b: b[:-16]), "safetensors parser"),
    "truncated header": (lambda d: edit_bytes(d, lambda b: b[:40]), "exceeds the file size"),
    "seven bytes": (lambda d: edit_bytes(d, lambda b: b[:7]), "too short"),
    "corrupted header byte": (lambda d: edit_bytes(d, lambda b: b[:12] + b"\xff" + b[13:]), "not valid UTF-8"),
    "absurd header length": (lambda d: edit_bytes(d, lambda b: struct.pack("<Q", 2**63) + b[8:]), "absurd"),
    "trailing bytes": (lambda d: edit_bytes(d, lambda b: b + b"extra_bogus_data_for_polyglot_file"),
                       "safetensors parser"),
    "duplicate header keys": (_header_with('{"a.lora_A.weight": %s, "a.lora_A.weight": %s}' % (ENTRY, ENTRY)),
                              "duplicate key"),
    "NUL in tensor name": (_header_with('{"base_model.model.x\\u0000.lora_A.weight": %s}' % ENTRY), "NUL"),
    "header is a list": (_header_with("[1, 2]"), "must be a JSON object"),
    "non-string metadata": (_header_with('{"__metadata__": {"format": 1}, "x": %s}' % ENTRY), "__metadata__"),
    "weights is a FIFO": (lambda d: ((d / WEIGHTS_NAME).unlink(), os.mkfifo(d / WEIGHTS_NAME)),
                          "is not a regular file"),
    "weights -> /dev/zero": (lambda d: ((d / WEIGHTS_NAME).unlink(), (d / WEIGHTS_NAME).symlink_to("/dev/zero")),
                             "is not a regular file"),
    "pickle only": (_pickle_only, "never unpickles"),
    "pickle renamed": (_pickle_renamed, "safetensors"),
}


@pytest.fixture
def broken(request: pytest.FixtureRequest, good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the good directory broken by one case; unpickling is booby-trapped."""
    def trap(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", trap)
    monkeypatch.setattr(pickle, "loads", trap)
    monkeypatch.setattr(pickle, "Unpickler", trap)
    monkeypatch.setattr(torch, "load", trap)
    directory = tmp_path / "adapter"
    directory.mkdir()
    for item in good.iterdir():
        (directory / item.name).write_bytes(item.read_bytes())
    CASES[request.param][0](directory)
    return directory


@pytest.mark.parametrize("broken", list(CASES), indirect=True)
def test_load_adapter_refuses_and_leaves_model_unchanged(broken: Path, host: Any, request: Any) -> None:
    pattern = CASES[request.node.callspec.params["broken"]][1]
    before = snapshot(host)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=pattern) as info:
        host.load_adapter(str(broken), "extra")
    assert isinstance(info.value, AdapterFileError)
    assert time.perf_counter() - start < 1.0
    assert_unchanged(before, snapshot(host))
    assert not (broken / MARKER_NAME).exists()


@pytest.mark.parametrize("broken", list(CASES), indirect=True)
def test_from_pretrained_refuses_and_leaves_base_unchanged(broken: Path, plain: Any, request: Any) -> None:
    pattern = CASES[request.node.callspec.params["broken"]][1]
    before = snapshot(plain)
    with pytest.raises(ValueError, match=pattern):
        PeftModel.from_pretrained(plain, str(broken))
    assert_unchanged(before, snapshot(plain))
    assert not (broken / MARKER_NAME).exists()


def test_good_directory_loads(good: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["k_proj"]))
    model.load_adapter(str(good), "extra")
    assert "extra" in model.peft_config


def test_existing_adapter_name_is_refused(good: Path, host: Any) -> None:
    before = snapshot(host)
    with pytest.raises(ValueError, match="already exists"):
        host.load_adapter(str(good), "default")
    assert_unchanged(before, snapshot(host))


def test_not_a_directory(tmp_path: Path, host: Any) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        host.load_adapter(str(tmp_path / "file"), "extra")


def test_peft_dora_adapter_is_refused(tmp_path: Path, host: Any) -> None:
    """PEFT options lorafuse lacks show up as tensors it cannot place: refused, not silently dropped."""
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(str(tmp_path))
    before = snapshot(host)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="unexpected tensors.*lora_magnitude_vector"):
            host.load_adapter(str(tmp_path), "extra")
    assert_unchanged(before, snapshot(host))


@pytest.mark.parametrize("pattern", [r".*\.(q_proj|v_proj)", r"model\.layers\.\d+\.self_attn\.q_proj",
                                     r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$", "q_proj", "^lm_head"])
def test_ordinary_patterns_pass(pattern: str) -> None:
    check_pattern(pattern, "target_modules")


@pytest.mark.parametrize("pattern", ["(a+)+$", "(a|aa)*b", r"(\w+\.)*x", "(?:a*)*", "x" * 300, "(unclosed"])
def test_dangerous_patterns_fail(pattern: str) -> None:
    with pytest.raises(AdapterFileError, match="target_modules"):
        check_pattern(pattern, "target_modules")


def test_failure_after_injection_is_rolled_back(tmp_path: Path) -> None:
    """A SEQ_CLS config without its head's tensors only fails once PeftModel has wrapped the head:
    from_pretrained must unload again and restore the requires_grad flags."""
    from test_io_roundtrip import tiny_bert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"]))
    source.save_pretrained(str(tmp_path))
    edit_config(tmp_path, task_type="SEQ_CLS")
    plain_bert = tiny_bert()
    before = snapshot(plain_bert)
    with pytest.raises(ValueError, match=r"missing tensors.*classifier\.weight"):
        PeftModel.from_pretrained(plain_bert, str(tmp_path))
    assert_unchanged(before, snapshot(plain_bert))
    assert not hasattr(plain_bert, "peft_config")


def test_load_adapter_failure_after_add_adapter_is_rolled_back(good: Path, host: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from lorafuse import io

    def broken_fill(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("simulated failure after add_adapter")

    monkeypatch.setattr(io, "_fill", broken_fill)
    before = snapshot(host)
    with pytest.raises(RuntimeError, match="simulated"):
        host.load_adapter(str(good), "extra")
    assert_unchanged(before, snapshot(host))


def test_every_truncation_is_rejected(good: Path) -> None:
    """reliability.md L2: each proper prefix of a valid weights file is refused."""
    from lorafuse.io_validate import decode_weights

    data = (good / WEIGHTS_NAME).read_bytes()
    for end in range(len(data)):
        with pytest.raises(AdapterFileError):
            decode_weights(data[:end])


def test_random_mutations_agree_with_safetensors(good: Path) -> None:
    """reliability.md L3: a mutated file is either refused, or accepted with the reference's reading."""
    import random

    from safetensors.torch import load

    from lorafuse.io_validate import decode_weights

    data = (good / WEIGHTS_NAME).read_bytes()
    rng = random.Random(0)
    accepted = 0
    for _ in range(2000):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        try:
            infos = decode_weights(bytes(mutated))
        except AdapterFileError:
            continue
        accepted += 1
        reference = load(bytes(mutated))
        assert {k: (list(t.shape), t.dtype) for k, t in reference.items()} == {
            k: (list(i.shape), torch.float32) for k, i in infos.items()
        }
    assert accepted > 0  # mutations inside the payload keep the file valid
