"""Hostile and broken adapter directories: ``AdapterFileError``, and the model exactly as before.

Each case starts from a valid adapter directory written by a lorafuse model, breaks one thing, and is
loaded with ``load_adapter`` into a lorafuse model that already holds an adapter and (for the cases
the file checks catch) with ``lorafuse.PeftModel.from_pretrained`` onto a plain base model. After the
error, the state dict (names and values), module types, requires_grad flags and adapters must be
unchanged, and the host still runs fused. The pickle cases prove that nothing was unpickled: unpickling
their payload would create a marker file, and every unpickler is booby-trapped (the trap is shown to
catch stock PEFT).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import struct
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load as st_load  # noqa: E402
from safetensors.torch import save as st_save  # noqa: E402

import lorafuse  # noqa: E402
from lorafuse.io_validate import (CONFIG_NAME, WEIGHTS_NAME, AdapterFileError, check_pattern,  # noqa: E402
                                  decode_weights)
from test_io_roundtrip import TOL, randomize_adapters, run, tiny_llama  # noqa: E402

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
MARKER_NAME = "PWNED"


class Payload:
    """Unpickling this creates the file ``self.path`` (an arbitrary-code-execution stand-in)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def craft(header: str, payload: bytes = b"", length: Optional[int] = None) -> bytes:
    """Hand-made safetensors bytes: 8-byte length, header text, payload."""
    raw = header.encode("utf-8")
    return struct.pack("<Q", len(raw) if length is None else length) + raw + payload


def quiet_get_peft_model(**config: Any) -> Any:
    """``lorafuse.get_peft_model`` of a tiny Llama with ``LoraConfig(**config)``, warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lorafuse.get_peft_model(tiny_llama(), lorafuse.LoraConfig(**config))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid adapter directory (llama q_proj/v_proj, r=4) written by lorafuse."""
    model = quiet_get_peft_model(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    randomize_adapters(model, seed=3)
    directory = tmp_path_factory.mktemp("good")
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def host() -> Any:
    """A lorafuse model that already holds an adapter: the target of load_adapter."""
    model = quiet_get_peft_model(r=2, target_modules=["k_proj"], init_lora_weights=False)
    model.eval()
    return model


@pytest.fixture
def plain() -> Any:
    """A plain transformers model: the target of from_pretrained."""
    return tiny_llama()


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every unpickler raises for the test."""
    def trap(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("something tried to unpickle")

    for owner, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(owner, name, trap)


def snapshot(model: Any) -> tuple:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kinds = [(n, type(m)) for n, m in model.named_modules()]
    grads = [(n, p.requires_grad) for n, p in model.named_parameters()]
    adapters = (sorted(getattr(model, "peft_config", {}) or {}), getattr(model, "active_adapters", None))
    return state, kinds, grads, adapters


def assert_unchanged(before: tuple, after: tuple) -> None:
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]


# ----------------------------------------------------------------------------- mutations


def edit_config(d: Path, **changes: Any) -> None:
    config = json.loads((d / CONFIG_NAME).read_text())
    config.update(changes)
    (d / CONFIG_NAME).write_text(json.dumps(config))


def edit_tensors(d: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = st_load((d / WEIGHTS_NAME).read_bytes())
    change(tensors)
    (d / WEIGHTS_NAME).write_bytes(st_save(tensors, metadata={"format": "pt"}))


def edit_bytes(d: Path, change: Callable[[bytes], bytes]) -> None:
    (d / WEIGHTS_NAME).write_bytes(change((d / WEIGHTS_NAME).read_bytes()))


def config(**changes: Any) -> Callable[[Path], None]:
    return lambda d: edit_config(d, **changes)


def tensor(key: str, value: torch.Tensor) -> Callable[[Path], None]:
    return lambda d: edit_tensors(d, lambda t: t.update({key: value}))


def header(text: str) -> Callable[[Path], None]:
    return lambda d: (d / WEIGHTS_NAME).write_bytes(craft(text, b"\0" * 16))


def _pickle_only(d: Path) -> None:
    (d / WEIGHTS_NAME).unlink()
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"w": Payload(d / MARKER_NAME)}))


def _pickle_renamed(d: Path) -> None:
    (d / WEIGHTS_NAME).write_bytes(pickle.dumps({"w": Payload(d / MARKER_NAME)}))


def _nan(d: Path) -> None:
    edit_tensors(d, lambda t: t[f"{Q0}.lora_B.weight"].fill_(float("nan")))


def _inf(d: Path) -> None:
    edit_tensors(d, lambda t: t[f"{Q0}.lora_A.weight"].view(-1)[3].fill_(float("-inf")))


ENTRY = '{"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}'

#: refused by the file checks (lorafuse.io_validate.check_peft_dir) before PEFT reads anything:
#: id -> (how to break the good directory, what the error must say)
CHECKED: dict[str, tuple[Callable[[Path], None], str]] = {
    # adapter_config.json
    "config not json": (lambda d: (d / CONFIG_NAME).write_text("{'r': 4,"), "not valid UTF-8 JSON"),
    "config is a list": (lambda d: (d / CONFIG_NAME).write_text("[1, 2]"), "must be a JSON object"),
    "config too big": (lambda d: (d / CONFIG_NAME).write_text(" " * (2 << 20)), "limit 1048576"),
    "deeply nested config": (lambda d: (d / CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000),
                             "not valid UTF-8 JSON"),
    "duplicate config keys": (lambda d: (d / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": 4, "r": 8}'),
                              "has a duplicate key .r."),
    "r as string": (config(r="4"), "`r` should be a positive integer"),
    "r zero": (config(r=0), "`r` should be a positive integer"),
    "negative r": (config(r=-1), "`r` should be a positive integer"),
    "alpha NaN": (config(lora_alpha=float("nan")), "lora_alpha must be a finite number"),
    "alpha as string": (config(lora_alpha="8"), "lora_alpha must be a finite number"),
    "dropout 1": (config(lora_dropout=1.0), r"lora_dropout must be a number in \[0, 1\)"),
    "negative dropout": (config(lora_dropout=-0.1), r"lora_dropout must be a number in \[0, 1\)"),
    "rank_pattern value": (config(rank_pattern={"q_proj": "2"}), "rank_pattern must map"),
    "no target_modules": (config(target_modules=None), "target_modules is missing"),
    "modules_to_save not a list": (config(modules_to_save="lm_head"), "modules_to_save must be"),
    "modules_to_save a number": (config(modules_to_save=3), "modules_to_save must be"),  # fuzz finding
    "bias unknown": (config(bias="some"), "bias must be one of"),
    "missing weights": (lambda d: (d / WEIGHTS_NAME).unlink(), "has no adapter_model.safetensors"),
    # ranks against r / rank_pattern (the file's tensors are rank 4)
    "r disagrees with tensors": (config(r=8), "config allows r"),
    "rank_pattern disagrees": (config(r=8, rank_pattern={"q_proj": 2}), "config allows r"),
    # r unused by the file's tensors (rank_pattern sets theirs) but huge: PEFT would build r-sized adapters
    # for targeted modules the file has no tensors for
    "huge r behind rank_pattern": (config(r=2**22, rank_pattern={"q_proj": 4, "v_proj": 4},
                                          target_modules=["q_proj", "v_proj", "k_proj"]), "adapters that large"),
    "half a pair": (lambda d: edit_tensors(d, lambda t: t.pop(f"{Q0}.lora_B.weight")), "has no partner"),
    "ranks of a pair differ": (tensor(f"{Q0}.lora_A.weight", torch.ones(2, 32)), "has rank 2 but the config allows"),
    "zero-element tensor": (tensor(f"{Q0}.lora_A.weight", torch.ones(4, 0)), "non-empty"),
    "key without PEFT's prefix": (tensor("model.layers.0.x.weight", torch.ones(2)), "without the 'base_model"),
    # regular expressions PEFT would match against every module name
    "evil target regex": (config(target_modules="(a+)+$"), "target_modules: .*nests"),
    "evil exclude regex": (config(exclude_modules="(a|aa)*b"), "exclude_modules: .*nests"),
    "evil rank_pattern key": (config(rank_pattern={"(q|qq)+_proj": 4}), "rank_pattern key: .*nests"),
    "evil alpha_pattern key": (config(alpha_pattern={"(q+)+": 2}), "alpha_pattern key: .*nests"),
    "evil modules_to_save": (config(modules_to_save=["(a+)+$"]), "modules_to_save: .*nests"),
    "evil layers_pattern": (config(layers_pattern="(a+)+$", layers_to_transform=[0]), "layers_pattern: .*nests"),
    "too many wildcards": (config(target_modules=".*.*.*.*q_proj"), "unbounded repetitions"),
    "backreference": (config(target_modules=r"(.)\1.*"), "back-references"),
    "overlong pattern": (config(target_modules="q" * 300), "characters long"),
    # values
    "NaN values": (_nan, "NaN or infinite"),
    "inf values": (_inf, "NaN or infinite"),
    "non-float dtype": (tensor(f"{Q0}.lora_A.weight", torch.ones(4, 32, dtype=torch.int64)), "not a float type"),
    # the safetensors container
    "truncated file": (lambda d: edit_bytes(d, lambda b: b[:-16]), "safetensors parser"),
    "truncated header": (lambda d: edit_bytes(d, lambda b: b[:40]), "exceeds the file size"),
    "seven bytes": (lambda d: edit_bytes(d, lambda b: b[:7]), "too short"),
    "corrupted header byte": (lambda d: edit_bytes(d, lambda b: b[:12] + b"\xff" + b[13:]), "not valid UTF-8"),
    "absurd header length": (lambda d: edit_bytes(d, lambda b: struct.pack("<Q", 2**63) + b[8:]), "absurd"),
    "trailing bytes": (lambda d: edit_bytes(d, lambda b: b + b"extra_bogus_data_for_polyglot_file"),
                       "safetensors parser"),
    "duplicate header keys": (header('{"a.lora_A.weight": %s, "a.lora_A.weight": %s}' % (ENTRY, ENTRY)),
                              "duplicate key"),
    "NUL in tensor name": (header('{"base_model.model.x\\u0000.lora_A.weight": %s}' % ENTRY), "NUL"),
    "header is a list": (header("[1, 2]"), "must be a JSON object"),
    "non-string metadata": (header('{"__metadata__": {"format": 1}, "x": %s}' % ENTRY), "__metadata__"),
    "weights is a FIFO": (lambda d: ((d / WEIGHTS_NAME).unlink(), os.mkfifo(d / WEIGHTS_NAME)),
                          "is not a regular file"),
    "weights -> /dev/zero": (lambda d: ((d / WEIGHTS_NAME).unlink(), (d / WEIGHTS_NAME).symlink_to("/dev/zero")),
                             "is not a regular file"),
    # pickles
    "pickle only": (_pickle_only, "never unpickles"),
    "pickle renamed": (_pickle_renamed, "safetensors"),
}

#: pass the file checks, but PEFT cannot use them (against this model, or at all); load_adapter and
#: from_pretrained undo what PEFT did and raise AdapterFileError naming PEFT's error
PEFT_REFUSED: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty dir": (lambda d: [p.unlink() for p in d.iterdir()], "adapter_config.json"),
    "missing config": (lambda d: (d / CONFIG_NAME).unlink(), "adapter_config.json"),
    "config is a FIFO": (lambda d: ((d / CONFIG_NAME).unlink(), os.mkfifo(d / CONFIG_NAME)), "adapter_config.json"),
    "peft_type unknown": (config(peft_type="BOGUS"), "BOGUS"),
    "peft_type a number": (config(peft_type=7), "could not load"),
    "peft_type null": (config(peft_type=None), "could not load"),
    "target modules absent": (config(target_modules=["nonexistent_proj"]), "nonexistent_proj"),
    # fuzz finding: PEFT fails after adding part of the adapter
    "unknown init_lora_weights": (config(init_lora_weights="(a+)+$"), "could not load"),
    "shape mismatch": (tensor(f"{Q0}.lora_A.weight", torch.ones(4, 48)), "size mismatch"),
    "rank_pattern gives a module another rank": (config(rank_pattern={"layers.0.self_attn.q_proj": 2}),
                                                 "size mismatch"),
}

def break_copy(good: Path, directory: Path, breakage: Callable[[Path], None]) -> Path:
    """``directory`` made a copy of the good adapter, broken by ``breakage``."""
    directory.mkdir(parents=True)
    for item in good.iterdir():
        (directory / item.name).write_bytes(item.read_bytes())
    breakage(directory)
    return directory


@pytest.fixture
def broken(request: pytest.FixtureRequest, good: Path, tmp_path: Path, no_unpickling: None) -> Path:
    """A copy of the good directory broken by one case of CHECKED or PEFT_REFUSED; unpickling is trapped."""
    return break_copy(good, tmp_path / "adapter", {**CHECKED, **PEFT_REFUSED}[request.param][0])


def expected_message(request: pytest.FixtureRequest) -> str:
    return {**CHECKED, **PEFT_REFUSED}[request.node.callspec.params["broken"]][1]


@pytest.mark.parametrize("broken", [*CHECKED, *PEFT_REFUSED], indirect=True)
def test_load_adapter_refuses_and_leaves_model_unchanged(broken: Path, host: Any,
                                                         request: pytest.FixtureRequest) -> None:
    before = snapshot(host)
    start = time.perf_counter()
    with pytest.raises(AdapterFileError, match=expected_message(request)):
        host.load_adapter(str(broken), "extra")
    assert time.perf_counter() - start < 1.0
    assert_unchanged(before, snapshot(host))
    assert run(host)[1] == {"c"}
    assert not (broken / MARKER_NAME).exists()


@pytest.mark.parametrize("broken", [*CHECKED, *PEFT_REFUSED], indirect=True)
def test_from_pretrained_refuses_and_leaves_base_unchanged(broken: Path, plain: Any,
                                                           request: pytest.FixtureRequest) -> None:
    before = snapshot(plain)
    with pytest.raises(AdapterFileError, match=expected_message(request)):
        lorafuse.PeftModel.from_pretrained(plain, str(broken))
    assert_unchanged(before, snapshot(plain))
    assert not (broken / MARKER_NAME).exists()


@pytest.mark.parametrize("case", ["pickle only", "evil target regex"])
@pytest.mark.parametrize("loader", ["load_adapter", "from_pretrained"])
def test_subfolder_is_checked(case: str, loader: str, good: Path, host: Any, tmp_path: Path,
                              no_unpickling: None) -> None:
    """PEFT's ``subfolder=`` argument: the subfolder is what gets checked."""
    adapter = break_copy(good, tmp_path / "repo" / "adapter", CHECKED[case][0])
    model = host if loader == "load_adapter" else tiny_llama()
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=CHECKED[case][1]):
        if loader == "load_adapter":
            host.load_adapter(str(tmp_path / "repo"), "extra", subfolder="adapter")
        else:
            lorafuse.PeftModel.from_pretrained(model, str(tmp_path / "repo"), subfolder="adapter")
    assert_unchanged(before, snapshot(model))
    assert not (adapter / MARKER_NAME).exists()


def test_trap_catches_stock_peft_unpickling(good: Path, plain: Any, tmp_path: Path, no_unpickling: None) -> None:
    """Control for the pickle cases: stock PEFT does unpickle adapter_model.bin, and the trap stops it."""
    directory = break_copy(good, tmp_path / "adapter", _pickle_only)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AssertionError, match="tried to unpickle"):
            peft.PeftModel.from_pretrained(plain, str(directory))


# ----------------------------------------------------------------------------- good directories load


def load_with(loader: str, directory: Path, host_target: str) -> Any:
    """The adapter in ``directory``, active: loaded as "extra" into a lorafuse model that already has an
    adapter on ``host_target`` (``load_adapter``), or onto a fresh base (``from_pretrained``)."""
    if loader == "from_pretrained":
        return lorafuse.PeftModel.from_pretrained(tiny_llama(), str(directory))
    model = quiet_get_peft_model(r=2, target_modules=[host_target])
    model.load_adapter(str(directory), "extra")
    model.set_adapter("extra")
    return model


@pytest.mark.parametrize("loader", ["load_adapter", "from_pretrained"])
def test_good_directory_loads_and_runs_fused(good: Path, loader: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(tiny_llama(), str(good))
    model = load_with(loader, good, host_target="k_proj")
    (got, paths), (ref, _) = run(model, model.active_adapter), run(reference)
    assert paths == {"c"}
    torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("loader", ["load_adapter", "from_pretrained"])
def test_dora_directory_loads_and_runs_fused(tmp_path: Path, loader: str) -> None:
    """A DoRA adapter written by stock PEFT loads (PEFT handles it) and runs the fused DoRA forward."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                   use_dora=True, init_lora_weights=False))
    source.save_pretrained(str(tmp_path))
    model = load_with(loader, tmp_path, host_target="q_proj")
    (got, paths), (ref, _) = run(model, model.active_adapter), run(source)
    assert paths == {"c"}
    torch.testing.assert_close(got, ref, **TOL)


# ----------------------------------------------------------------------------- io_validate on its own


@pytest.mark.parametrize("pattern", [r".*\.(q_proj|v_proj)", r"model\.layers\.\d+\.self_attn\.q_proj",
                                     r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$", "q_proj", "^lm_head"])
def test_ordinary_patterns_pass(pattern: str) -> None:
    check_pattern(pattern, "target_modules")


@pytest.mark.parametrize("pattern", ["(a+)+$", "(a|aa)*b", r"(\w+\.)*x", "(?:a*)*", "x" * 300, "(unclosed"])
def test_dangerous_patterns_fail(pattern: str) -> None:
    with pytest.raises(AdapterFileError, match="target_modules"):
        check_pattern(pattern, "target_modules")


def test_every_truncation_is_rejected(good: Path) -> None:
    """reliability.md L2: each proper prefix of a valid weights file is refused."""
    data = (good / WEIGHTS_NAME).read_bytes()
    for end in range(len(data)):
        with pytest.raises(AdapterFileError):
            decode_weights(data[:end])


def test_random_mutations_agree_with_safetensors(good: Path) -> None:
    """reliability.md L3: a mutated file is either refused, or accepted with the reference's reading."""
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
        reference = st_load(bytes(mutated))
        assert {k: (list(t.shape), t.dtype) for k, t in reference.items()} == {
            k: (list(i.shape), torch.float32) for k, i in infos.items()
        }
    assert accepted > 0  # mutations inside the payload keep the file valid
