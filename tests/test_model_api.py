"""lorafuse's model-level API (`lorafuse.peft_api`) against stock PEFT: `get_peft_model` returns PEFT's own
model class (its lorafuse twin) with `FusedLoraModel` and `FusedLinear` layers, targets exactly what PEFT
targets, and every adapter-management scenario gives PEFT's logits, fused where one plain adapter is
active ('c') and PEFT's own forward elsewhere ('peft'); `fuse_peft_model` / `unfuse_peft_model`, pickle,
deepcopy, direct construction, argument errors and ``generate``.

Bounds: fused and stock differ only in fp32 summation order inside each projection; on these two-layer
models with hidden size 32 that stays far below rtol 1e-4 / atol 1e-5 on the logits.
"""

from __future__ import annotations

import copy
import functools
import pickle
import types
from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.tuners.lora import LoraLayer  # noqa: E402
from torch import nn  # noqa: E402

import lorafuse  # noqa: E402
from lorafuse.peft_api import FusedLoraModel  # noqa: E402
from lorafuse.peft_fused import FusedLinear, PeftLinear  # noqa: E402

VOCAB = 53
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
Pair = tuple[Any, Any]  # (stock PEFT model, lorafuse model)


def _llama(layers: int = 2, head: str = "causal") -> Any:
    """A tiny Llama with deterministic random weights: causal LM or 3-label sequence classifier."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   pad_token_id=0, num_labels=3)
    torch.manual_seed(0)
    cls = transformers.LlamaForCausalLM if head == "causal" else transformers.LlamaForSequenceClassification
    return cls(cfg).eval()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _paths(model: nn.Module) -> dict[str, str]:
    """Which path each LoRA layer's last forward took, keyed by a short name such as '0.self_attn.q_proj'."""
    return {name.split("layers.")[-1]: m.lorafuse_path for name, m in _lora_layers(model).items()}


def _randomise(model: nn.Module, seed: int = 1) -> None:
    """Non-zero adapters (PEFT initialises B to zero) and trained-looking modules_to_save copies."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)


def _sync(pair: Pair) -> None:
    """Give the lorafuse model the stock model's (randomised) weights; the keys must be identical."""
    stock, ours = pair
    _randomise(stock)
    ours.load_state_dict(stock.state_dict(), strict=True)


def _twins(make: Callable[[], Any] = _llama, **conf: Any) -> Pair:
    """(stock PEFT model, lorafuse model) on copies of one base, with the same random adapter weights."""
    base = make()
    pair = (peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**conf)),
            lorafuse.get_peft_model(base, lorafuse.LoraConfig(**conf)))
    _sync(pair)
    return pair


def _on_both(pair: Pair, action: Callable[[Any], Any]) -> tuple[Any, Any]:
    return action(pair[0]), action(pair[1])


def _assert_same_logits(pair: Pair, ids: torch.Tensor) -> torch.Tensor:
    """Stock and lorafuse logits agree (fp32 summation-order bounds); returns lorafuse's."""
    with torch.no_grad():
        ref, got = _on_both(pair, lambda m: m(input_ids=ids).logits)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    return got


def _assert_converted(model: Any, stock_cls: type) -> None:
    """``model`` is the lorafuse twin of PEFT's ``stock_cls``, its tuner and every LoRA Linear converted."""
    assert isinstance(model, stock_cls) and type(model).__mro__[1] is stock_cls
    assert type(model).__name__ == stock_cls.__name__
    assert type(model.base_model) is FusedLoraModel and repr(model.base_model).startswith("LoraModel(")
    layers = _lora_layers(model)
    assert layers and all(type(m) is FusedLinear for m in layers.values())


@pytest.mark.parametrize("task_type, stock_cls", [(None, peft.PeftModel), ("CAUSAL_LM", peft.PeftModelForCausalLM)])
def test_get_peft_model_returns_the_peft_model_of_the_task_converted(task_type: Any, stock_cls: type) -> None:
    base = _llama()
    model = lorafuse.get_peft_model(base, lorafuse.LoraConfig(task_type=task_type, **LORA))
    _assert_converted(model, stock_cls)
    stock = peft.get_peft_model(_llama(), peft.LoraConfig(task_type=task_type, **LORA))
    assert type(stock) is stock_cls and type(model) is not stock_cls  # no global patch left behind
    assert model.get_base_model() is base and model.active_adapters == ["default"]
    if task_type is None:
        assert type(model) is lorafuse.PeftModel


_LLAMA3 = functools.partial(_llama, 3)  # three layers, so that layers_to_transform picks some


@pytest.mark.parametrize("make, kwargs", [
    (_LLAMA3, dict(target_modules=["q_proj", "v_proj"])),
    (_LLAMA3, dict(target_modules=["self_attn.o_proj", "mlp.up_proj"])),
    (_LLAMA3, dict(target_modules=r".*\.(q|k)_proj")),
    (_LLAMA3, dict(target_modules="all-linear")),
    (_LLAMA3, dict(target_modules="all-linear", exclude_modules=["o_proj", "gate_proj"])),
    (_LLAMA3, dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.0\..*")),
    (_LLAMA3, dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2])),
    (_LLAMA3, dict(target_modules=["down_proj"], layers_to_transform=1, layers_pattern="layers")),
    (_LLAMA3, dict(target_modules=None)),
    (_LLAMA3, dict(target_modules=["q_proj"], rank_pattern={r"layers\.1\.self_attn\.q_proj": 2},
                   alpha_pattern={"q_proj": 3})),
    (lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), dict(target_modules="all-linear")),
], ids=["list", "dotted-suffix", "regex", "all-linear", "exclude-list", "exclude-regex", "layers-list",
        "layers-pattern", "default-targets", "rank-alpha-pattern", "plain-module-all-linear"])
def test_targeted_modules_ranks_and_scalings_match_peft(make: Callable[[], nn.Module], kwargs: dict) -> None:
    base = make()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, **copy.deepcopy(kwargs)))
    ours = lorafuse.get_peft_model(base, lorafuse.LoraConfig(r=4, **copy.deepcopy(kwargs)))
    mine, ref = _lora_layers(ours), _lora_layers(theirs)
    assert mine.keys() == ref.keys() and mine
    assert all(type(m) is FusedLinear for m in mine.values()) and all(type(m) is PeftLinear for m in ref.values())
    assert {n: (m.r, m.scaling) for n, m in mine.items()} == {n: (m.r, m.scaling) for n, m in ref.items()}
    assert ours.peft_config["default"].target_modules == theirs.peft_config["default"].target_modules


def test_add_set_and_delete_adapter_match_peft() -> None:
    """An adapter added on new target modules (k_proj) gets FusedLinear layers; each layer is fused exactly
    when it holds the one active adapter."""
    pair = _twins(**LORA)
    ours, ids = pair[1], _ids()
    _assert_same_logits(pair, ids)
    assert set(_paths(ours).values()) == {"c"}
    _on_both(pair, lambda m: m.add_adapter("second", lorafuse.LoraConfig(r=2, lora_alpha=4,
                                                                         target_modules=["k_proj", "v_proj"])))
    _sync(pair)
    _assert_converted(ours, type(pair[0]))  # the k_proj layers are new, and FusedLinear too

    def paths_by_projection() -> dict[str, set[str]]:
        """Logits checked against PEFT's, then the paths the forward took, per kind of projection."""
        _assert_same_logits(pair, ids)
        paths = _paths(ours)
        return {proj: {p for n, p in paths.items() if n.endswith(proj)} for proj in ("q_proj", "k_proj", "v_proj")}

    assert paths_by_projection() == {"q_proj": {"c"}, "k_proj": {"peft"}, "v_proj": {"c"}}
    _on_both(pair, lambda m: m.set_adapter("second"))
    assert paths_by_projection() == {"q_proj": {"peft"}, "k_proj": {"c"}, "v_proj": {"c"}}
    _on_both(pair, lambda m: m.base_model.set_adapter(["default", "second"]))  # two active: PEFT sums them
    assert paths_by_projection() == {"q_proj": {"peft"}, "k_proj": {"peft"}, "v_proj": {"peft"}}
    _on_both(pair, lambda m: m.set_adapter("default"))
    _on_both(pair, lambda m: m.delete_adapter("second"))
    assert set(ours.peft_config) == {"default"} and not any(".second." in k for k in ours.state_dict())
    assert paths_by_projection() == {"q_proj": {"c"}, "k_proj": {"peft"}, "v_proj": {"c"}}


def test_disable_merge_unmerge_and_unload_match_peft() -> None:
    pair = _twins(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"])
    ours, ids = pair[1], _ids(1)
    with pair[0].disable_adapter(), ours.disable_adapter():
        disabled = _assert_same_logits(pair, ids)
        assert set(_paths(ours).values()) == {"peft"}
    adapted = _assert_same_logits(pair, ids)
    assert set(_paths(ours).values()) == {"c"} and not torch.allclose(adapted, disabled)
    _on_both(pair, lambda m: m.merge_adapter())
    _assert_same_logits(pair, ids)  # merged: PEFT's own merge and forward in both
    assert set(_paths(ours).values()) == {"peft"}
    _on_both(pair, lambda m: m.unmerge_adapter())
    _assert_same_logits(pair, ids)
    assert set(_paths(ours).values()) == {"c"}
    merged = _on_both(pair, lambda m: copy.deepcopy(m).merge_and_unload())
    _assert_same_logits(merged, ids)
    unloaded = _on_both(pair, lambda m: m.unload())
    for plain in (*merged, *unloaded):
        assert not _lora_layers(plain) and type(plain) is transformers.LlamaForCausalLM
    # unload() keeps W as merge/unmerge left it: the base model again up to that rounding
    torch.testing.assert_close(_assert_same_logits(unloaded, ids), disabled, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("combination_type", ["linear", "cat"])
def test_add_weighted_adapter_matches_peft(combination_type: str) -> None:
    pair = _twins(**LORA)
    _on_both(pair, lambda m: m.add_adapter("second", lorafuse.LoraConfig(**LORA)))
    _sync(pair)
    _on_both(pair, lambda m: m.add_weighted_adapter(["default", "second"], [0.6, 0.9], "mix",
                                                    combination_type=combination_type))
    _on_both(pair, lambda m: m.set_adapter("mix"))
    _assert_same_logits(pair, _ids(2))
    assert set(_paths(pair[1]).values()) == {"c"}


def test_sequence_classification_head_matches_peft() -> None:
    """task_type SEQ_CLS: PEFT wraps the head (``score``) in its modules_to_save wrapper; logits, loss and
    every trainable gradient (adapters and head copy) equal PEFT's, the adapters fused."""
    pair = _twins(lambda: _llama(head="cls"), task_type="SEQ_CLS", **LORA)
    stock, ours = pair
    _assert_converted(ours, peft.PeftModelForSequenceClassification)
    score = ours.base_model.model.score
    assert type(score) is type(stock.base_model.model.score) and score.active_adapters == ["default"]
    ids, labels = _ids(3), torch.tensor([0, 2])

    def step(model: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    (ref, ref_grads), (got, grads) = _on_both(pair, step)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and any("modules_to_save" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-5 * ref_grads[name].abs().max().item())
    assert set(_paths(ours).values()) == {"c"}
    with stock.disable_adapter(), ours.disable_adapter():
        _assert_same_logits(pair, ids)
    _assert_same_logits(_on_both(pair, lambda m: m.merge_and_unload()), ids)


def test_fuse_and_unfuse_a_stock_model_restore_the_exact_stock_classes() -> None:
    model = peft.get_peft_model(_llama(), peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
    _randomise(model)
    ids = _ids(4)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        count = len(_lora_layers(model))
        assert count == 14 and lorafuse.fuse_peft_model(model) == count
        _assert_converted(model, peft.PeftModelForCausalLM)
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-5)
        assert set(_paths(model).values()) == {"c"}
        assert lorafuse.unfuse_peft_model(model) == count
        assert type(model) is peft.PeftModelForCausalLM and type(model.base_model) is peft.LoraModel
        assert all(type(m) is PeftLinear for m in _lora_layers(model).values())
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)  # PEFT's code again
    holder = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["0", "2"]),
                                          nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    assert lorafuse.fuse_peft_model(holder) == 2 and type(holder[0]) is FusedLinear and type(holder) is nn.Sequential


@pytest.mark.parametrize("clone", [lambda m: pickle.loads(pickle.dumps(m)), copy.deepcopy], ids=["pickle", "deepcopy"])
def test_pickle_and_deepcopy_keep_the_lorafuse_classes(clone: Callable[[Any], Any]) -> None:
    pair = _twins(task_type="CAUSAL_LM", **LORA)
    copied = clone(pair[1])
    assert type(copied) is type(pair[1]) and copied.base_model.model is not pair[1].base_model.model
    _assert_converted(copied, peft.PeftModelForCausalLM)
    _assert_same_logits((pair[0], copied), _ids(5))
    assert set(_paths(copied).values()) == {"c"}


@pytest.mark.parametrize("twin, stock_cls", [
    (lorafuse.PeftModel, peft.PeftModel),
    (lorafuse.peft_api.FusedPeftModelForCausalLM, peft.PeftModelForCausalLM),
], ids=["PeftModel", "PeftModelForCausalLM"])
def test_direct_construction_is_converted(twin: type, stock_cls: type) -> None:
    base = _llama()
    pair = (stock_cls(copy.deepcopy(base), peft.LoraConfig(**LORA)), twin(base, lorafuse.LoraConfig(**LORA)))
    assert type(pair[1]) is twin
    _assert_converted(pair[1], stock_cls)
    _sync(pair)
    _assert_same_logits(pair, _ids(6))
    assert set(_paths(pair[1]).values()) == {"c"}


_HOLDER = nn.Sequential(nn.Linear(4, 4))
_OLD_STYLE = types.SimpleNamespace(peft_type="LORA", r=4, lora_alpha=8, target_modules=["0"])


@pytest.mark.parametrize("call, error, match", [
    (lambda: lorafuse.get_peft_model("model", lorafuse.LoraConfig(target_modules=["0"])), TypeError,
     "model must be a torch.nn.Module"),
    (lambda: lorafuse.get_peft_model(_HOLDER, {"r": 4, "target_modules": ["0"]}), TypeError, "peft_config"),
    (lambda: lorafuse.get_peft_model(_HOLDER, _OLD_STYLE), TypeError, "peft_config"),
    (lambda: lorafuse.get_peft_model(_HOLDER, lorafuse.LoraConfig(target_modules=["0"]), adapter_name=""),
     ValueError, "adapter_name"),
    (lambda: lorafuse.fuse_peft_model("model"), TypeError, "torch.nn.Module"),
    (lambda: lorafuse.unfuse_peft_model(None), TypeError, "torch.nn.Module"),
], ids=["model-str", "config-dict", "config-old-style", "adapter-name-empty", "fuse-str", "unfuse-none"])
def test_bad_arguments_raise_before_touching_the_model(call: Callable[[], Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()
    assert type(_HOLDER[0]) is nn.Linear and not hasattr(_HOLDER, "peft_config")


def test_generate_matches_peft_greedy() -> None:
    pair = _twins(task_type="CAUSAL_LM", **LORA)
    kwargs = dict(input_ids=_ids(7), max_new_tokens=3, do_sample=False, pad_token_id=0)
    ref, got = _on_both(pair, lambda m: m.generate(**kwargs))
    assert got.shape == (2, 9) and torch.equal(got, ref)
    assert set(_paths(pair[1]).values()) == {"c"}


def test_an_offloaded_model_runs_peft_forward_and_gives_peft_logits() -> None:
    """accelerate's offload (``device_map`` with "cpu" / "disk" entries, ``cpu_offload``) keeps a module's weights
    on the meta device and puts them in place from a forward it sets on the instance: the LoRA layers there take
    PEFT's forward (`layers.unhooked`) instead of handing meta tensors to the kernels, and give PEFT's logits."""
    accelerate = pytest.importorskip("accelerate")
    pair = _twins(task_type="CAUSAL_LM", **LORA)
    for model in pair:
        accelerate.cpu_offload(model.get_base_model(), execution_device=torch.device("cpu"))
    q_proj = pair[1].get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.weight.device.type == "meta" and "forward" in q_proj.base_layer.__dict__
    _assert_same_logits(pair, _ids(3))
    assert set(_paths(pair[1]).values()) == {"peft"}
