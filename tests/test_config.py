"""Adapter configs: `lorafuse.io_validate.validate_config` (torch-free) refuses each broken LoRA field with an
`AdapterFileError` that names the field, leaves the config as it was, and passes what PEFT itself writes;
``lorafuse.LoraConfig`` / ``TaskType`` / ``LoraModel`` are PEFT's own classes.

Hostile and broken adapter *directories* (and `check_pattern`'s regex catalogue) are tests/test_io_hostile.py's;
here each rule is checked on its own, on a dict, with the boundary values on both sides.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lorafuse.io_validate import AdapterFileError, validate_config

MINIMAL = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
DROP = object()  # as a value in `_config`: remove the key
NAN, INF = float("nan"), float("inf")


def _config(**changes: Any) -> dict[str, Any]:
    """A copy of `MINIMAL` (the keys an early PEFT file has) with ``changes`` applied."""
    config = copy.deepcopy(MINIMAL)
    for key, value in changes.items():
        if value is DROP:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def _cases(message: str, field: str, values: list) -> list:
    """pytest params: ``field`` set to each of ``values`` must be refused with ``message``."""
    return [pytest.param({field: v}, message, id=f"{field}={'<absent>' if v is DROP else repr(v)}"[:60])
            for v in values]


REFUSED = [
    *_cases("peft_type must be 'LORA'", "peft_type", ["IA3", "PeftType.ADALORA", None, 3, DROP]),
    *_cases("`r` should be a positive integer", "r", [0, -2, 2.5, True, "4", None]),
    *_cases("lora_alpha must be a finite number", "lora_alpha", [NAN, INF, -INF, "8", True, None]),
    *_cases("lora_dropout must be a number in [0, 1)", "lora_dropout", [1.0, -0.1, NAN, "0.1", True, None]),
    *_cases("rank_pattern must map", "rank_pattern", [{"q_proj": 0}, {"q_proj": 2.0}, {"q_proj": True},
                                                      ["q_proj"], "q_proj=2"]),
    *_cases("alpha_pattern must map", "alpha_pattern", [{"q_proj": "16"}, {"q_proj": NAN}, {"q_proj": None},
                                                        [16]]),
    *_cases("target_modules is missing", "target_modules", [DROP, None, [], ""]),
    *_cases("target_modules must be a string or a list of non-empty strings", "target_modules",
            [5, [1], ["q_proj", ""], {"q_proj": 1}]),
    *_cases("exclude_modules must be a string or a list of non-empty strings", "exclude_modules", [5, [""]]),
    *_cases("layers_pattern must be a string or a list of non-empty strings", "layers_pattern", [[3], 1]),
    *_cases("modules_to_save must be a list of non-empty strings", "modules_to_save", ["score", [None]]),
    *_cases("layers_to_transform must be a non-negative int or a list of them", "layers_to_transform",
            [-1, [0, -1], "0", [0.5], True]),
    # every field PEFT matches as a regular expression goes through the policy, under its own name
    *_cases("target_modules: ", "target_modules", ["(a+)+$", r"(.)\1"]),
    *_cases("exclude_modules: ", "exclude_modules", ["(a|aa)*b"]),
    *_cases("layers_pattern: ", "layers_pattern", ["(x+)+", ["layers", "(x+)+"]]),
    *_cases("modules_to_save: ", "modules_to_save", [["score", "(c+)+"]]),
    *_cases("rank_pattern key: ", "rank_pattern", [{"(q+)+": 2}]),
    *_cases("alpha_pattern key: ", "alpha_pattern", [{"(q|qq)*": 2}]),
]


@pytest.mark.parametrize("changes, message", REFUSED)
def test_each_rule_refuses_naming_the_field(changes: dict, message: str) -> None:
    config = _config(**changes)
    before = repr(config)  # NaN != NaN: compare the text
    with pytest.raises(AdapterFileError, match="^" + re.escape(message)):
        validate_config(config)
    assert repr(config) == before


@pytest.mark.parametrize("changes", [
    dict(peft_type="PeftType.LORA"), dict(peft_type="lora"),  # older PEFT files; any case
    dict(r=1), dict(r=DROP, lora_alpha=DROP),  # absent: PEFT's defaults (8, 8)
    dict(lora_alpha=0), dict(lora_alpha=-16), dict(lora_alpha=0.5),
    dict(lora_dropout=0), dict(lora_dropout=0.999), dict(lora_dropout=DROP),
    dict(rank_pattern=None, alpha_pattern=None), dict(rank_pattern={"q_proj": 1}, alpha_pattern={"q_proj": -0.5}),
    dict(target_modules="all-linear"), dict(target_modules=r".*\.(q_proj|v_proj)"), dict(target_modules="q_proj"),
    dict(target_modules=None, target_parameters=["experts.gate_up_proj"]),
    dict(exclude_modules=["o_proj"]), dict(exclude_modules=r".*layers\.0\..*"),
    dict(layers_pattern="layers", layers_to_transform=[0, 1]), dict(layers_pattern=["layers", "h"]),
    dict(layers_to_transform=0), dict(layers_to_transform=None, layers_pattern=None),
    dict(modules_to_save=["score", "classifier"]),
], ids=lambda changes: ",".join(f"{k}={'<absent>' if v is DROP else v!r}" for k, v in changes.items())[:60])
def test_boundary_values_pass(changes: dict) -> None:
    config = _config(**changes)
    assert validate_config(config) is config


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(use_dora=True, use_rslora=True, rank_pattern={r"layers\.1\.self_attn\.q_proj": 2},
         alpha_pattern={"v_proj": 3}),
    dict(lora_bias=True, lora_dropout=0.1, bias="lora_only"),
    dict(init_lora_weights="pissa", task_type="SEQ_CLS", modules_to_save=["score"]),
    dict(init_lora_weights="gaussian", layers_to_transform=[0], layers_pattern="layers"),
    dict(target_modules=r".*\.(q_proj|v_proj)", exclude_modules=r".*layers\.0\..*"),
    dict(init_lora_weights="olora", target_modules="all-linear", exclude_modules=["o_proj"], task_type="CAUSAL_LM"),
    dict(target_modules=None, target_parameters=["mlp.experts.gate_up_proj"]),
], ids=["defaults", "dora-rslora-patterns", "lora-bias", "pissa-seq-cls", "gaussian-layers", "regexes",
        "olora-all-linear", "target-parameters"])
def test_configs_peft_writes_pass(kwargs: dict, tmp_path: Path) -> None:
    """``adapter_config.json`` exactly as PEFT saves it, with the options lorafuse leaves to PEFT."""
    peft = pytest.importorskip("peft")
    kwargs = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **kwargs}
    peft.LoraConfig(**kwargs).save_pretrained(str(tmp_path))
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert validate_config(written) is written
    assert all(written[k] == v for k, v in kwargs.items() if not isinstance(v, list)), written


def test_lorafuse_config_names_are_peft_classes() -> None:
    peft = pytest.importorskip("peft")
    import lorafuse

    assert lorafuse.LoraConfig is peft.LoraConfig and lorafuse.TaskType is peft.TaskType
    assert lorafuse.LoraModel is peft.LoraModel
    config = lorafuse.LoraConfig(task_type=lorafuse.TaskType.SEQ_CLS, target_modules=["q_proj"])
    assert config.task_type == "SEQ_CLS" and validate_config(json.loads(json.dumps(config.to_dict(), default=list)))


def test_validation_imports_no_torch() -> None:
    """`lorafuse.io_validate` is for tools without torch: importing lorafuse and validating loads none."""
    code = ("import sys, lorafuse; from lorafuse.io_validate import validate_config; "
            f"validate_config({MINIMAL!r}); print(sorted(m for m in ('torch', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
