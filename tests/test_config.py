"""LoraConfig: PEFT's defaults and dict keys, validation, adapter_config.json round trips."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest

from lorafuse.config import PEFT_ONLY_DEFAULTS, LoraConfig, TaskType

peft = pytest.importorskip("peft")


def test_defaults_equal_peft() -> None:
    ours, theirs = LoraConfig(), peft.LoraConfig()
    for f in dataclasses.fields(ours):
        if f.name in ("peft_extra", "peft_version"):
            continue
        assert getattr(ours, f.name) == getattr(theirs, f.name), f.name
    for key, value in PEFT_ONLY_DEFAULTS.items():
        assert getattr(theirs, key) == value, key


def test_to_dict_has_exactly_peft_keys_and_is_json() -> None:
    kwargs = dict(r=16, lora_alpha=32, target_modules=["v_proj", "q_proj"], task_type="CAUSAL_LM",
                  modules_to_save=["lm_head"], rank_pattern={"q_proj": 4})
    ours = LoraConfig(**kwargs).to_dict()
    theirs = peft.LoraConfig(**kwargs).to_dict()
    theirs.pop("runtime_config", None)  # PEFT never saves it
    assert set(ours) == set(theirs)
    assert ours["target_modules"] == ["q_proj", "v_proj"] and ours["task_type"] == "CAUSAL_LM"
    for key in ours:
        if key not in ("peft_version", "target_modules", "task_type", "peft_type"):
            assert ours[key] == theirs[key], key
    json.dumps(ours)


def test_from_dict_round_trips_a_peft_file_without_warnings() -> None:
    theirs = peft.LoraConfig(r=4, target_modules="model.*proj", lora_dropout=0.1, use_rslora=True)
    d = json.loads(json.dumps(theirs.to_dict() | {"runtime_config": None}, default=str))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = LoraConfig.from_dict(d)
    assert (ours.r, ours.target_modules, ours.lora_dropout, ours.use_rslora) == (4, "model.*proj", 0.1, True)
    assert ours.peft_type == "LORA"
    again = LoraConfig.from_dict(ours.to_dict())
    assert again.to_dict() == ours.to_dict()


def test_unsupported_peft_options_are_kept_with_a_warning() -> None:
    d = LoraConfig(target_modules=["q"]).to_dict() | {"use_dora": True, "brand_new_option": 3}
    with pytest.warns(UserWarning, match=r"\['brand_new_option', 'use_dora'\]"):
        config = LoraConfig.from_dict(d)
    out = config.to_dict()
    assert out["use_dora"] is True and out["brand_new_option"] == 3


def test_old_peft_file_with_a_key_subset_loads() -> None:
    config = LoraConfig.from_dict({"peft_type": "LORA", "target_modules": ["q_proj"], "r": 2})
    assert config.r == 2 and config.target_modules == {"q_proj"} and config.lora_alpha == 8


def test_task_type_and_list_to_set() -> None:
    config = LoraConfig(task_type="SEQ_CLS", target_modules=("a", "b", "a"))
    assert config.task_type == TaskType.SEQ_CLS and config.target_modules == {"a", "b"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "positive integer"),
    (dict(r=2.5), "positive integer"),
    (dict(r=True), "positive integer"),
    (dict(lora_alpha="8"), "lora_alpha"),
    (dict(lora_alpha=float("nan")), "lora_alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(lora_dropout=-0.1), "lora_dropout"),
    (dict(bias="some"), "bias"),
    (dict(init_lora_weights="pissa"), "init_lora_weights"),
    (dict(task_type="TRANSLATE"), "task_type"),
    (dict(peft_type="IA3"), "peft_type"),
    (dict(target_modules=[1, 2]), "target_modules"),
    (dict(target_modules=5), "target_modules"),
    (dict(modules_to_save="classifier"), "modules_to_save"),
    (dict(target_modules=".*q", layers_to_transform=[0]), "layers_to_transform"),
    (dict(target_modules=["q"], layers_pattern="layers"), "layers_to_transform"),
    (dict(target_modules=["q"], layers_to_transform=[-1]), "layers_to_transform"),
    (dict(rank_pattern={"q": 0}), "rank_pattern"),
    (dict(alpha_pattern={"q": "x"}), "alpha_pattern"),
    (dict(use_rslora="yes"), "use_rslora"),
])
def test_invalid_values_raise_value_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_scaling() -> None:
    assert LoraConfig(r=4, lora_alpha=16).scaling == 4.0
    assert LoraConfig(r=4, lora_alpha=16, use_rslora=True).scaling == 8.0
