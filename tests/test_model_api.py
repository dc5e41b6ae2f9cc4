"""PeftModel/LoraModel API: target matching (vs PEFT), adapter management, errors, pass-through."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from torch import nn  # noqa: E402

from lorafuse.config import LoraConfig  # noqa: E402
from lorafuse.layers import LoraLinear  # noqa: E402
from lorafuse.model import LoraModel, PeftModel, get_peft_model  # noqa: E402
from lorafuse.tuners_utils import ModulesToSaveWrapper  # noqa: E402

VOCAB = 53


def _llama(layers: int = 3) -> Any:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


def _adapted(model: nn.Module, cls: type) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, cls)}


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))


def _randomise_adapters(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("kwargs", [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["self_attn.o_proj", "mlp.up_proj"]),
    dict(target_modules=r".*\.(q|k)_proj"),
    dict(target_modules="all-linear"),
    dict(target_modules="all-linear", exclude_modules=["o_proj", "gate_proj"]),
    dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.0\..*"),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2]),
    dict(target_modules=["down_proj"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=None),
    dict(target_modules=["q_proj"], rank_pattern={r"layers\.1\.self_attn\.q_proj": 2}, alpha_pattern={"q_proj": 3}),
])
def test_targeted_modules_ranks_and_scalings_match_peft(kwargs: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, **copy.deepcopy(kwargs)))
        ours = get_peft_model(_llama(), LoraConfig(r=4, **copy.deepcopy(kwargs)))
    names = _adapted(ours, LoraLinear)
    assert names and names == _adapted(theirs, peft.tuners.lora.LoraLayer)
    for name in names:
        mine, ref = ours.get_submodule(name), theirs.get_submodule(name)
        assert (mine.r, mine.scaling) == (ref.r, ref.scaling), name
    assert "base_model.model.lm_head" not in names
    assert sorted(ours.peft_config["default"].target_modules) == sorted(theirs.peft_config["default"].target_modules)


def test_all_linear_on_a_plain_module_includes_the_last_layer() -> None:
    model = get_peft_model(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
                           LoraConfig(target_modules="all-linear"))
    assert _adapted(model, LoraLinear) == {"base_model.model.0", "base_model.model.2"}


def test_target_modules_matching_nothing_names_them() -> None:
    model = _llama()
    with pytest.raises(ValueError, match=r"Target modules \{'qproj'\} not found"):
        get_peft_model(model, LoraConfig(target_modules=["qproj"]))
    with pytest.raises(ValueError, match="not found"):
        get_peft_model(model, LoraConfig(target_modules=["proj"]))  # suffix only on "." boundaries
    assert not _adapted(model, LoraLinear)


def test_no_default_targets_for_unknown_models() -> None:
    with pytest.raises(ValueError, match="Please specify `target_modules`"):
        get_peft_model(nn.Sequential(nn.Linear(3, 3)), LoraConfig())


def test_unsupported_module_type_raises_and_rolls_back() -> None:
    model = _llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="is not supported"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj", "norm"]))  # model.norm is an RMSNorm
    assert not _adapted(model, LoraLinear)
    assert list(model.state_dict()) == list(before)


def test_modules_to_save_naming_a_lora_child_raises_and_rolls_back() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="child of a LoRA layer"):
        get_peft_model(model, LoraConfig(target_modules=["0"], modules_to_save=["default"]))
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Linear


def test_only_adapter_weights_train_and_bias_modes() -> None:
    model = get_peft_model(_llama(), LoraConfig(target_modules=["q_proj"]))
    assert all(("lora_A" in n or "lora_B" in n) == p.requires_grad for n, p in model.named_parameters())
    with_bias = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model = get_peft_model(with_bias, LoraConfig(target_modules=["0"], bias="all"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"base_model.model.0.base_layer.bias", "base_model.model.1.bias"} <= trainable
    frozen = get_peft_model(_llama(), LoraConfig(target_modules=["q_proj"], inference_mode=True))
    assert frozen.get_nb_trainable_parameters()[0] == 0


def test_structure_and_attribute_pass_through() -> None:
    base = _llama()
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert isinstance(model, PeftModel) and isinstance(model.base_model, LoraModel)
    assert model.base_model.model is base and model.get_base_model() is base
    assert model.config is base.config and model.peft_config is base.peft_config
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    layer = base.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, nn.Linear) and layer.weight is layer.base_layer.weight


def test_generate_matches_peft() -> None:
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _randomise_adapters(theirs)
    ours = get_peft_model(_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ours.load_state_dict(theirs.state_dict())
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    ids = _ids()
    assert torch.equal(ours.generate(input_ids=ids, **kwargs), theirs.generate(input_ids=ids, **kwargs))


@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_gradient_checkpointing_with_dropout_matches_plain_training(reentrant: bool) -> None:
    def grads(checkpointing: bool) -> dict:
        model = get_peft_model(_llama(2), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.2))
        _randomise_adapters(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.train()
        torch.manual_seed(4)
        ids = _ids()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and plain
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key])


def _two_adapters() -> PeftModel:
    model = get_peft_model(_llama(2), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("second", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    _randomise_adapters(model)
    return model


def test_add_set_and_delete_adapters() -> None:
    model = _two_adapters()
    assert set(model.peft_config) == {"default", "second"} and model.active_adapter == "default"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    ids = _ids()
    with torch.no_grad():
        out_default = model(input_ids=ids).logits
        model.set_adapter("second")
        out_second = model(input_ids=ids).logits
    assert not torch.allclose(out_default, out_second)
    assert all(".second." in n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.warns(UserWarning, match="Setting active adapter to default"):
        model.delete_adapter("second")
    assert model.active_adapter == "default" and set(model.peft_config) == {"default"}
    assert not any(".second." in n for n in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, out_default)


def test_adapter_management_errors() -> None:
    model = _two_adapters()
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("second", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="not found"):
        model.set_adapter("missing")
    with pytest.raises(ValueError, match="not found"):
        model.base_model.set_adapter(["default", "missing"])
    with pytest.raises(ValueError, match="does not exist"):
        model.delete_adapter("missing")
    with pytest.raises(ValueError, match="not found"):
        model.add_adapter("third", LoraConfig(target_modules=["nothing_here"]))
    assert "third" not in model.peft_config
    with pytest.raises(ValueError, match="different peft types"):
        model.add_adapter("fourth", peft.IA3Config(target_modules=["q_proj"]))
    model.merge_adapter()
    with pytest.raises(ValueError, match="while they are merged"):
        model.delete_adapter("default")
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    model.unmerge_adapter()
    model.delete_adapter("default")


def test_disable_adapter_restores_state_and_unload_returns_base() -> None:
    base = _llama(2)
    reference = copy.deepcopy(base).eval()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    _randomise_adapters(model)
    model.eval()
    ids = _ids()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            assert not any(p.requires_grad for p in model.parameters())
            torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
        torch.testing.assert_close(model(input_ids=ids).logits, adapted)
        model.disable_adapter_layers()  # LoraModel's methods, through PeftModel's attribute pass-through
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
        model.enable_adapter_layers()
        torch.testing.assert_close(model(input_ids=ids).logits, adapted)
        model.merge_adapter()
        with model.disable_adapter():  # merged layers are unmerged lazily
            torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                       rtol=1e-5, atol=1e-5)
        plain = model.unload()
        assert plain is base and not _adapted(plain, (LoraLinear, ModulesToSaveWrapper))
        torch.testing.assert_close(plain(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_modules_to_save_wrapper_behaviour() -> None:
    model = get_peft_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
                           LoraConfig(target_modules=["0"], modules_to_save=["1"]))
    wrapper = model.base_model.model[1]
    assert isinstance(wrapper, ModulesToSaveWrapper)
    assert not any(p.requires_grad for p in wrapper.original_module.parameters())
    assert all(p.requires_grad for p in wrapper.modules_to_save["default"].parameters())
    assert wrapper.weight is wrapper.modules_to_save["default"].weight
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(1.0)
    x = torch.randn(3, 4)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), wrapper.original_module(model.base_model.model[0](x)))
    plain = model.merge_and_unload()
    assert plain[1] is wrapper.modules_to_save["default"]


def test_io_hooks_delegate_to_lorafuse_io(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    io = pytest.importorskip("lorafuse.io")
    calls = []
    monkeypatch.setattr(io, "save_pretrained", lambda *a, **k: calls.append(("save", a, k)))
    monkeypatch.setattr(io, "load_adapter", lambda *a, **k: calls.append(("load", a, k)) or "result")
    monkeypatch.setattr(io, "from_pretrained", lambda *a, **k: calls.append(("from", a, k)) or "model")
    model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(target_modules=["0"]))
    model.save_pretrained(tmp_path, selected_adapters=["default"], safe_serialization=True)
    assert model.load_adapter(tmp_path, "other", is_trainable=True) == "result"
    assert PeftModel.from_pretrained(nn.Linear(2, 2), tmp_path) == "model"
    assert calls[0] == ("save", (model, tmp_path, ["default"]), {"safe_serialization": True})
    assert calls[1] == ("load", (model, tmp_path, "other", True), {})
    assert calls[2][1][0] is PeftModel and calls[2][1][2:] == (tmp_path, "default", False)


def test_merge_and_unload_after_merge_adapter_does_not_merge_twice() -> None:
    model = get_peft_model(_llama(2), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    _randomise_adapters(model)
    model.eval()
    ids = _ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        model.merge_adapter()
        with pytest.warns(UserWarning, match="All adapters are already merged"):
            plain = model.merge_and_unload()
        assert not _adapted(plain, LoraLinear)
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
