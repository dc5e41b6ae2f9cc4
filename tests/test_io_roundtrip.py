"""Adapter files interoperate with Hugging Face PEFT in both directions (issue 4).

For Llama-, GPT-2- and BERT-config tiny models: lorafuse -> PEFT and PEFT -> lorafuse give
the same logits; lorafuse writes the same tensor names, shapes and (for equal weights) the
same bytes as PEFT; configs agree on every key PEFT writes; several adapters, rank/alpha
patterns, rsLoRA, fan_in_fan_out and modules_to_save survive; saves are atomic even when
the saving process is SIGKILLed.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lorafuse import io  # noqa: E402
from lorafuse.config import LoraConfig  # noqa: E402
from lorafuse.io_validate import CONFIG_NAME, WEIGHTS_NAME, read_adapter_dir  # noqa: E402
from lorafuse.model import PeftModel, get_peft_model  # noqa: E402

VOCAB = 64
PEFT_VERSION_KEYS = {"peft_version"}  # a version stamp, not a setting: PEFT writes its own


def tiny_llama() -> Any:
    """Llama-config causal LM, hidden 32, 2 layers, fixed random weights."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> Any:
    """GPT-2-config LM (Conv1D layers, fan_in_fan_out), hidden 32, 2 layers."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert() -> Any:
    """BERT-config sequence classifier, hidden 32, 2 layers, 3 labels."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=40, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


CASES: dict[str, tuple[Callable[[], Any], dict]] = {
    "llama": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                               use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3},
                               modules_to_save=["lm_head"])),
    "gpt2": (tiny_gpt2, dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    # regex target_modules, exclude_modules; layer selection on GPT-2's "h" blocks
    "llama_regex": (tiny_llama, dict(r=2, target_modules=r".*\.(q_proj|o_proj)",
                                     exclude_modules=["model.layers.1.self_attn.o_proj"])),
    "gpt2_layers": (tiny_gpt2, dict(r=2, target_modules=["c_proj"], layers_to_transform=[1], layers_pattern="h")),
    "bert": (tiny_bert, dict(r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                             bias="lora_only")),
    # SEQ_CLS (PEFT appends the classifier head to modules_to_save again); every bias is saved
    "bert_seq_cls": (tiny_bert, dict(r=2, target_modules=["key"], task_type="SEQ_CLS", bias="all",
                                     modules_to_save=["classifier"])),
}
SECOND = dict(r=3, lora_alpha=6)  # a second adapter on the same targets


def randomize_adapters(model: Any, seed: int) -> None:
    """Give every adapter tensor (and modules_to_save copy) distinct non-zero values."""
    gen = torch.Generator().manual_seed(seed)
    bias = model.peft_config["default"].bias
    with torch.no_grad():
        for name, param in model.named_parameters():
            saved_bias = bias == "all" and name.endswith(".bias") or bias == "lora_only" and ".base_layer.bias" in name
            if "lora_" in name or ".modules_to_save." in name or saved_bias:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def lorafuse_model(case: str, seed: int = 1, second: bool = False) -> Any:
    build, kwargs = CASES[case][0], copy.deepcopy(CASES[case][1])  # configs mutate their lists
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(build(), LoraConfig(**copy.deepcopy(kwargs)))
        if second:
            model.add_adapter("second", LoraConfig(**{**kwargs, **SECOND, "bias": "none"}))
    randomize_adapters(model, seed)
    return model


def peft_model_like(case: str, second: bool = False) -> Any:
    build, kwargs = CASES[case][0], copy.deepcopy(CASES[case][1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(build(), peft.LoraConfig(**copy.deepcopy(kwargs)))
        if second:
            model.add_adapter("second", peft.LoraConfig(**{**kwargs, **SECOND, "bias": "none"}))
    return model


def logits(model: Any, adapter: str = "default") -> torch.Tensor:
    model.set_adapter(adapter)
    model.eval()
    ids = torch.arange(16).reshape(2, 8) % VOCAB
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_load(case: str, directory: str, second: bool = False) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(CASES[case][0](), directory)
        if second:
            model.load_adapter(os.path.join(directory, "second"), "second")
    return model


def normalized(value: Any) -> Any:
    """Order-free view of config values (PEFT writes target_modules in set order)."""
    return sorted(value) if isinstance(value, list) else value


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("case", CASES)
def test_lorafuse_to_peft_logits(case: str, tmp_path: Any) -> None:
    model = lorafuse_model(case, second=True)
    model.save_pretrained(str(tmp_path))
    loaded = peft_load(case, str(tmp_path), second=True)
    for adapter in ("default", "second"):
        torch.testing.assert_close(logits(loaded, adapter), logits(model, adapter))


@pytest.mark.parametrize("case", CASES)
def test_peft_to_lorafuse_logits(case: str, tmp_path: Any) -> None:
    source = peft_model_like(case, second=True)
    randomize_adapters(source, seed=2)
    source.save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(CASES[case][0](), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "second"), "second")
    for adapter in ("default", "second"):
        torch.testing.assert_close(logits(loaded, adapter), logits(source, adapter))


ADD_ADAPTER_HEADS_GAP = pytest.mark.xfail(
    strict=True, reason="lorafuse PeftModel.add_adapter does not append the SEQ_CLS head to modules_to_save "
                        "as PEFT's does (model.py), so the second adapter's config differs")


@pytest.mark.parametrize("case", [c if c != "bert_seq_cls" else pytest.param(c, marks=ADD_ADAPTER_HEADS_GAP)
                                  for c in CASES])
def test_same_files_as_peft(case: str, tmp_path: Any) -> None:
    """Equal weights give byte-identical safetensors; configs agree on every key PEFT writes."""
    ours = lorafuse_model(case, second=True)
    theirs = peft_model_like(case, second=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    for sub in ("", "second"):
        mine, ref = tmp_path / "ours" / sub, tmp_path / "theirs" / sub
        assert (mine / WEIGHTS_NAME).read_bytes() == (ref / WEIGHTS_NAME).read_bytes()
        mine_cfg = json.loads((mine / CONFIG_NAME).read_text())
        ref_cfg = json.loads((ref / CONFIG_NAME).read_text())
        assert mine_cfg["inference_mode"] is True and mine_cfg["peft_type"] == "LORA"
        differing = {k for k in ref_cfg if normalized(mine_cfg.get(k)) != normalized(ref_cfg[k])}
        assert differing <= PEFT_VERSION_KEYS, {k: (mine_cfg.get(k), ref_cfg[k]) for k in differing}


def test_key_names_follow_peft() -> None:
    names = set(io.adapter_state_dict(lorafuse_model("bert"), "default"))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in names
    assert "base_model.model.bert.encoder.layer.1.attention.self.value.base_layer.bias" in names
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= names
    assert not any(".default" in n for n in names)


def test_trainability_and_reload_onto_same_path(tmp_path: Any) -> None:
    """is_trainable controls requires_grad; re-saving onto the directory just loaded is safe."""
    model = lorafuse_model("llama")
    model.save_pretrained(str(tmp_path))
    frozen = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    trainable = PeftModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True)
    grads = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n or ".modules_to_save." in n for n in grads)
    trainable.save_pretrained(str(tmp_path))
    again = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


def test_selected_adapters_and_unknown_name(tmp_path: Any) -> None:
    model = lorafuse_model("gpt2", second=True)
    model.save_pretrained(str(tmp_path), selected_adapters=["second"])
    assert sorted(os.listdir(tmp_path)) == ["second"]
    with pytest.raises(ValueError, match="unknown adapters"):
        model.save_pretrained(str(tmp_path), selected_adapters=["nope"])


def test_peft_save_arguments(tmp_path: Any) -> None:
    model = lorafuse_model("gpt2")
    model.save_pretrained(str(tmp_path), is_main_process=False)
    assert not os.listdir(tmp_path)
    with pytest.raises(ValueError, match="pickle"):
        model.save_pretrained(str(tmp_path), safe_serialization=False)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])


def test_refuses_to_save_non_finite(tmp_path: Any) -> None:
    model = lorafuse_model("gpt2")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        model.save_pretrained(str(tmp_path))
    assert not (tmp_path / WEIGHTS_NAME).exists()


# ----------------------------------------------------------------------------- atomicity

SAVER = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from lorafuse.config import LoraConfig
    from lorafuse.model import get_peft_model

    base = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.Linear(512, 1024))
    model = get_peft_model(base, LoraConfig(r=16, target_modules=["0", "2"], modules_to_save=["3"]))
    version = 0
    while True:
        version += 1
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name or "modules_to_save" in name:
                    param.fill_(version)
        model.save_pretrained(sys.argv[1])
        if version == 1:
            print("ready", flush=True)
    """
)


def _check_consistent(directory: str) -> None:
    """Every file under its final name is complete, and all its tensors come from one save."""
    from safetensors.torch import load

    tensors = load(read_adapter_dir(directory).weights)
    first = next(iter(tensors.values())).flatten()[0]
    assert all(bool((t == first).all()) for t in tensors.values()), "torn adapter file"


def _kill_during_write(script: Path, target: Path, delay: float) -> bool:
    """Run the saver, SIGKILL it ``delay`` s after a temp file appears; True if one was left behind."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, str(script), str(target)], stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 20
        while not any(n.endswith(".tmp") for n in os.listdir(target)) and time.monotonic() < deadline:
            pass
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    return any(n.endswith(".tmp") for n in os.listdir(target))


def test_sigkill_during_save_never_leaves_partial_files(tmp_path: Path) -> None:
    """Kill the saving process inside its writes, repeatedly: final names always hold complete files."""
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    rng = random.Random(0)
    killed_mid_write = 0
    for trial in range(8):
        target = tmp_path / f"adapter{trial}"
        killed_mid_write += _kill_during_write(script, target, rng.uniform(0.0, 0.004))
        _check_consistent(str(target))
        leftovers = [n for n in os.listdir(target) if n not in (CONFIG_NAME, WEIGHTS_NAME)]
        assert all(n.startswith(".") and n.endswith(".tmp") for n in leftovers), leftovers
    assert killed_mid_write > 0, "no kill landed inside a write; the test proved nothing"


def test_failed_write_keeps_previous_adapter(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError (e.g. ENOSPC) in the middle of a save leaves the old files and no temp file."""
    model = lorafuse_model("gpt2")
    model.save_pretrained(str(tmp_path))
    before = {n: (tmp_path / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME)}
    randomize_adapters(model, seed=5)

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        model.save_pretrained(str(tmp_path))
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert sorted(os.listdir(tmp_path)) == sorted(before)


def test_other_adapter_names_and_trainable_load_adapter(tmp_path: Any) -> None:
    source = lorafuse_model("gpt2", second=True)
    source.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "second"), adapter_name="renamed")
    assert list(loaded.peft_config) == ["renamed"]
    torch.testing.assert_close(logits(loaded, "renamed"), logits(source, "second"))
    loaded.load_adapter(str(tmp_path), "again", is_trainable=True)
    again = [p.requires_grad for n, p in loaded.named_parameters() if ".again." in n]
    assert again and all(again)
    torch.testing.assert_close(logits(loaded, "again"), logits(source, "default"))
