"""LoRA layers on 8-bit (LLM.int8) bases: `lorafuse.qlora.FusedLinear8bitLt` (PEFT's LoRA layer on bitsandbytes'
Linear8bitLt, fused) and `lorafuse.qlora.LoraLinear8bit` (on `lorafuse.quantize(model, "int8")`'s Linear8bit).
A Llama config loaded 8-bit by transformers + bitsandbytes, PEFT's LoRA vs lorafuse's: every LoRA layer fused
('c') in training mode, logits, loss and adapter gradients at least as close to the float64 model of the same
values as PEFT's; eval mode (bnb's int8 activations) and float32 activations left to PEFT, bit for bit; patch /
files both ways / merge; lorafuse's own int8 model bit-identical to the bitsandbytes-loaded one. The kernels:
tests/test_ops_lora_q8.py; the storage: tests/test_quant8.py."""
from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

from test_qlora import (LORA, VOCAB, _bnb_stack, _run, assert_at_least_as_accurate,  # noqa: E402
                        check_patch_files_unfuse)


def _load_8bit(path, dtype=torch.bfloat16):
    _, transformers = _bnb_stack()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), dtype=dtype)


def _randomise(models):
    """The same random adapters in every model (PEFT initialises B to zero)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        params = [dict(m.named_parameters()) for m in models]
        for name, p in params[0].items():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
                for other in params[1:]:
                    other[name].copy_(p)


def _pair(path, **overrides):
    """(PEFT model, lorafuse model) on the same 8-bit checkpoint, with the same random adapters."""
    import lorafuse

    peft, _ = _bnb_stack()
    kw = {**LORA, **overrides}
    theirs = peft.get_peft_model(_load_8bit(path), peft.LoraConfig(**kw))
    ours = lorafuse.get_peft_model(_load_8bit(path), lorafuse.LoraConfig(**kw))
    _randomise([theirs, ours])
    return theirs, ours


def _layers(model):
    from lorafuse.qlora import FusedLinear8bitLt, LoraLinear8bit

    return [m for m in model.modules() if isinstance(m, (FusedLinear8bitLt, LoraLinear8bit))]


def _reference(path, quantized):
    """The float64 model of the values an 8-bit LoRA model computes with in training: the checkpoint in bf16,
    every 8-bit linear's W = CB·(SCB·(1/127)) rounded to bf16 (bnb's MatMul8bitFp), the model's adapters."""
    peft, transformers = _bnb_stack()
    ref = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16),
                              peft.LoraConfig(**LORA))
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for name, m in quantized.named_modules():
            w = getattr(m, "weight", None)
            if w is not None and w.dtype == torch.int8:
                scb = w.SCB if getattr(w, "SCB", None) is not None else m.state.SCB
                mods[name].weight.copy_(w.data.to(torch.bfloat16).mul_(scb.unsqueeze(1).mul(1.0 / 127.0)))
        ref.load_state_dict({k: v for k, v in quantized.state_dict().items() if "lora_" in k}, strict=False)
    return ref.double()


def _train_mode(*models):
    for m in models:
        m.train()
        m.get_base_model().set_attn_implementation("eager")


def test_llama_8bit_fused_and_at_least_as_accurate_as_peft_bnb(llama_dir):
    """Training mode, bf16 activations: every LoRA layer on an 8-bit projection runs the C kernels ('c');
    logits, loss and every adapter gradient as close to the float64 model of the same values as PEFT +
    bitsandbytes' (tests/test_qlora.py's bounds: median error ratio ≤ 2, each tensor ≤ 3× PEFT's + 8 u_h)."""
    theirs, ours = _pair(llama_dir)
    ref = _reference(llama_dir, theirs)
    _train_mode(theirs, ours, ref)
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    want, got, exact = _run(theirs, ids), _run(ours, ids), _run(ref, ids)
    assert len(_layers(ours)) == 6 and {m.lorafuse_path for m in _layers(ours)} == {"c"}
    assert_at_least_as_accurate(got, want, exact)


def test_eval_mode_and_float32_activations_run_peft_bit_for_bit(llama_dir):
    """Where bitsandbytes computes otherwise than W' times x in x's dtype — eval mode (LLM.int8's int8
    activations with outlier columns) and float32 x (its float32 product) — and with adapters disabled,
    PEFT's forward runs ('peft') and gives PEFT's bits."""
    theirs, ours = _pair(llama_dir)
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.eval()
        ours.eval()
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
        assert {m.lorafuse_path for m in _layers(ours)} == {"peft"} and _layers(ours)[0].backend == "peft"
        theirs.train()
        ours.train()
        with ours.disable_adapter(), theirs.disable_adapter():
            assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
            assert {m.lorafuse_path for m in _layers(ours)} == {"peft"}
        layer, twin = _layers(ours)[0], [m for m in theirs.modules() if type(m).__name__ == "Linear8bitLt"
                                         and hasattr(m, "lora_A")][0]
        x = torch.randn(3, layer.in_features)
        assert torch.equal(layer(x), twin(x)) and layer.lorafuse_path == "peft"
        assert layer.backend == "c"


def test_patch_peft_files_both_ways_and_merge(llama_dir, tmp_path):
    """tests/test_qlora.py's patch / files / unfuse checks on the 8-bit layers; merge_and_unload (PEFT's code:
    dequantize, add, requantize) gives PEFT's model."""
    from lorafuse import FusedLinear8bitLt

    _bnb_stack()
    from peft.tuners.lora.bnb import Linear8bitLt as PeftLinear8bitLt

    theirs, ours = check_patch_files_unfuse(lambda: _load_8bit(llama_dir), lambda: _pair(llama_dir), _layers,
                                            FusedLinear8bitLt, PeftLinear8bitLt, tmp_path)
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = theirs.merge_and_unload(), ours.merge_and_unload()
    for m in (a, b):
        m.train()
    with torch.no_grad():
        assert torch.equal(b(input_ids=ids).logits, a(input_ids=ids).logits)


# ------------------------------------------------------------- lorafuse.quantize(model, "int8") (no bitsandbytes)

def _own_8bit(path, dtype=torch.bfloat16):
    import lorafuse

    transformers = pytest.importorskip("transformers")
    return lorafuse.quantize(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype), "int8")


def _own_lora(path, **overrides):
    import lorafuse

    model = lorafuse.get_peft_model(_own_8bit(path), lorafuse.LoraConfig(**{**LORA, **overrides}))
    _randomise([model])
    return model


def test_lorafuse_int8_model_equals_the_bitsandbytes_loaded_one(llama_dir):
    """`lorafuse.quantize(model, "int8")` stores bitsandbytes' bits, so its `LoraLinear8bit` layers (fused, 'c')
    and `FusedLinear8bitLt` on the bnb-loaded model — LoRA on every projection, so that both sides run the same
    kernels everywhere — give identical logits and adapter gradients; merged, the same int8 codes and scales
    again (PEFT's arithmetic for 8-bit bases)."""
    every = dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    theirs, ours_bnb = _pair(llama_dir, **every)
    own = _own_lora(llama_dir, **every)
    own.load_state_dict({k: v for k, v in ours_bnb.state_dict().items() if "lora_" in k}, strict=False)
    _train_mode(ours_bnb, own)
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    a, b = _run(ours_bnb, ids), _run(own, ids)
    assert len(_layers(own)) == 14 and {m.lorafuse_path for m in _layers(own) + _layers(ours_bnb)} == {"c"}
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_theirs, merged_own = theirs.merge_and_unload(), own.merge_and_unload()
    theirs_mods = dict(merged_theirs.named_modules())
    from lorafuse.quant8 import Linear8bit

    merged = [(name, m) for name, m in merged_own.named_modules() if isinstance(m, Linear8bit)]
    assert len(merged) == 14 and not _layers(merged_own)  # every linear layer but the head, all merged
    for name, m in merged:
        t = theirs_mods[name]
        scb = t.weight.SCB if getattr(t.weight, "SCB", None) is not None else t.state.SCB
        assert torch.equal(m.weight.data, t.weight.data) and torch.equal(m.weight.SCB, scb), name


def test_lorafuse_int8_layers_merge_refuse_and_fall_back(llama_dir):
    """Merge / unmerge: W ← quantize_int8(dequantize(W) ± s·B·A), bitsandbytes' dequantization
    (``int8_vectorwise_dequant``: CB·SCB·(1/127) in float32, written out here) as PEFT merges 8-bit bases; a
    merged layer runs the base alone; float32 x runs PEFT's math; DoRA is refused."""
    import lorafuse
    from lorafuse.quant8 import quantize_weight_int8

    def bnb_dequant(w):
        return w.data.float() * w.SCB.view(-1, 1) * 7.874015718698502e-3

    model = _own_lora(llama_dir)
    model.train()
    layer = _layers(model)[0]
    base = layer.get_base_layer()
    delta = layer.get_delta_weight("default").detach()
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w0 = base.weight
        model.merge_adapter()
        cb, scb = quantize_weight_int8(bnb_dequant(w0) + delta)
        assert layer.merged and torch.equal(base.weight.data, cb) and torch.equal(base.weight.SCB, scb)
        model(input_ids=ids)
        assert {m.lorafuse_path for m in _layers(model)} == {"peft"}  # merged: the base alone
        w1 = base.weight
        model.unmerge_adapter()
        cb, scb = quantize_weight_int8(bnb_dequant(w1) - delta)
        assert not layer.merged and torch.equal(base.weight.data, cb) and torch.equal(base.weight.SCB, scb)
        model(input_ids=ids)
        assert {m.lorafuse_path for m in _layers(model)} == {"c"}
        x = torch.randn(2, layer.in_features)  # float32 x: the base's float32 product and PEFT's LoRA term
        want = base(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
        torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
        assert layer.lorafuse_path == "peft"
    with pytest.raises(ValueError, match="plain LoRA adapters only"):
        lorafuse.get_peft_model(_own_8bit(llama_dir), lorafuse.LoraConfig(**LORA, use_dora=True))
