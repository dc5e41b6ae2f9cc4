"""lorafuse vs PEFT itself on tiny transformers models: same keys, counts, logits, loss, gradients."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lorafuse.config import LoraConfig  # noqa: E402
from lorafuse.layers import LoraLinear  # noqa: E402
from lorafuse.model import get_peft_model  # noqa: E402
from lorafuse.tuners_utils import ModulesToSaveWrapper  # noqa: E402

VOCAB, BATCH, SEQ = 61, 2, 7


@dataclass
class Case:
    """A tiny model family and the LoRA config applied to it (kwargs shared by PEFT and lorafuse)."""

    build: Callable[[], Any]
    lora: dict = field(default_factory=dict)
    labels: str = "lm"  # "lm": labels = input_ids; "cls": one class index per sequence


def _llama() -> Any:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


def _qwen2() -> Any:
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.Qwen2ForCausalLM(cfg)


def _gpt2() -> Any:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _bert() -> Any:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=40, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


CASES = {
    # rsLoRA, a rank and an alpha pattern, three projections of different shapes
    "llama": Case(_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                               use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3},
                               task_type="CAUSAL_LM")),
    # biases in q/k/v: trained ("lora_only"), so the kernel's bias gradient is checked too
    "qwen2": Case(_qwen2, dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                               bias="lora_only", task_type="CAUSAL_LM")),
    # Conv1D (fan_in_fan_out, set automatically), default target modules for gpt2 plus the MLP
    "gpt2": Case(_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "mlp.c_proj"])),
    # classifier becomes a modules_to_save wrapper (SEQ_CLS), default targets query/value
    "bert": Case(_bert, dict(r=4, lora_alpha=8, task_type="SEQ_CLS"), labels="cls"),
}


def _inputs(case: Case, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen)
    labels = ids if case.labels == "lm" else torch.randint(0, 3, (BATCH,), generator=gen)
    return {"input_ids": ids, "labels": labels}


def _base(name: str) -> Any:
    """The untouched base model of a case (deterministic weights)."""
    torch.manual_seed(0)
    return CASES[name].build()


def _pair(name: str, **overrides: Any) -> tuple[Any, Any]:
    """(PEFT model, lorafuse model) on identical base weights, lorafuse given PEFT's randomised adapters."""
    case = CASES[name]
    base = _base(name)
    kwargs = {**case.lora, **overrides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(kwargs)))
        ours = get_peft_model(copy.deepcopy(base), LoraConfig(**copy.deepcopy(kwargs)))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in theirs.named_parameters():
            if "lora_" in pname or "modules_to_save" in pname or (p.requires_grad and pname.endswith("bias")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _run(model: Any, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the base models' own dropout draws the same masks in both runs
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_keys_and_trainable_counts_match_peft(name: str, capsys: Any) -> None:
    theirs, ours = _pair(name)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in theirs.named_parameters() if p.requires_grad]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    theirs.print_trainable_parameters()
    expected = capsys.readouterr().out
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == expected
    adapted = {n for n, m in ours.named_modules() if isinstance(m, LoraLinear)}
    assert adapted == {n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    # the config as adapted to the model (fan_in_fan_out, modules_to_save, ...) is what PEFT would save
    config_theirs = theirs.peft_config["default"].to_dict()
    config_theirs.pop("runtime_config", None)
    config_ours = ours.peft_config["default"].to_dict()
    for key in ("peft_version", "peft_type", "task_type", "target_modules"):
        config_theirs.pop(key), config_ours.pop(key)
    assert config_ours == config_theirs
    assert sorted(ours.peft_config["default"].target_modules) == sorted(theirs.peft_config["default"].target_modules)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_loss_and_every_gradient_match_peft(name: str) -> None:
    theirs, ours = _pair(name)
    ours.train()
    theirs.train()
    inputs = _inputs(CASES[name])
    logits_t, loss_t, grads_t = _run(theirs, inputs)
    logits_o, loss_o, grads_o = _run(ours, inputs)
    torch.testing.assert_close(logits_o, logits_t)
    torch.testing.assert_close(loss_o, loss_t)
    assert grads_o.keys() == grads_t.keys() and grads_o
    for key, grad in grads_t.items():
        torch.testing.assert_close(grads_o[key], grad, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_double_backward_gradient_penalty_matches_peft(name: str) -> None:
    """create_graph=True through the fused layers (float32, the C kernels' forward): a penalty on
    the adapters' own gradients, backpropagated, gives PEFT's gradients (PEFT's modules are twice
    differentiable, so lorafuse's must be too)."""
    theirs, ours = _pair(name)
    assert {m.backend for m in ours.modules() if isinstance(m, LoraLinear)} == {"c"}
    inputs = _inputs(CASES[name])

    def penalised_grads(model: Any) -> dict:
        model.get_base_model().set_attn_implementation("eager")  # SDPA on the CPU has no double backward
        model.eval()
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        grads = torch.autograd.grad(loss, params, create_graph=True)
        (loss + sum(g.square().sum() for g in grads)).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    grads_t, grads_o = penalised_grads(theirs), penalised_grads(ours)
    assert grads_o.keys() == grads_t.keys() and grads_o
    for key, grad in grads_t.items():
        torch.testing.assert_close(grads_o[key], grad, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_eval_mode_matches_peft_with_dropout_configured(name: str) -> None:
    theirs, ours = _pair(name, lora_dropout=0.3)
    theirs.eval()
    ours.eval()
    inputs = _inputs(CASES[name], seed=3)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits)


@pytest.mark.parametrize("name", list(CASES))
def test_disable_adapter_gives_the_base_model(name: str) -> None:
    theirs, ours = _pair(name)
    inputs = _inputs(CASES[name])
    ours.eval()
    base = _base(name).eval()
    with torch.no_grad():
        expected = base(**inputs).logits
        adapted = ours(**inputs).logits
        with ours.disable_adapter():
            disabled = ours(**inputs).logits
        again = ours(**inputs).logits
    if CASES[name].lora.get("bias", "none") == "none":
        torch.testing.assert_close(disabled, expected)
    assert not torch.allclose(adapted, expected)
    torch.testing.assert_close(again, adapted)


@pytest.mark.parametrize("name", list(CASES))
def test_merged_equals_unmerged_and_merge_and_unload_equals_peft(name: str) -> None:
    theirs, ours = _pair(name)
    theirs.eval()
    ours.eval()
    inputs = _inputs(CASES[name])
    with torch.no_grad():
        unmerged = ours(**inputs).logits
        ours.merge_adapter()
        assert all(m.merged for m in ours.modules() if isinstance(m, LoraLinear))
        torch.testing.assert_close(ours(**inputs).logits, unmerged, rtol=1e-5, atol=1e-5)
        ours.unmerge_adapter()
        torch.testing.assert_close(ours(**inputs).logits, unmerged, rtol=1e-5, atol=1e-5)
        plain_theirs = theirs.merge_and_unload()
        plain_ours = ours.merge_and_unload()
        assert not any(isinstance(m, (LoraLinear, ModulesToSaveWrapper)) for m in plain_ours.modules())
        assert not hasattr(plain_ours, "peft_config")
        assert list(plain_ours.state_dict()) == list(plain_theirs.state_dict())
        for key, value in plain_theirs.state_dict().items():
            torch.testing.assert_close(plain_ours.state_dict()[key], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(plain_ours(**inputs).logits, plain_theirs(**inputs).logits,
                                   rtol=1e-5, atol=1e-5)


def test_multiple_active_adapters_sum_like_peft() -> None:
    theirs, ours = _pair("llama")
    extra = dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    torch.manual_seed(5)
    theirs.add_adapter("other", peft.LoraConfig(**extra))
    torch.manual_seed(5)
    ours.add_adapter("other", LoraConfig(**extra))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.base_model.set_adapter(["default", "other"])
    ours.base_model.set_adapter(["default", "other"])
    inputs = _inputs(CASES["llama"])
    logits_t, loss_t, grads_t = _run(theirs, inputs)
    logits_o, loss_o, grads_o = _run(ours, inputs)
    torch.testing.assert_close(logits_o, logits_t)
    assert grads_o.keys() == grads_t.keys()
    for key, grad in grads_t.items():
        torch.testing.assert_close(grads_o[key], grad)


@pytest.mark.parametrize("kind", ["linear", "cat", "svd"])
def test_add_weighted_adapter_matches_peft(kind: str) -> None:
    theirs, ours = _pair("gpt2")
    second = dict(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc", "mlp.c_proj"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(9)
        theirs.add_adapter("b", peft.LoraConfig(**second))
        torch.manual_seed(9)
        ours.add_adapter("b", LoraConfig(**second))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=kind)
    ours.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=kind)
    mix_t = {k: v for k, v in theirs.state_dict().items() if ".mix." in k}
    mix_o = {k: v for k, v in ours.state_dict().items() if ".mix." in k}
    assert mix_o.keys() == mix_t.keys() and mix_o
    if kind != "svd":  # SVD factors are unique only up to signs: compare the products below
        for key, value in mix_t.items():
            torch.testing.assert_close(mix_o[key], value)
    theirs.set_adapter("mix")
    ours.set_adapter("mix")
    theirs.eval()
    ours.eval()
    inputs = _inputs(CASES["gpt2"])
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, rtol=1e-5, atol=1e-5)
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r


@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_compiled_model_matches_peft(name: str) -> None:
    """`torch.compile(fullgraph=True)` over the lorafuse model (its layers then run as custom
    operators; a graph break would be an error) against eager PEFT: logits and every gradient of a
    loss on them — trained biases (qwen2, bias="lora_only": the operators' bias gradient) and
    GPT-2's Conv1D (fan_in_fan_out) included. Eval mode: the base models' own dropout is off. No
    labels go in: transformers' loss path logs a warning, a graph break of its own."""
    theirs, ours = _pair(name)
    ids = _inputs(CASES[name])["input_ids"]

    def logits_and_grads(model: Any, run: Callable[..., Any]) -> tuple[torch.Tensor, dict]:
        logits = run(input_ids=ids).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    theirs.eval()
    ours.eval()
    logits_t, grads_t = logits_and_grads(theirs, theirs)
    torch._dynamo.reset()
    try:
        logits_o, grads_o = logits_and_grads(ours, torch.compile(ours, fullgraph=True))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(logits_o, logits_t)
    assert grads_o.keys() == grads_t.keys() and grads_o
    for key, grad in grads_t.items():
        torch.testing.assert_close(grads_o[key], grad, msg=lambda m: f"{key}: {m}")
