"""lorafuse vs PEFT itself across transformers architectures: logits, loss, every gradient, the fused path.

tests/test_peft_parity.py checks Llama, Qwen2, GPT-2 and BERT in depth; this file runs one forward and backward
(train mode, LoRA dropout 0; the base models' own dropout draws the same masks in both runs, `_run` seeds it) on a
tiny random model of each of more architectures, each picked for a structural feature of its own (see ARCHS), with
``target_modules="all-linear"`` (PEFT's resolution: every nn.Linear / Conv1D but the output head) and r=4, alpha=8.
Each model is built twice on identical base weights — stock ``peft.get_peft_model`` and ``lorafuse.get_peft_model``
— both get the same non-zero adapter weights, and the test requires:

- the same LoRA layers (by module name and PEFT class), every PEFT ``lora.Linear`` a ``lorafuse.FusedLinear`` and
  nothing else one, the same ``modules_to_save`` wrappers and the same resolved config;
- logits, loss and every trainable parameter's gradient within 1e-5 of each tensor's own largest magnitude
  (test_peft_parity's `_assert_match`: the fused and stock forwards differ only in fp32 summation order) — or, for
  a model that amplifies summation order past that (T5, see ARCHS), as close to the float64 model's as PEFT's
  (`_assert_as_accurate_as_peft` with fp32's unit roundoff);
- every ``FusedLinear`` took the fused C path (``lorafuse_path == "c"``) in that forward.

MoE models in transformers 5 keep their experts as 3-D parameters (``experts.gate_up_proj`` (E, 2·I, H),
``experts.down_proj`` (E, H, I)) and their router as a custom module with a ``weight`` parameter — no nn.Linear.
PEFT 0.21.2 then resolves "all-linear" two ways (peft.utils.transformers_weight_conversion): for the model types in
its v4→v5 conversion table (Mixtral, and OLMoE / Qwen3-MoE, which it maps onto Qwen2-MoE's patterns) it adds
``target_parameters`` {"gate.weight", "gate_up_proj", "down_proj"} — LoRA on the router and the stacked experts
through PEFT's ``ParamWrapper`` (rank and alpha doubled on gate_up_proj), which lorafuse leaves as PEFT's code —
and keeps the attention projections as ``lora.Linear`` (fused); for Qwen2-MoE itself (not a key of that table) the
experts and router stay untouched and the shared expert's nn.Linear layers are adapted (fused). Both are tested.

The bf16 case: two of the models with the base in bfloat16 and PEFT's default fp32 adapters: every FusedLinear
fused, and logits, loss and gradients at least as close to the float64 model of the same weights as PEFT's
(test_peft_parity's `_assert_as_accurate_as_peft`: each error ≤ 3× PEFT's + 8 u_h, the median ratio ≤ 2).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lorafuse  # noqa: E402
from lorafuse import FusedLinear  # noqa: E402
from peft.tuners.lora import LoraLayer, ParamWrapper  # noqa: E402
from peft.tuners.lora import Linear as PeftLinear  # noqa: E402
from peft.utils import ModulesToSaveWrapper  # noqa: E402
from test_peft_parity import BATCH, SEQ, VOCAB, _assert_as_accurate_as_peft, _assert_match, _run  # noqa: E402

# the decoder-only models' shared shape: hidden 32, 2 layers, 4 query heads over 2 key/value heads
DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=32)


@dataclass
class Arch:
    """A tiny model of one architecture and how it is trained (kwargs shared by PEFT and lorafuse)."""

    build: Callable[[], Any]
    task_type: str = "CAUSAL_LM"
    labels: str = "lm"  # "lm": labels = input_ids; "cls": a class per sequence; "seq2seq": decoder labels
    expert_params: bool = False  # PEFT also adapts the router and the 3-D expert parameters (ParamWrapper)
    # fp32 compared through the float64 model (at least as accurate as PEFT) instead of to PEFT within 1e-5
    vs_float64: bool = False


def _decoder(config: Any, model: Any, **overrides: Any) -> Callable[[], Any]:
    """A builder of ``model(config(**DECODER, **overrides))``."""
    return lambda: model(config(**{**DECODER, **overrides}))


def _gemma2() -> Any:
    cfg = transformers.Gemma2Config(**DECODER, head_dim=8, sliding_window=4, query_pre_attn_scalar=8)
    model = transformers.Gemma2ForCausalLM(cfg)
    model.set_attn_implementation("eager")  # the attention logits' soft-capping is applied by the eager kernel
    return model


def _opt() -> Any:
    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=16,
                                 pad_token_id=0)
    return transformers.OPTForCausalLM(cfg)


def _gpt_neox() -> Any:
    cfg = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=32)
    return transformers.GPTNeoXForCausalLM(cfg)


def _falcon() -> Any:
    cfg = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    multi_query=True, parallel_attn=True)
    return transformers.FalconForCausalLM(cfg)


def _t5() -> Any:
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg)


def _roberta() -> Any:
    cfg = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=40, max_position_embeddings=SEQ + 3, num_labels=3)
    return transformers.RobertaForSequenceClassification(cfg)


ARCHS = {
    # sliding-window attention (window 4 < 7 tokens) with grouped-query attention
    "mistral": Arch(_decoder(transformers.MistralConfig, transformers.MistralForCausalLM, sliding_window=4)),
    # tied embeddings (the head left out of all-linear), final-logit and attention soft-capping, sandwich norms
    "gemma2": Arch(_gemma2),
    # q_norm / k_norm on the projected heads; head_dim 16 × 4 heads ≠ hidden 32 (q_proj 32→64, o_proj 64→32)
    "qwen3": Arch(_decoder(transformers.Qwen3Config, transformers.Qwen3ForCausalLM, head_dim=16)),
    # fused qkv_proj and gate_up_proj: one LoRA layer whose output the model splits
    "phi3": Arch(_decoder(transformers.Phi3Config, transformers.Phi3ForCausalLM, pad_token_id=0)),
    # biases on every projection; project_in / project_out (word_embed_proj_dim 16 ≠ hidden 32), learned positions
    "opt": Arch(_opt),
    # fused query_key_value split per head, parallel residual, partial rotary embeddings
    "gpt_neox": Arch(_gpt_neox),
    # FalconLinear (an nn.Linear subclass) everywhere; multi-query fused query_key_value, parallel attention
    "falcon": Arch(_falcon),
    # encoder–decoder: cross-attention, relative position bias, gated FFN (wi_0, wi_1), bias-free projections,
    # decoder inputs shifted from the labels by the model, 5 decoder against 7 encoder tokens
    # (gated-GELU T5 amplifies fp32 summation order past 1e-5: PEFT's own gradients are 1.8e-5 of their largest
    # magnitude from the float64 model's, lorafuse's 1.0e-5 (AVX2) – 1.4e-5 (generic); so vs_float64)
    "t5": Arch(_t5, task_type="SEQ_2_SEQ_LM", labels="seq2seq", vs_float64=True),
    # sequence classification: the classification head (dense + out_proj) a modules_to_save wrapper, trained
    # DistilBERT left out: PEFT 0.21.2 fails (SEQ_CLS's "classifier" suffix-matches the LoRA'd pre_classifier)
    "roberta": Arch(_roberta, task_type="SEQ_CLS", labels="cls"),
    # MoE with a shared expert: its MLP and shared_expert_gate (out_features 1) fused, 3-D experts untouched
    "qwen2_moe": Arch(_decoder(transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, num_experts=4,
                               num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=40)),
    # MoE: PEFT's ParamWrapper LoRA on the router and the 3-D experts beside fused attention (with q/k norms); the
    # router's load-balancing loss in the loss
    "qwen3_moe": Arch(_decoder(transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, head_dim=16,
                               num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                               output_router_logits=True), expert_params=True),
}

HALF_ARCHS = ["phi3", "opt"]  # fused projections, no biases; biases everywhere, 16-wide project_in


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Any:
    """torch's own ops on one thread for this module (restored after; lorafuse's thread count is its own, set at
    import, and unchanged): at 14 tokens × 32 features nothing gains from a second thread, and on a 2-core machine
    shared with another job torch's OpenMP workers spin-wait for a busy core — measured 14-25 s for this file with
    2 threads against under 2 s with 1, stock PEFT's models as slow as lorafuse's."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs(arch: Arch) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen)
    if arch.labels == "cls":
        return {"input_ids": ids, "labels": torch.randint(0, 3, (BATCH,), generator=gen)}
    if arch.labels == "seq2seq":
        return {"input_ids": ids, "labels": torch.randint(1, VOCAB, (BATCH, SEQ - 2), generator=gen)}
    return {"input_ids": ids, "labels": ids}


def _pair(name: str, dtype: Any = None) -> tuple[Any, Any]:
    """(PEFT model, lorafuse model) of architecture ``name`` on identical base weights (in ``dtype`` if given:
    PEFT then keeps the adapters in fp32, its default), lorafuse given PEFT's randomised adapters."""
    arch = ARCHS[name]
    torch.manual_seed(0)
    base = arch.build()
    if dtype is not None:
        base = base.to(dtype)
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear", task_type=arch.task_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
        ours = lorafuse.get_peft_model(copy.deepcopy(base), lorafuse.LoraConfig(**kwargs))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in theirs.named_parameters():
            if "lora_" in pname or "modules_to_save" in pname:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _assert_same_adapted_modules(theirs: Any, ours: Any, arch: Arch) -> None:
    """The same LoRA layers by name; PEFT's lora.Linear layers (and only those) FusedLinear in ours, every other
    LoRA layer (ParamWrapper) PEFT's own class; the same modules_to_save wrappers; the same resolved config."""
    want = {n: type(m) for n, m in theirs.named_modules() if isinstance(m, LoraLayer)}
    got = {n: type(m) for n, m in ours.named_modules() if isinstance(m, LoraLayer)}
    assert got.keys() == want.keys() and want
    assert {n for n, t in got.items() if t is FusedLinear} == {n for n, t in want.items() if t is PeftLinear}
    assert {n: t for n, t in got.items() if t is not FusedLinear} == {n: t for n, t in want.items()
                                                                      if t is not PeftLinear}
    assert any(t is ParamWrapper for t in want.values()) == arch.expert_params
    wrapped = {n for n, m in ours.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    assert wrapped == {n for n, m in theirs.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    assert bool(wrapped) == (arch.labels == "cls")
    assert ours.peft_config["default"].to_dict() == theirs.peft_config["default"].to_dict()


def _assert_all_fused(model: Any) -> None:
    """Every FusedLinear of ``model`` (fresh: none had run before) took the C kernels in its last forward."""
    paths = {n: m.lorafuse_path for n, m in model.named_modules() if isinstance(m, FusedLinear)}
    unfused = sorted(n for n, path in paths.items() if path != "c")
    assert paths and not unfused, (f"{len(unfused)} of {len(paths)} FusedLinear layers not fused, "
                                   f"paths {sorted(set(map(str, paths.values())))}: {unfused[:3]}")


@pytest.mark.parametrize("name", list(ARCHS))
def test_logits_loss_and_every_gradient_match_peft(name: str) -> None:
    arch = ARCHS[name]
    theirs, ours = _pair(name)
    _assert_same_adapted_modules(theirs, ours, arch)
    theirs.train()
    ours.train()
    inputs = _inputs(arch)
    want = _run(theirs, inputs)
    got = _run(ours, inputs)
    if arch.vs_float64:
        _assert_as_accurate_as_peft(got, want, _run(_float64(theirs), inputs), "float32")
    else:
        _assert_match(got, want)
    _assert_all_fused(ours)


def _float64(model: Any) -> Any:
    """A float64 copy of ``model`` (a PEFT model: adapters included), in train mode."""
    ref = copy.deepcopy(model).double()
    ref.train()
    return ref


@pytest.mark.parametrize("name", HALF_ARCHS)
def test_bf16_base_fused_and_at_least_as_accurate_as_peft(name: str) -> None:
    """bf16 base, fp32 adapters (test_peft_parity's test_half_precision_models_fused_and_at_least_as_accurate_as_peft
    says why the bounds): against the float64 model of the same weights, adapters included."""
    theirs, ours = _pair(name, torch.bfloat16)
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.float32}
    ref_model = _float64(theirs)
    for model in (theirs, ours, ref_model):
        model.train()
        # one attention and one experts kernel in all three (grouped_mm, the MoE default, takes no float64)
        model.get_base_model().set_attn_implementation("eager")
        model.get_base_model().set_experts_implementation("eager")
    inputs = _inputs(ARCHS[name])
    want = _run(theirs, inputs)
    got = _run(ours, inputs)
    _assert_all_fused(ours)
    _assert_as_accurate_as_peft(got, want, _run(ref_model, inputs), "bfloat16")
