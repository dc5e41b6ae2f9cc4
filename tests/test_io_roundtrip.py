"""Adapter files cross between lorafuse and stock Hugging Face PEFT in both directions, and lorafuse's
``save_pretrained`` is atomic.

lorafuse models are PEFT models (``lorafuse.get_peft_model``, ``lorafuse.PeftModel.from_pretrained``),
so the files are PEFT's own; what is checked here is what lorafuse adds on top:

* for Llama-, GPT-2- (Conv1D, fan_in_fan_out) and BERT-config tiny models, with two adapters (the
  second in its PEFT subfolder), rank/alpha patterns, rsLoRA, modules_to_save, ``bias`` "lora_only" /
  "all", regex targets and layer selection: lorafuse -> PEFT and PEFT -> lorafuse give the logits of
  the model that wrote the files, and the lorafuse model runs every LoRA layer fused
  (``lorafuse_path == 'c'``);
* lorafuse's atomic saver writes exactly PEFT's files (names, bytes, subfolders), also across
  save arguments and repeated saves into one directory;
* a save that fails midway leaves the previous directory byte-identical and no staging folder;
  a writer SIGKILLed inside its saves never leaves a partial file under a final name.

Fused and stock logits differ only in fp32 summation order: compared to 1e-5 absolute, 1e-4 relative.
"""

from __future__ import annotations

import copy
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lorafuse  # noqa: E402
from lorafuse.io_validate import CONFIG_NAME, WEIGHTS_NAME, read_adapter_dir  # noqa: E402
from lorafuse.peft_fused import FusedLinear  # noqa: E402

VOCAB = 64
TOL = dict(atol=1e-5, rtol=1e-4)  # fused vs stock: fp32 summation order only
STAGING_PREFIX = ".lorafuse-save-"  # lorafuse.atomic's hidden staging folders


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
    # every target's rank set by rank_pattern, all below r
    "llama_rank_pattern": (tiny_llama, dict(r=8, target_modules=["q_proj", "v_proj"],
                                            rank_pattern={"q_proj": 2, "v_proj": 4}, alpha_pattern={"q_proj": 5})),
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
SECOND = dict(r=3, lora_alpha=6, bias="none")  # a second adapter on the same targets, saved in "second/"


def randomize_adapters(model: Any, seed: int) -> None:
    """Give every saved tensor (adapters, modules_to_save copies, saved biases) distinct non-zero values."""
    gen = torch.Generator().manual_seed(seed)
    bias = model.peft_config["default"].bias
    with torch.no_grad():
        for name, param in model.named_parameters():
            saved_bias = bias == "all" and name.endswith(".bias") or bias == "lora_only" and ".base_layer.bias" in name
            if "lora_" in name or ".modules_to_save." in name or saved_bias:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def build(case: str, make_peft_model: Callable[..., Any], second: bool = False) -> Any:
    """``case``'s model wrapped by ``make_peft_model`` (lorafuse's or PEFT's ``get_peft_model``),
    optionally with the adapter "second"."""
    make_base, kwargs = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_peft_model(make_base(), lorafuse.LoraConfig(**copy.deepcopy(kwargs)))
        if second:
            model.add_adapter("second", lorafuse.LoraConfig(**{**copy.deepcopy(kwargs), **SECOND}))
    return model


def lorafuse_model(case: str, seed: int = 1, second: bool = False) -> Any:
    """``case`` built by ``lorafuse.get_peft_model``, adapters randomized."""
    model = build(case, lorafuse.get_peft_model, second)
    randomize_adapters(model, seed)
    return model


def run(model: Any, adapter: str = "default") -> tuple[torch.Tensor, set[str]]:
    """Logits of ``adapter`` on fixed ids, and the paths its fused layers took (empty for stock PEFT)."""
    model.set_adapter(adapter)
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, FusedLinear) and adapter in m.lora_A]
    for layer in layers:
        layer.__dict__.pop("lorafuse_path", None)  # the class default None again: a layer that does not run shows
    ids = torch.arange(16).reshape(2, 8) % VOCAB
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return logits, {layer.lorafuse_path for layer in layers}


def file_tree(directory: Path) -> dict[str, Optional[bytes]]:
    """Every entry under ``directory``, hidden ones included: relative path -> bytes (None for a folder)."""
    tree: dict[str, Optional[bytes]] = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            tree[os.path.relpath(os.path.join(root, name), directory)] = None
        for name in files:
            path = os.path.join(root, name)
            tree[os.path.relpath(path, directory)] = Path(path).read_bytes()
    return tree


def load(loader: Any, case: str, directory: Path, second: str) -> Any:
    """``loader.from_pretrained`` (lorafuse's or PEFT's PeftModel) of ``directory`` onto a fresh base,
    plus the adapter "second" loaded with ``second`` = "subfolder" (PEFT's argument) or "path"."""
    where = dict(subfolder="second") if second == "subfolder" else {}
    path = directory if second == "subfolder" else directory / "second"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = loader.from_pretrained(CASES[case][0](), str(directory))
        model.load_adapter(str(path), "second", **where)
    return model


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- files cross both ways


@pytest.mark.parametrize("case", CASES)
def test_lorafuse_to_peft_logits(case: str, tmp_path: Path) -> None:
    model = lorafuse_model(case, second=True)
    model.save_pretrained(str(tmp_path))
    loaded = load(peft.PeftModel, case, tmp_path, second="subfolder")
    for adapter in ("default", "second"):
        (got, stock_paths), (ref, paths) = run(loaded, adapter), run(model, adapter)
        assert stock_paths == set() and paths == {"c"}, (stock_paths, paths)
        torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("case", CASES)
def test_peft_to_lorafuse_logits(case: str, tmp_path: Path) -> None:
    source = build(case, peft.get_peft_model, second=True)
    randomize_adapters(source, seed=2)
    source.save_pretrained(str(tmp_path))
    loaded = load(lorafuse.PeftModel, case, tmp_path, second="path")
    assert isinstance(loaded, peft.PeftModel) and type(loaded).__name__ == type(source).__name__
    stock_layers = sum(type(m) is peft.tuners.lora.Linear for m in source.modules())
    assert sum(isinstance(m, FusedLinear) for m in loaded.modules()) == stock_layers > 0
    for adapter in ("default", "second"):
        (got, paths), (ref, _) = run(loaded, adapter), run(source, adapter)
        assert paths == {"c"}, paths
        torch.testing.assert_close(got, ref, **TOL)


def test_trainability_and_reload_onto_same_path(tmp_path: Path) -> None:
    """is_trainable controls requires_grad; re-saving onto the directory just loaded is safe."""
    model = lorafuse_model("llama")
    model.save_pretrained(str(tmp_path))
    frozen = lorafuse.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    trainable = lorafuse.PeftModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True)
    grads = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n or ".modules_to_save." in n for n in grads)
    trainable.save_pretrained(str(tmp_path))
    again = lorafuse.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    (got, paths), (ref, _) = run(again), run(model)
    assert paths == {"c"}
    torch.testing.assert_close(got, ref, rtol=0, atol=0)  # the same fused computation on the same weights


def test_other_adapter_names_and_trainable_load_adapter(tmp_path: Path) -> None:
    source = lorafuse_model("gpt2", second=True)
    source.save_pretrained(str(tmp_path))
    loaded = lorafuse.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "second"), adapter_name="renamed")
    assert list(loaded.peft_config) == ["renamed"]
    (got, paths), (ref, _) = run(loaded, "renamed"), run(source, "second")
    assert paths == {"c"}
    torch.testing.assert_close(got, ref, **TOL)
    loaded.load_adapter(str(tmp_path), "again", is_trainable=True)
    again = [p.requires_grad for n, p in loaded.named_parameters() if ".again." in n]
    assert again and all(again)
    (got, paths), (ref, _) = run(loaded, "again"), run(source, "default")
    assert paths == {"c"}
    torch.testing.assert_close(got, ref, **TOL)


# ----------------------------------------------------------------------------- the saver writes PEFT's files


def saved_by_both(case: str, root: Path, saves: list[dict]) -> tuple[dict, dict]:
    """Run the same sequence of ``save_pretrained(dir, **kwargs)`` calls (new adapter weights before each)
    on a lorafuse model and on a stock PEFT model holding equal weights, each into one directory;
    returns both file trees."""
    ours, theirs = lorafuse_model(case, second=True), build(case, peft.get_peft_model, second=True)
    for step, kwargs in enumerate(saves):
        randomize_adapters(ours, seed=10 + step)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        ours.save_pretrained(str(root / "ours"), **kwargs)
        theirs.save_pretrained(str(root / "theirs"), **kwargs)
    return file_tree(root / "ours"), file_tree(root / "theirs")


@pytest.mark.parametrize("case", CASES)
def test_same_files_as_peft(case: str, tmp_path: Path) -> None:
    """Equal weights: the same file names, subfolders and bytes as PEFT's save."""
    ours, theirs = saved_by_both(case, tmp_path, [{}])
    assert {CONFIG_NAME, WEIGHTS_NAME, f"second/{CONFIG_NAME}", f"second/{WEIGHTS_NAME}"} <= set(ours)
    assert ours == theirs


SAVE_SEQUENCES = {
    "selected adapter": [dict(selected_adapters=["second"])],
    "not main process": [dict(is_main_process=False)],
    "pickle format": [dict(safe_serialization=False)],
    "save twice": [{}, {}],
    "resave a subset": [{}, dict(selected_adapters=["default"])],  # second/ stays from the first save, as in PEFT
}


@pytest.mark.parametrize("saves", SAVE_SEQUENCES.values(), ids=SAVE_SEQUENCES)
def test_save_arguments_and_repeated_saves_as_peft(saves: list[dict], tmp_path: Path) -> None:
    ours, theirs = saved_by_both("gpt2", tmp_path, saves)
    assert ours == theirs


@pytest.mark.parametrize("failing_call", [1, 2], ids=["in the first weights", "in the second adapter's weights"])
def test_failed_save_keeps_previous_directory(failing_call: int, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A save that dies (e.g. ENOSPC) after PEFT wrote some files leaves the previous files byte for byte
    and no staging folder; the next save replaces every file with PEFT's."""
    model = lorafuse_model("gpt2", second=True)
    model.save_pretrained(str(tmp_path / "adapter"))
    before = file_tree(tmp_path / "adapter")
    randomize_adapters(model, seed=5)
    stock_save, written = peft.peft_model.safe_save_file, []

    def save_then_fail(tensors: dict, path: str, *args: Any, **kwargs: Any) -> None:
        stock_save(tensors, path, *args, **kwargs)
        written.append(Path(path))
        if len(written) == failing_call:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_then_fail)
    with pytest.raises(OSError, match="No space"):
        model.save_pretrained(str(tmp_path / "adapter"))
    monkeypatch.undo()
    assert len(written) == failing_call
    assert all(p.relative_to(tmp_path / "adapter").parts[0].startswith(STAGING_PREFIX) for p in written)
    assert file_tree(tmp_path / "adapter") == before

    model.save_pretrained(str(tmp_path / "adapter"))
    reference = build("gpt2", peft.get_peft_model, second=True)
    reference.load_state_dict(model.state_dict())
    reference.save_pretrained(str(tmp_path / "reference"))
    after = file_tree(tmp_path / "adapter")
    assert after == file_tree(tmp_path / "reference")
    assert after[WEIGHTS_NAME] != before[WEIGHTS_NAME]


# ----------------------------------------------------------------------------- SIGKILL inside a save

# lorafuse's save_pretrained is atomic_directory_write(dir, PEFT's save into the staging folder). The child
# drives that function with a NumPy writer laying out PEFT's files for a modules_to_save model (default
# adapter on top, another in a subfolder, config last), so that one run costs no torch/PEFT import;
# version v fills every tensor with v. tests/test_checkpoint_kill.py SIGKILLs a real save_pretrained.
SAVER = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    from safetensors.numpy import save_file
    from lorafuse.atomic import atomic_directory_write

    CONFIG = {"peft_type": "LORA", "r": 16, "lora_alpha": 16, "target_modules": ["0"], "modules_to_save": ["3"]}
    SHAPES = {"0.lora_A.weight": (16, 512), "0.lora_B.weight": (512, 16), "3.weight": (1024, 512), "3.bias": (1024,)}

    def peft_layout(staging, version):
        for sub in ("", "second"):
            out = os.path.join(staging, sub)
            os.makedirs(out, exist_ok=True)
            tensors = {"base_model.model." + k: np.full(s, version, np.float32) for k, s in SHAPES.items()}
            save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
            with open(os.path.join(out, "adapter_config.json"), "w") as handle:
                json.dump(CONFIG, handle)

    version = 0
    while True:
        version += 1
        atomic_directory_write(sys.argv[1], lambda staging: peft_layout(staging, version))
        if version == 1:
            print("ready", flush=True)
    """
)


def _staging_left(target: Path) -> list[str]:
    return [n for n in os.listdir(target) if n.startswith(STAGING_PREFIX)]


def _kill_during_save(script: Path, target: Path, delay: float) -> bool:
    """Run the saver, SIGKILL it ``delay`` s after a staging folder appears; True if one was left behind."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, str(script), str(target)], stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 20
        while not _staging_left(target) and time.monotonic() < deadline:
            pass
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    return bool(_staging_left(target))


def _saved_version(directory: Path) -> float:
    """The version whose save wrote ``directory``'s weights; each file must come from one save."""
    from safetensors.torch import load as st_load

    tensors = st_load(read_adapter_dir(str(directory)).weights)
    version = float(tensors["base_model.model.3.weight"][0, 0])
    assert all(bool((t == version).all()) for t in tensors.values()), "torn adapter file"
    return version


def test_sigkill_during_save_never_leaves_partial_files(tmp_path: Path) -> None:
    """Kill the saving process inside its saves, repeatedly: final names always hold complete files, the
    only leftovers are hidden staging folders, and the loaders ignore them."""
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    rng = random.Random(0)
    left_behind = []
    for trial in range(8):
        target = tmp_path / f"adapter{trial}"
        if _kill_during_save(script, target, rng.uniform(0.0, 0.004)):
            left_behind.append(target)
        _saved_version(target / "second")
        assert set(os.listdir(target)) - set(_staging_left(target)) == {CONFIG_NAME, WEIGHTS_NAME, "second"}
        assert set(os.listdir(target / "second")) == {CONFIG_NAME, WEIGHTS_NAME}
    assert left_behind, "no kill landed inside a save; the test proved nothing"
    base = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                               torch.nn.Linear(512, 1024))
    model = lorafuse.PeftModel.from_pretrained(base, str(left_behind[0]))
    assert list(model.peft_config) == ["default"]
    head = model.base_model.model[3].modules_to_save["default"].weight
    assert torch.equal(head, torch.full_like(head, _saved_version(left_behind[0])))


def test_first_save_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    """A save into a new (or empty) directory is staged beside it and renamed into place in one step:
    while PEFT writes, the directory does not exist yet (or stays empty), so a kill at any moment leaves
    nothing or the whole adapter — never weights without their config."""
    from lorafuse.atomic import atomic_directory_write

    model = lorafuse.get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)),
                                    lorafuse.LoraConfig(r=2, target_modules=["0"]))
    for target in (tmp_path / "new", tmp_path / "empty"):
        if target.name == "empty":
            target.mkdir()
        seen: list = []

        def write(staging: str) -> None:  # PEFT's own saver, what lorafuse's save_pretrained wraps
            peft.PeftModel.save_pretrained(model, staging)
            seen.append(sorted(os.listdir(target)) if target.exists() else None)

        atomic_directory_write(str(target), write)
        assert seen == ([None] if target.name == "new" else [[]])
        assert {CONFIG_NAME, WEIGHTS_NAME} <= set(os.listdir(target))
        assert not [n for n in os.listdir(tmp_path) if "lorafuse-save" in n]
