"""lorafuse vs PEFT itself on tiny transformers models: same keys, counts, logits, loss, gradients.

Every test builds one model twice on identical base weights — stock ``peft.get_peft_model`` and
``lorafuse.get_peft_model`` — gives both the same (non-zero) adapter weights, and compares; it also
checks which path the lorafuse layers (`lorafuse.FusedLinear`) took: 'c' (the fused CPU kernels)
where they apply, 'peft' (PEFT's own forward) where they do not (merged, disabled, several active
adapters).

Bounds: the fused and stock forwards differ only in fp32 summation order (one GEMM per projection
each), which these two-layer models amplify far less than 10×: every tensor is compared to 1e-5 of
its own largest magnitude (`_assert_match`).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lorafuse  # noqa: E402
from lorafuse import FusedLinear  # noqa: E402
from peft.utils import ModulesToSaveWrapper  # noqa: E402
from stock_compile import unless_stock_peft_fails_too  # noqa: E402

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


def _base(name: str, dtype: Any = None) -> Any:
    """The untouched base model of a case (deterministic weights), in ``dtype`` if given."""
    torch.manual_seed(0)
    model = CASES[name].build()
    return model if dtype is None else model.to(dtype)


def _pair(name: str, dtype: Any = None, **overrides: Any) -> tuple[Any, Any]:
    """(PEFT model, lorafuse model) on identical base weights (in ``dtype`` if given: PEFT then keeps the
    adapters in fp32, its default), lorafuse given PEFT's randomised adapters."""
    case = CASES[name]
    base = _base(name, dtype)
    kwargs = {**case.lora, **overrides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(kwargs)))
        ours = lorafuse.get_peft_model(copy.deepcopy(base), lorafuse.LoraConfig(**copy.deepcopy(kwargs)))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in theirs.named_parameters():
            if "lora_" in pname or "modules_to_save" in pname or (p.requires_grad and pname.endswith("bias")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _fused(model: Any) -> list:
    """The lorafuse LoRA layers of ``model``."""
    return [m for m in model.modules() if isinstance(m, FusedLinear)]


def _paths(model: Any) -> set:
    """Which paths the lorafuse layers of ``model`` took in their last forward."""
    return {m.lorafuse_path for m in _fused(model)}


def _assert_fused_where(model: Any, adapter: str) -> None:
    """The last forward was fused ('c') exactly in the layers holding ``adapter``, the active one;
    elsewhere PEFT's forward ran (the bare base layer), and both kinds of layer exist."""
    paths = {(m.lorafuse_path, adapter in m.lora_A) for m in _fused(model)}
    assert paths == {("c", True), ("peft", False)}, paths


def _run(model: Any, inputs: dict) -> dict:
    """Logits, loss and every trainable parameter's gradient of one forward/backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the base models' own dropout draws the same masks in both runs
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return {"logits": out.logits.detach(), "loss": out.loss.detach(), **grads}


def _assert_match(got: dict, want: dict, tol: float = 1e-5) -> None:
    """Same keys (at least one), and each tensor of ``got`` within ``tol`` of the largest magnitude
    of ``want``'s (fp32 summation order is all that may differ). A bias gradient is a sum over every token
    of the upstream gradient, whose terms cancel: its rounding error scales with the terms, up to ~10× the
    result here (measured on Qwen2's k_proj: 1.06e-5 of the result on an AVX-512 Zen 4), so it gets 10 tol."""
    assert got.keys() == want.keys() and want
    for key, ref in want.items():
        assert ref is not None and got[key] is not None, key
        atol = tol * (10 if key.endswith("bias") else 1) * max(ref.abs().max().item(), 1e-3)
        torch.testing.assert_close(got[key], ref, rtol=0, atol=atol, msg=lambda m: f"{key}: {m}")


def _penalised_grads(model: Any, inputs: dict) -> dict:
    """Every trainable gradient of loss + Σ‖∂loss/∂adapter‖² (double backward through the adapters), eval mode."""
    model.get_base_model().set_attn_implementation("eager")  # SDPA on the CPU has no double backward
    model.eval()
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    grads = torch.autograd.grad(loss, params, create_graph=True)
    (loss + sum(g.square().sum() for g in grads)).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_keys_and_trainable_counts_match_peft(name: str, capsys: Any) -> None:
    theirs, ours = _pair(name)
    assert isinstance(ours, peft.PeftModel) and type(ours).__name__ == type(theirs).__name__
    assert list(ours.state_dict()) == list(theirs.state_dict())
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in theirs.named_parameters() if p.requires_grad]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    theirs.print_trainable_parameters()
    expected = capsys.readouterr().out
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == expected
    # every PEFT LoRA layer became a FusedLinear, and nothing else did
    adapted = {n for n, m in ours.named_modules() if isinstance(m, FusedLinear)}
    assert adapted and adapted == {n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert {n for n, m in ours.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)} == adapted
    wrapped = {n for n, m in ours.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    assert wrapped == {n for n, m in theirs.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    assert bool(wrapped) == (name == "bert")  # SEQ_CLS: the classifier is trained and saved
    # the config as adapted to the model (fan_in_fan_out, modules_to_save, ...) is what PEFT would save
    assert ours.peft_config["default"].to_dict() == theirs.peft_config["default"].to_dict()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("name", list(CASES))
def test_logits_loss_and_every_gradient_match_peft(name: str, dora: bool) -> None:
    """Plain LoRA, and DoRA (`lorafuse.dora`: the magnitude vectors' gradients among those compared)."""
    theirs, ours = _pair(name, **({"use_dora": True} if dora else {}))
    assert any("lora_magnitude_vector" in n for n, _ in ours.named_parameters()) == dora
    ours.train()
    theirs.train()
    inputs = _inputs(CASES[name])
    want = _run(theirs, inputs)
    got = _run(ours, inputs)
    assert _paths(ours) == {"c"}
    _assert_match(got, want)


def _max_err(got: dict, ref: dict) -> dict:
    """Per tensor: max |got − ref| / max |ref| (ref float64)."""
    return {k: float((got[k].double() - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30)) for k in ref}


def _assert_as_accurate_as_peft(got: dict, want: dict, ref: dict, dtype: str) -> None:
    """Half precision (or fp32 where a model amplifies summation order past `_assert_match`'s bound): lorafuse's
    tensors (got) as close to the float64 model's (ref) as PEFT's (want) — each error ≤ 3× PEFT's + 8 u_h (u_h the
    unit roundoff of dtype), the median ratio of errors ≤ 2 (why: test_half_precision_models_fused_...)."""
    u_h = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float32": 2.0 ** -24}[dtype]
    err_ours, err_theirs = _max_err(got, ref), _max_err(want, ref)
    for key in ref:
        assert got[key].dtype == want[key].dtype, key
        assert err_ours[key] <= 3 * err_theirs[key] + 8 * u_h, (key, err_ours[key], err_theirs[key])
    ratios = sorted(err_ours[k] / max(err_theirs[k], 1e-12) for k in ref)
    assert ratios[len(ratios) // 2] <= 2.0, ratios


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(CASES))
def test_half_precision_models_fused_and_at_least_as_accurate_as_peft(name: str, dtype: str, dora: bool) -> None:
    """The model in bf16 / fp16 with PEFT's default fp32 adapters (and fp32 DoRA magnitudes: `lorafuse.dora`'s
    `DoraHalfFunction`): every LoRA layer runs the C kernels ('c'), and logits, loss and every trainable
    gradient are as close to the float64 model of the same weights (adapters included) as PEFT's are. Both runs
    are dominated by the half-precision roundings of the rest of the model (activations, attention), which
    push each tensor's error up or down by chance (measured: ratios 0.3–4.3 per tensor, medians 0.6–1.5, over
    these eight models; with DoRA medians 0.8–1.04, the largest ratio 5 within the bound below); the fused
    layers round y and dx once where PEFT rounds twice. Required: the median ratio of errors ≤ 2, and
    each tensor's error ≤ 3× PEFT's + 8 u_h (u_h = 2⁻⁸ bf16, 2⁻¹¹ fp16: a few roundings of the tensor's
    largest value)."""
    half = getattr(torch, dtype)
    theirs, ours = _pair(name, half, **({"use_dora": True} if dora else {}))
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.float32}
    assert any("lora_magnitude_vector" in n for n, _ in ours.named_parameters()) == dora
    ref_model = copy.deepcopy(theirs).double()
    for model in (theirs, ours, ref_model):
        model.train()
        model.get_base_model().set_attn_implementation("eager")  # one attention kernel in all three
    inputs = _inputs(CASES[name])
    want = _run(theirs, inputs)
    got = _run(ours, inputs)
    assert _paths(ours) == {"c"}
    _assert_as_accurate_as_peft(got, want, _run(ref_model, inputs), dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_same_seed_gives_peft_initial_adapters_on_a_half_base(dtype: str) -> None:
    """PEFT's own initialisation (kaiming lora_A, zero lora_B, fp32 adapters on a half base): the same
    seed gives bit-identical adapters, so same-seed runs of the two start from one state."""
    base, kwargs = _base("llama", getattr(torch, dtype)), CASES["llama"].lora
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(5)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(kwargs)))
        torch.manual_seed(5)
        ours = lorafuse.get_peft_model(copy.deepcopy(base), lorafuse.LoraConfig(**copy.deepcopy(kwargs)))
    want, got = theirs.state_dict(), ours.state_dict()
    assert list(got) == list(want) and any("lora_A" in k for k in want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_double_backward_gradient_penalty_matches_peft(name: str) -> None:
    """create_graph=True through the fused layers (float32, the C kernels' forward): a penalty on
    the adapters' own gradients, backpropagated, gives PEFT's gradients (PEFT's modules are twice
    differentiable, so lorafuse's must be too)."""
    theirs, ours = _pair(name)
    assert {m.backend for m in _fused(ours)} == {"c"}
    inputs = _inputs(CASES[name])
    want = _penalised_grads(theirs, inputs)
    got = _penalised_grads(ours, inputs)
    assert _paths(ours) == {"c"}
    _assert_match(got, want)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("name", list(CASES))
def test_eval_mode_matches_peft_with_dropout_configured(name: str, dora: bool) -> None:
    """no_grad in eval mode: dropout configured but inactive, so DoRA is fused too (u may not be formed)."""
    theirs, ours = _pair(name, lora_dropout=0.3, **({"use_dora": True} if dora else {}))
    theirs.eval()
    ours.eval()
    inputs = _inputs(CASES[name], seed=3)
    with torch.no_grad():
        _assert_match({"logits": ours(**inputs).logits}, {"logits": theirs(**inputs).logits})
    assert _paths(ours) == {"c"}


@pytest.mark.parametrize("name", list(CASES))
def test_disable_adapter_gives_the_base_model(name: str) -> None:
    theirs, ours = _pair(name)
    inputs = _inputs(CASES[name])
    ours.eval()
    theirs.eval()
    base = _base(name).eval()
    with torch.no_grad():
        expected = base(**inputs).logits
        adapted = ours(**inputs).logits
        with ours.disable_adapter(), theirs.disable_adapter():
            disabled = ours(**inputs).logits
            assert _paths(ours) == {"peft"}
            disabled_theirs = theirs(**inputs).logits
        again = ours(**inputs).logits
        assert _paths(ours) == {"c"}
    torch.testing.assert_close(disabled, disabled_theirs, rtol=0, atol=0)  # PEFT's own code ran
    if CASES[name].lora.get("bias", "none") == "none":
        torch.testing.assert_close(disabled, expected)
    assert not torch.allclose(adapted, expected)
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("name", list(CASES))
def test_merged_equals_unmerged_and_merge_and_unload_equals_peft(name: str, dora: bool) -> None:
    theirs, ours = _pair(name, **({"use_dora": True} if dora else {}))
    theirs.eval()
    ours.eval()
    inputs = _inputs(CASES[name])
    with torch.no_grad():
        unmerged = ours(**inputs).logits
        ours.merge_adapter()
        assert all(m.merged for m in _fused(ours))
        _assert_match({"logits": ours(**inputs).logits}, {"logits": unmerged})
        assert _paths(ours) == {"peft"}
        ours.unmerge_adapter()
        _assert_match({"logits": ours(**inputs).logits}, {"logits": unmerged})
        assert _paths(ours) == {"c"}
        plain_theirs = theirs.merge_and_unload()
        plain_ours = ours.merge_and_unload()
        assert not any(isinstance(m, (peft.tuners.lora.LoraLayer, ModulesToSaveWrapper))
                       for m in plain_ours.modules())
        assert not hasattr(plain_ours, "peft_config")
        assert type(plain_ours) is type(plain_theirs)
        assert list(plain_ours.state_dict()) == list(plain_theirs.state_dict())
        _assert_match(plain_ours.state_dict(), plain_theirs.state_dict())
        _assert_match({"logits": plain_ours(**inputs).logits}, {"logits": plain_theirs(**inputs).logits})


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_merge_is_peft_merge(dtype: str) -> None:
    """Merging into a bf16 / fp16 W is PEFT's own code (the delta in fp32, added to W in its dtype):
    merge_and_unload gives PEFT's weights bit for bit; the merged model's logits differ from the
    fused unmerged forward's by W's rounding only (within 2⁻⁶ of their magnitude, a few roundings)."""
    half = getattr(torch, dtype)
    theirs, ours = _pair("llama", half)
    theirs.eval()
    ours.eval()
    inputs = _inputs(CASES["llama"])
    with torch.no_grad():
        unmerged = ours(**inputs).logits
        assert _paths(ours) == {"c"}
        plain_theirs, plain_ours = theirs.merge_and_unload(), ours.merge_and_unload()
        want = plain_theirs.state_dict()
        for key, value in plain_ours.state_dict().items():
            assert value.dtype == want[key].dtype and torch.equal(value, want[key]), key
        merged = plain_ours(**inputs).logits
    assert float((merged - unmerged).abs().max()) <= 2.0 ** -6 * float(unmerged.abs().max())


def test_multiple_active_adapters_set_and_delete_like_peft() -> None:
    """Two active adapters sum like PEFT's (PEFT's forward runs); back to one active adapter, by
    set_adapter or delete_adapter, the fused path runs again with PEFT's results."""
    theirs, ours = _pair("llama")
    extra = dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    torch.manual_seed(5)
    theirs.add_adapter("other", peft.LoraConfig(**extra))
    torch.manual_seed(5)
    ours.add_adapter("other", lorafuse.LoraConfig(**extra))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    # add_adapter on the new target o_proj made FusedLinear layers too (the fused tuner)
    assert any(name.endswith("o_proj") for name, m in ours.named_modules() if isinstance(m, FusedLinear))
    inputs = _inputs(CASES["llama"])
    for model in (theirs, ours):
        model.base_model.set_adapter(["default", "other"])
    got = _run(ours, inputs)
    assert _paths(ours) == {"peft"}
    _assert_match(got, _run(theirs, inputs))
    for model in (theirs, ours):
        model.set_adapter("other")
    got = _run(ours, inputs)
    _assert_fused_where(ours, "other")  # q_proj, o_proj
    _assert_match(got, _run(theirs, inputs))
    for model in (theirs, ours):
        model.delete_adapter("other")
        model.set_adapter("default")
    got = _run(ours, inputs)
    _assert_fused_where(ours, "default")  # o_proj's layers are left without an adapter
    _assert_match(got, _run(theirs, inputs))


@pytest.mark.parametrize("kind", ["linear", "cat", "svd"])
def test_add_weighted_adapter_matches_peft(kind: str) -> None:
    theirs, ours = _pair("gpt2")
    second = dict(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc", "mlp.c_proj"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(9)
        theirs.add_adapter("b", peft.LoraConfig(**second))
        torch.manual_seed(9)
        ours.add_adapter("b", lorafuse.LoraConfig(**second))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=kind)
    ours.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=kind)
    mix_t = {k: v for k, v in theirs.state_dict().items() if ".mix." in k}
    mix_o = {k: v for k, v in ours.state_dict().items() if ".mix." in k}
    assert mix_o.keys() == mix_t.keys() and mix_o
    if kind != "svd":  # SVD factors are unique only up to signs: compare the products below
        _assert_match(mix_o, mix_t)
    theirs.set_adapter("mix")
    ours.set_adapter("mix")
    theirs.eval()
    ours.eval()
    inputs = _inputs(CASES["gpt2"])
    with torch.no_grad():
        _assert_match({"logits": ours(**inputs).logits}, {"logits": theirs(**inputs).logits})
    assert _paths(ours) == {"c"}
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r


@pytest.mark.parametrize("name, dora", [("qwen2", False), ("gpt2", False), ("llama", True)],
                         ids=["qwen2", "gpt2", "llama-dora"])
def test_compiled_model_matches_peft(name: str, dora: bool) -> None:
    """`torch.compile(fullgraph=True)` over the lorafuse model (its layers then run as custom
    operators; a graph break would be an error) against eager PEFT: logits and every gradient of a
    loss on them — trained biases (qwen2, bias="lora_only": the operators' bias gradient) and
    GPT-2's Conv1D (fan_in_fan_out) included. Eval mode: the base models' own dropout is off. No
    labels go in: transformers' loss path logs a warning, a graph break of its own. DoRA: the operator and the
    row norms in traceable torch ops (`lorafuse.dora.dora_linear_op`)."""
    theirs, ours = _pair(name, **({"use_dora": True} if dora else {}))
    ids = _inputs(CASES[name])["input_ids"]

    def logits_and_grads(model: Any, run: Callable[..., Any]) -> dict:
        logits = run(input_ids=ids).logits
        logits.square().mean().backward()
        return {"logits": logits.detach(), **{n: p.grad for n, p in model.named_parameters() if p.requires_grad}}

    theirs.eval()
    ours.eval()
    want = logits_and_grads(theirs, theirs)
    torch._dynamo.reset()
    try:
        with unless_stock_peft_fails_too(lambda: theirs, input_ids=ids):
            got = logits_and_grads(ours, torch.compile(ours, fullgraph=True))
    finally:
        torch._dynamo.reset()
    assert _paths(ours) == {"c"}
    _assert_match(got, want)
