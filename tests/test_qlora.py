"""QLoRA layers: `lorafuse.qlora.FusedLinear4bit` (PEFT's LoRA layer on bitsandbytes' Linear4bit, fused) and
`lorafuse.qlora.LoraLinear4bit` (on `lorafuse.quantize`'s Linear4bit). A Llama config loaded 4-bit by
transformers + bitsandbytes, PEFT's LoRA vs lorafuse's: every LoRA layer fused ('c'), logits, loss and adapter
gradients at least as close to the float64 model of the same values as PEFT's (also after
prepare_model_for_kbit_training); fallbacks to PEFT's forward where the kernels do not apply; files both ways;
merges; `lorafuse.quantize`'s model against float64, bit-identical to the bitsandbytes-loaded one, saved and
reloaded with bitsandbytes. The kernels themselves: tests/test_ops_lora_q4.py."""
from __future__ import annotations

import importlib.util
import warnings

import pytest

torch = pytest.importorskip("torch")

from lorafuse import quant  # noqa: E402

# ------------------------------------------------------------------ layers on bitsandbytes' Linear4bit


def _bnb_stack():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: PEFT's 4-bit LoRA layers are not built")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    return peft, transformers


VOCAB = 61
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)


def _load_4bit(path, dtype=torch.bfloat16, compute=torch.bfloat16):
    _, transformers = _bnb_stack()
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=dtype)


def _pair(path, **overrides):
    """(PEFT model, lorafuse model) on the same 4-bit checkpoint, lorafuse given PEFT's randomised adapters."""
    import lorafuse

    peft, _ = _bnb_stack()
    kbit = overrides.pop("kbit", False)
    kw = {**LORA, **overrides}
    prepare = peft.prepare_model_for_kbit_training if kbit else (lambda model: model)
    theirs = peft.get_peft_model(prepare(_load_4bit(path)), peft.LoraConfig(**kw))
    ours = lorafuse.get_peft_model(prepare(_load_4bit(path)), lorafuse.LoraConfig(**kw))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        mine = dict(ours.named_parameters())
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
                mine[name].copy_(p)
    return theirs, ours


def _layers(model):
    from lorafuse import FusedLinear4bit

    return [m for m in model.modules() if isinstance(m, FusedLinear4bit)]


def _run(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return {"logits": out.logits.detach(), "loss": out.loss.detach(), **grads}


def _reference(path, theirs, **overrides):
    """The float64 model of the values the 4-bit model holds: the checkpoint rounded to bf16, every 4-bit
    linear's W dequantized (bnb's own dequantize_4bit), PEFT's adapters (config LORA with ``overrides``)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    peft, transformers = _bnb_stack()
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ref = peft.get_peft_model(base, peft.LoraConfig(**{**LORA, **overrides}))
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for name, m in theirs.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                mods[name].weight.copy_(bnbF.dequantize_4bit(m.weight.data, m.weight.quant_state))
        ref.load_state_dict({k: v for k, v in theirs.state_dict().items() if "lora_" in k}, strict=False)
    return ref.double()


@pytest.mark.parametrize("kbit", [False, True], ids=["bf16", "prepare_model_for_kbit_training"])
def test_llama_4bit_fused_and_at_least_as_accurate_as_peft_bnb(llama_dir, kbit):
    """Every LoRA layer on a 4-bit projection runs the C kernels ('c'); logits, loss and every adapter
    gradient are as close to the float64 model of the same values as PEFT + bitsandbytes' are (the
    bounds of the half-precision parity test, tests/test_peft_parity.py: median error ratio ≤ 2, each
    tensor ≤ 3× PEFT's + 8 u_h). With PEFT's prepare_model_for_kbit_training (QLoRA's recipe: the rest of
    the model in fp32, gradient checkpointing) the layers see fp32 activations and keep bitsandbytes'
    rounding of the base product and PEFT's fp32 LoRA term."""
    *_, (want, got, exact) = _fused_step(llama_dir, kbit=kbit)
    assert_at_least_as_accurate(got, want, exact)


def _fused_step(path, **overrides):
    """PEFT's model, lorafuse's and the float64 reference (`_pair`, `_reference`) in training mode, the token ids,
    and one forward + backward of each (`_run`), with every lorafuse layer checked to have run the kernels."""
    theirs, ours = _pair(path, **overrides)
    ref = _reference(path, theirs, **{k: v for k, v in overrides.items() if k != "kbit"})
    for model in (theirs, ours, ref):
        model.train()
        model.get_base_model().set_attn_implementation("eager")
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    runs = _run(theirs, ids), _run(ours, ids), _run(ref, ids)
    assert len(_layers(ours)) == 6 and {m.lorafuse_path for m in _layers(ours)} == {"c"}
    return (theirs, ours, ref), ids, runs


def assert_at_least_as_accurate(got: dict, want: dict, exact: dict) -> None:
    """Every tensor of ``got`` (lorafuse's) as close to ``exact`` (float64) as ``want`` (PEFT's) is: each error ≤ 3×
    PEFT's + 8 u_h, the median ratio of the errors ≤ 2 (the bounds of tests/test_peft_parity.py's half-precision
    parity test)."""
    u_h = 2.0 ** -8
    ratios = []
    for key, r in exact.items():
        assert got[key].dtype == want[key].dtype, key
        e_ours = float((got[key].double() - r).abs().max() / r.abs().max())
        e_theirs = float((want[key].double() - r).abs().max() / r.abs().max())
        assert e_ours <= 3 * e_theirs + 8 * u_h, (key, e_ours, e_theirs)
        ratios.append(e_ours / max(e_theirs, 1e-12))
    ratios.sort()
    assert ratios[len(ratios) // 2] <= 2.0, ratios


def test_llama_4bit_dora_fused_and_at_least_as_accurate_as_peft_bnb(llama_dir):
    """QLoRA with DoRA (``use_dora=True`` on bitsandbytes' 4-bit projections, PEFT's fp32 adapters and magnitude):
    every layer runs the C kernels ('c': `dora_linear_half` on the 4-bit W, `half_weight.Quant4HalfW`); logits,
    loss and every adapter gradient — the magnitudes included — as close to the float64 model of the same values
    as PEFT + bitsandbytes' (`assert_at_least_as_accurate`); the kept norms follow an optimizer step (ν recomputed
    from the new A and B: the next step's logits as close as PEFT's too); under no_grad the same logits as the
    forward that kept u and z̃ for its backward. (Train mode: in eval mode without grad bitsandbytes repacks W for
    its own CPU kernel, and the base model's other 4-bit projections take it.)"""
    (theirs, ours, ref), ids, (want, got, exact) = _fused_step(llama_dir, use_dora=True)
    assert any("lora_magnitude_vector" in k for k in got)
    assert_at_least_as_accurate(got, want, exact)
    for model in (theirs, ours, ref):  # one SGD step on every adapter tensor from PEFT's gradients
        grads = dict(want)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.sub_((0.5 * grads[name]).to(p.dtype))
    want, got, exact = _run(theirs, ids), _run(ours, ids), _run(ref, ids)
    assert_at_least_as_accurate({"logits": got["logits"]}, {"logits": want["logits"]},
                                {"logits": exact["logits"]})
    with torch.no_grad():  # the no-grad forward (nothing kept for a backward): the same bits
        assert torch.equal(ours(input_ids=ids).logits, got["logits"])


def test_llama_4bit_dora_with_dropout_matches_peft_bnb_given_the_same_mask(llama_dir):
    """QLoRA with DoRA and dropout 0.1 in training: every layer fused ('c': x·Wᵀ and (x ⊙ m)·Wᵀ forward, the mixed
    kernels on x̃ and g·W backward, the 4-bit W dequantized inside the GEMMs' packing), and PEFT + bitsandbytes given
    lorafuse's masks (tests/test_dora.py's `SeededDropout`) computes the same loss and gradients within bf16's
    roundings (each tensor within 4 % of its largest value, as the dense test)."""
    from test_dora import SeededDropout

    theirs, ours = _pair(llama_dir, use_dora=True, lora_dropout=0.1)
    for module in theirs.modules():
        drop = getattr(module, "lora_dropout", None)
        if drop is not None:
            for name in list(drop.keys()):
                drop[name] = SeededDropout(0.1)
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    results = []
    for model in (theirs, ours):
        model.train()
        torch.manual_seed(5)  # the same seeds drawn in the same order: the same masks
        results.append(_run(model, ids))
    want, got = results
    assert {m.lorafuse_path for m in _layers(ours)} == {"c"}
    for key, ref in want.items():
        err = float((got[key].float() - ref.float()).abs().max() / ref.float().abs().max())
        assert err <= 4e-2, (key, err)


def test_fallbacks_run_peft_and_match_it(llama_dir):
    """Where the kernels do not apply PEFT's forward runs ('peft') and gives PEFT's result: adapters
    disabled, a DoRA adapter on fp32 activations (after prepare_model_for_kbit_training), an fp32 compute
    dtype, a hook on lora_A or the base layer, forward-mode AD; and W repacked
    by bitsandbytes for its CPU inference kernel (``packing_format_for_cpu``, done by bnb's own forward in
    eval mode without grad) is left to bnb. (Train mode here: bnb 0.50's repacking fails on this model's
    double-quantized 64-wide weights.)"""
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    theirs, ours = _pair(llama_dir)
    ours.train()
    theirs.train()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ours.disable_adapter(), theirs.disable_adapter():
            torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=0)
            assert {m.lorafuse_path for m in _layers(ours)} == {"peft"}
        layer = _layers(ours)[0]
        layer.get_base_layer().compute_dtype = torch.float32  # fp32 compute: bitsandbytes' own fp32 matmul
        layer(torch.randn(3, layer.in_features))
        assert layer.lorafuse_path == "peft" and layer.backend == "peft"
        layer.get_base_layer().compute_dtype = torch.bfloat16
        assert layer.backend == "c"
        state = layer.get_base_layer().weight.quant_state
        state.packing_format_for_cpu = True
        assert layer.backend == "peft"
        state.packing_format_for_cpu = False
        assert layer.backend == "c"
        for hooked in (layer.lora_A["default"], layer.get_base_layer()):
            handle = hooked.register_forward_hook(lambda mod, inp, out: out)
            assert layer.backend == "peft"  # a hook on a module PEFT's forward calls (layers.lora_unhooked)
            handle.remove()
            assert layer.backend == "c"
        with torch.autograd.forward_ad.dual_level():  # forward-mode AD (layers.under_transform)
            assert layer.backend == "peft"
        assert layer.backend == "c"
    theirs_d, ours_d = _pair(llama_dir, use_dora=True, kbit=True)
    theirs_d.train()
    ours_d.train()
    with torch.no_grad():
        torch.testing.assert_close(ours_d(input_ids=ids).logits, theirs_d(input_ids=ids).logits, rtol=0, atol=0)
    assert {m.lorafuse_path for m in _layers(ours_d)} == {"peft"}


def check_patch_files_unfuse(load, pair, layers, fused: type, stock: type, tmp_path):
    """`patch_peft` makes stock PEFT build ``fused`` layers on ``load()``'s quantized model; adapters saved by
    lorafuse load in stock PEFT and the other way round, the same tensors; `unfuse_peft_model` gives back
    ``stock`` (PEFT's class). ``pair()``: (PEFT model, lorafuse model), returned for further checks."""
    import lorafuse

    peft, _ = _bnb_stack()
    lorafuse.patch_peft()
    try:
        patched = peft.get_peft_model(load(), peft.LoraConfig(**LORA))
    finally:
        lorafuse.unpatch_peft()
    assert {type(m) for m in layers(patched)} == {fused} and len(layers(patched)) == 6
    theirs, ours = pair()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    loaded_by_peft = peft.PeftModel.from_pretrained(load(), tmp_path / "ours")
    loaded_by_us = lorafuse.PeftModel.from_pretrained(load(), tmp_path / "theirs")
    assert len(layers(loaded_by_us)) == 6 and not layers(loaded_by_peft)
    sd = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    for model in (loaded_by_peft, loaded_by_us):
        mine = model.state_dict()
        for k, v in sd.items():
            assert torch.equal(mine[k], v), k
    assert lorafuse.unfuse_peft_model(loaded_by_us) == 6
    assert {type(m) for m in loaded_by_us.modules() if "lora.bnb" in type(m).__module__} == {stock}
    return theirs, ours


def test_patch_peft_unfuse_and_files_both_ways(llama_dir, tmp_path):
    from lorafuse import FusedLinear4bit

    _bnb_stack()
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    check_patch_files_unfuse(lambda: _load_4bit(llama_dir), lambda: _pair(llama_dir), _layers, FusedLinear4bit,
                             PeftLinear4bit, tmp_path)


def test_merge_into_the_4bit_base_is_peft_merge(llama_dir):
    """merge_and_unload is PEFT's code (dequantize → add → requantize): the same model as PEFT's."""
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    theirs, ours = _pair(llama_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = theirs.merge_and_unload(), ours.merge_and_unload()
    a.train()  # not bnb's CPU inference repacking (see test_fallbacks_run_peft_and_match_it)
    b.train()
    with torch.no_grad():
        torch.testing.assert_close(b(input_ids=ids).logits, a(input_ids=ids).logits, rtol=0, atol=0)


# ------------------------------------------------------------- lorafuse.quantize's Linear4bit (no bitsandbytes)

def _own_4bit(path, dtype=torch.bfloat16):
    """The checkpoint in ``dtype``, every linear layer but the head quantized by `lorafuse.quantize` (NF4,
    double quant: the bits bitsandbytes would store)."""
    import lorafuse

    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return lorafuse.quantize(model, "nf4", block_size=64, double_quant=True, skip_modules=("lm_head",))


def _own_lora(path, dtype=torch.bfloat16, kbit=False, **overrides):
    import lorafuse

    base = _own_4bit(path, dtype)
    if kbit:
        peft = pytest.importorskip("peft")
        base = peft.prepare_model_for_kbit_training(base)
    model = lorafuse.get_peft_model(base, lorafuse.LoraConfig(**{**LORA, **overrides}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _own_layers(model):
    from lorafuse.qlora import LoraLinear4bit

    return [m for m in model.modules() if isinstance(m, LoraLinear4bit)]


def _dense_reference(path, model, dtype):
    """The float64 model of a lorafuse-quantized LoRA model: the checkpoint in ``dtype``, W dequantized."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    ref = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype),
                              peft.LoraConfig(**LORA))
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, quant.Linear4bit):
                mods[name].weight.copy_(quant.dequantize(m.weight, dtype=torch.float32))
        ref.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
    return ref.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, "kbit"])
def test_lorafuse_quantized_model_trains_on_the_kernels(llama_dir, dtype):
    """`lorafuse.quantize` + `lorafuse.get_peft_model`, no bitsandbytes involved: every target is a
    `LoraLinear4bit`; in bf16 fused ('c'); quantized from bf16, then PEFT's prepare_model_for_kbit_training
    (fp32 activations, the base products in bf16 as bitsandbytes computes them) fused too; quantized in
    fp32, PEFT's math ('peft'). Logits, loss and every adapter gradient close to the float64 model of the
    same values (4 % of each tensor's largest value where bf16 roundings enter, else 1e-4)."""
    kbit = dtype == "kbit"
    model = _own_lora(llama_dir, torch.bfloat16 if kbit else dtype, kbit=kbit)
    ref = _dense_reference(llama_dir, model, torch.bfloat16 if kbit else dtype)
    for m in (model, ref):
        m.train()
        m.get_base_model().set_attn_implementation("eager")
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    got, want = _run(model, ids), _run(ref, ids)
    assert len(_own_layers(model)) == 6
    assert {m.lorafuse_path for m in _own_layers(model)} == {"peft" if dtype == torch.float32 else "c"}
    tol = 1e-4 if dtype == torch.float32 else 4e-2
    for key, r in want.items():
        err = float((got[key].double() - r).abs().max() / r.abs().max())
        assert err <= tol, (key, err)


def test_lorafuse_quantized_equals_bitsandbytes_loaded(llama_dir):
    """The same checkpoint quantized by `lorafuse.quantize` and by transformers + bitsandbytes holds the same
    bits, so lorafuse's two 4-bit LoRA layers (`LoraLinear4bit`, `FusedLinear4bit`) give identical logits and
    adapter gradients; merged into the 4-bit base, identical models again (PEFT's arithmetic)."""
    theirs, ours_bnb = _pair(llama_dir)
    own = _own_lora(llama_dir)
    own.load_state_dict({k: v for k, v in ours_bnb.state_dict().items() if "lora_" in k}, strict=False)
    for m in (ours_bnb, own):
        m.train()
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    a, b = _run(ours_bnb, ids), _run(own, ids)
    assert {m.lorafuse_path for m in _own_layers(own)} == {"c"}
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_theirs, merged_own = theirs.merge_and_unload(), own.merge_and_unload()
    assert not _own_layers(merged_own)
    theirs_mods = dict(merged_theirs.named_modules())
    merged = [(name, m) for name, m in merged_own.named_modules() if isinstance(m, quant.Linear4bit)]
    assert len(merged) == 14  # every linear layer but the head, the 6 adapted ones merged
    for name, m in merged:  # the merged 4-bit weights hold the same bits (bnb's read as they are)
        assert torch.equal(m.weight.data.flatten(), theirs_mods[name].weight.data.flatten()), name
        assert torch.equal(quant.dequantize(m.weight), quant.dequantize(theirs_mods[name].weight)), name


def test_lorafuse_quantized_merge_patch_files_and_refusals(llama_dir, tmp_path):
    import lorafuse

    peft = pytest.importorskip("peft")
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    model = _own_lora(llama_dir)
    model.train()
    layer = _own_layers(model)[0]
    w0 = layer.get_base_layer().weight
    delta = layer.get_delta_weight("default").detach()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()  # W ← quantize(dequantize(W) + s·B·A), PEFT's arithmetic for 4-bit bases
        w1 = layer.get_base_layer().weight
        want, state = quant.quantize_weight(quant.dequantize(w0) + delta, "nf4", block_size=64, double_quant=True)
        assert torch.equal(w1.data, want) and torch.equal(quant.dequantize(w1), quant.dequantize(want, state))
        model(input_ids=ids)
        assert {m.lorafuse_path for m in _own_layers(model)} == {"peft"}  # merged: the base alone runs
        model.unmerge_adapter()
        want, _ = quant.quantize_weight(quant.dequantize(w1) - delta, "nf4", block_size=64, double_quant=True)
        assert torch.equal(layer.get_base_layer().weight.data, want) and not layer.merged
        model(input_ids=ids)
        assert {m.lorafuse_path for m in _own_layers(model)} == {"c"}
    model.save_pretrained(tmp_path / "a")
    lorafuse.patch_peft()
    try:
        stock = peft.PeftModel.from_pretrained(_own_4bit(llama_dir), tmp_path / "a")
    finally:
        lorafuse.unpatch_peft()
    loaded = lorafuse.PeftModel.from_pretrained(_own_4bit(llama_dir), tmp_path / "a")
    sd = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    for m in (stock, loaded):
        assert len(_own_layers(m)) == 6
        mine = m.state_dict()
        assert all(torch.equal(mine[k], v) for k, v in sd.items())
    with pytest.raises(ValueError, match="do not take adapter_names"):  # PEFT's mixed batches: not on this layer
        _own_layers(model)[0](torch.randn(2, 64, dtype=torch.bfloat16), adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="plain LoRA adapters only"):
        lorafuse.get_peft_model(_own_4bit(llama_dir), lorafuse.LoraConfig(**LORA, use_dora=True))
    with pytest.raises(ValueError, match="Target module"):  # stock PEFT, unpatched, does not know the module
        peft.get_peft_model(_own_4bit(llama_dir), peft.LoraConfig(**LORA))


def test_lorafuse_quantized_model_saves_and_reloads_with_bitsandbytes(llama_dir, tmp_path):
    """`lorafuse.quantize` writes ``config.quantization_config``: the model's ``save_pretrained`` directory loads
    with transformers + bitsandbytes as bnb Linear4bit modules holding the same bits, and gives the same logits."""
    _, transformers = _bnb_stack()
    import bitsandbytes as bnb

    model = _own_4bit(llama_dir)
    assert model.config.quantization_config["bnb_4bit_quant_type"] == "nf4"
    model.save_pretrained(tmp_path / "q")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    mods = dict(loaded.named_modules())
    ours = [(name, m) for name, m in model.named_modules() if isinstance(m, quant.Linear4bit)]
    assert len(ours) == 14
    for name, m in ours:
        assert isinstance(mods[name], bnb.nn.Linear4bit), name
        assert torch.equal(quant.dequantize(m.weight), quant.dequantize(mods[name].weight)), name
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(6))
    model.train()  # not bnb's eval-mode CPU repacking (its own kernel, another summation order)
    loaded.train()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_models_deepcopy_and_pickle_after_a_fused_forward(llama_dir):
    """A fused forward keeps a run-time handle on each 4-bit weight; `copy.deepcopy` and `torch.save` /
    `torch.load` of the models still work (lorafuse's quantized model and the bitsandbytes-loaded one), and
    the copies compute what the originals do."""
    import copy
    import io

    ids = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(7))
    models = [_own_lora(llama_dir)]
    if importlib.util.find_spec("bitsandbytes") is not None:
        models.append(_pair(llama_dir)[1])
    for model in models:
        model.train()  # not bnb's eval-mode repacking
        with torch.no_grad():
            want = model(input_ids=ids).logits
            copied = copy.deepcopy(model)
            buf = io.BytesIO()
            torch.save(model, buf)
            buf.seek(0)
            loaded = torch.load(buf, weights_only=False)
            for other in (copied, loaded):
                other.train()
                assert torch.equal(other(input_ids=ids).logits, want)
