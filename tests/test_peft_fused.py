"""lorafuse inside PEFT (`lorafuse.peft_fused`): stock PEFT models whose LoRA Linear layers are
`FusedLinear`. Each test builds the same tiny model twice — stock PEFT and patched/fused PEFT, the same
weights — and compares logits, losses and every adapter gradient; the paths lorafuse does not fuse
must be PEFT's own code (identical results), and files cross both ways.

Bounds: fused and stock differ only in fp32 summation order (one GEMM per projection in each), which
the tiny two-layer models amplify by well under 10×: logits to 1e-5, gradients to 1e-5 of their scale.
"""
from __future__ import annotations

import copy
import os

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lorafuse  # noqa: E402
from lorafuse.peft_fused import FusedLinear, PeftLinear  # noqa: E402

LORA = dict(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: the twins must agree
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.fixture
def patched():
    """patch_peft() for the test, unpatch_peft() after it whatever happens."""
    lorafuse.patch_peft()
    yield
    lorafuse.unpatch_peft()


def _twins(make=_llama, **conf):
    """(stock PEFT model, PEFT model built while patched) on copies of one base, the same adapter weights."""
    base = make()
    config = dict(LORA, **conf)
    stock = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    lorafuse.patch_peft()
    try:
        fused = peft.get_peft_model(base, peft.LoraConfig(**config))
    finally:
        lorafuse.unpatch_peft()
    fused.load_state_dict(stock.state_dict())
    return stock, fused


def _fused_layers(model):
    return [m for m in model.modules() if isinstance(m, FusedLinear)]


def _step(model, ids, **kw):
    """logits, loss and adapter gradients of one causal-LM forward/backward."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, **kw)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.item(), grads


def _assert_same(a, b, tol=1e-5):
    (la, lossa, ga), (lb, lossb, gb) = a, b
    torch.testing.assert_close(lb, la, rtol=tol, atol=tol)
    assert abs(lossa - lossb) <= tol * max(1.0, abs(lossa))
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        scale = ga[name].abs().max().item() + 1e-12
        assert (ga[name] - gb[name]).abs().max().item() <= tol * scale, name


def test_patch_makes_stock_peft_build_fused_layers(patched):
    model = peft.get_peft_model(_llama(), peft.LoraConfig(**LORA))
    assert isinstance(model, peft.PeftModel) and lorafuse.peft_is_patched()
    layers = _fused_layers(model)
    assert len(layers) == 14 and all(isinstance(m, PeftLinear) for m in layers)
    text = repr(layers[0])  # PEFT's "lora.Linear(", and the path
    assert text.startswith("lora.Linear(") and "lorafuse fused forward (last path: none yet)" in text
    lorafuse.unpatch_peft()
    assert not lorafuse.peft_is_patched()
    stock = peft.get_peft_model(_llama(), peft.LoraConfig(**LORA))
    assert not _fused_layers(stock) and sum(type(m) is PeftLinear for m in stock.modules()) == 14


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2-conv1d"])
def test_fused_equals_stock_peft(make):
    stock, fused = _twins(make)
    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    ref = _step(stock, ids)
    got = _step(fused, ids)
    layers = _fused_layers(fused)
    assert layers and {m.lorafuse_path for m in layers} == {"c"}
    assert "(last path: c)" in repr(layers[0])
    _assert_same(ref, got)


@pytest.mark.parametrize("conf", [dict(lora_bias=True)], ids=["lora_bias"])
def test_unfused_variants_run_peft_code(conf):
    """lora_bias is not fused yet: PEFT's own forward runs (and draws the same random numbers), so results are
    PEFT's exactly."""
    base_conf = dict(conf)
    if conf.get("lora_bias"):
        make = _gpt2  # a base layer with a bias
    else:
        make = _llama
    stock, fused = _twins(make, **base_conf)
    stock.train()
    fused.train()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    ref = _step(stock, ids)
    torch.manual_seed(3)
    got = _step(fused, ids)
    assert {m.lorafuse_path for m in _fused_layers(fused)} == {"peft"}
    _assert_same(ref, got, tol=0)


def test_mixed_adapter_batch_generate_disable_and_merge_are_peft():
    stock, fused = _twins()
    for model in (stock, fused):
        torch.manual_seed(3)
        model.add_adapter("other", peft.LoraConfig(**LORA))
    fused.load_state_dict(stock.state_dict())
    stock.eval()  # PEFT takes adapter_names in eval mode only
    fused.eval()
    ids = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(4))
    names = ["default", "other", "__base__"]
    with torch.no_grad():
        ref = stock(input_ids=ids, adapter_names=names).logits
        got = fused(input_ids=ids, adapter_names=names).logits
        assert {m.lorafuse_path for m in _fused_layers(fused)} == {"peft"}
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        with pytest.raises(ValueError):  # unknown names rejected as PEFT rejects them
            fused(input_ids=ids, adapter_names=["default", "nope", "__base__"])
        gen = dict(max_new_tokens=4, do_sample=False, adapter_names=names, pad_token_id=0)
        torch.testing.assert_close(fused.generate(input_ids=ids, **gen), stock.generate(input_ids=ids, **gen),
                                   rtol=0, atol=0)
        with fused.disable_adapter(), stock.disable_adapter():
            torch.testing.assert_close(fused(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=0, atol=0)
        fused.set_adapter("other")
        stock.set_adapter("other")
        y_fused = fused(input_ids=ids).logits
        assert {m.lorafuse_path for m in _fused_layers(fused)} == {"c"}
        torch.testing.assert_close(y_fused, stock(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        fused.base_model.merge_adapter()
        y_merged = fused(input_ids=ids).logits
        assert {m.lorafuse_path for m in _fused_layers(fused)} == {"peft"}
        torch.testing.assert_close(y_merged, y_fused, rtol=1e-4, atol=1e-4)


def test_files_cross_both_ways(tmp_path):
    stock, fused = _twins()
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(5))
    fused.save_pretrained(tmp_path / "from_fused")
    stock.save_pretrained(tmp_path / "from_stock")
    assert sorted(os.listdir(tmp_path / "from_fused")) == sorted(os.listdir(tmp_path / "from_stock"))
    loaded_stock = peft.PeftModel.from_pretrained(_llama(), tmp_path / "from_fused")
    lorafuse.patch_peft()
    try:
        loaded_fused = peft.PeftModel.from_pretrained(_llama(), tmp_path / "from_stock")
    finally:
        lorafuse.unpatch_peft()
    assert len(_fused_layers(loaded_fused)) == 14 and not _fused_layers(loaded_stock)
    with torch.no_grad():
        ref = stock(input_ids=ids).logits
        torch.testing.assert_close(loaded_stock(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded_fused(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_fuse_and_unfuse_an_existing_model_in_place():
    model = peft.get_peft_model(_llama(), peft.LoraConfig(**LORA))
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(6))
    params = {n: p.data_ptr() for n, p in model.named_parameters()}
    assert lorafuse.fuse_peft_model(model) == 14
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params  # nothing copied or re-made
    _assert_same(_step(reference, ids), _step(model, ids))
    assert lorafuse.fuse_peft_model(model) == 0
    assert lorafuse.unfuse_peft_model(model) == 14 and not _fused_layers(model)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        lorafuse.fuse_peft_model("model")


def test_trainer_default_arguments_train_and_checkpoint_adapters(tmp_path, patched):
    """transformers.Trainer with default TrainingArguments (plus a small step count) on a patched PEFT
    model: it trains, logs eval_loss, its checkpoints hold PEFT adapter files only, the losses equal an
    unpatched run's, resuming from a checkpoint gives the uninterrupted run's adapter, and save_model's
    output loads in stock PEFT with the same logits."""
    datasets = pytest.importorskip("datasets")
    gen = torch.Generator().manual_seed(7)
    rows = [{"input_ids": torch.randint(0, 96, (12,), generator=gen).tolist()} for _ in range(16)]
    for row in rows:
        row["labels"] = list(row["input_ids"])
    data = datasets.Dataset.from_list(rows)

    def trainer_for(out, fused):
        if not fused:
            lorafuse.unpatch_peft()
        try:
            model = peft.get_peft_model(_llama(), peft.LoraConfig(**LORA))
        finally:
            lorafuse.patch_peft()
        assert bool(_fused_layers(model)) == fused
        args = transformers.TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=4,
                                              eval_strategy="steps", eval_steps=2, save_steps=2, logging_steps=1,
                                              report_to=[], use_cpu=True, seed=0, data_seed=0)
        return transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(8)))

    def history(trainer):
        logs = trainer.state.log_history
        return [e["loss"] for e in logs if "loss" in e], [e["eval_loss"] for e in logs if "eval_loss" in e]

    def adapter(trainer):
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}

    fused = trainer_for(tmp_path / "fused", True)
    fused.train()
    stock = trainer_for(tmp_path / "stock", False)
    stock.train()
    (losses, evals), (ref_losses, ref_evals) = history(fused), history(stock)
    assert len(losses) == 4 and len(evals) == 2
    assert losses == pytest.approx(ref_losses, rel=1e-4) and evals == pytest.approx(ref_evals, rel=1e-4)
    files = set(os.listdir(tmp_path / "fused" / "checkpoint-4"))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files), files

    resumed = trainer_for(tmp_path / "resumed", True)  # from the fused run's step-2 checkpoint to step 4
    resumed.train(resume_from_checkpoint=str(tmp_path / "fused" / "checkpoint-2"))
    want, got = adapter(fused), adapter(resumed)
    assert want.keys() == got.keys() and len(want) == 28
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)

    fused.save_model(str(tmp_path / "saved"))  # loads in stock PEFT with the trained model's logits
    lorafuse.unpatch_peft()
    try:
        reloaded = peft.PeftModel.from_pretrained(_llama(), str(tmp_path / "saved"))
    finally:
        lorafuse.patch_peft()
    assert not _fused_layers(reloaded)
    ids = torch.tensor([rows[0]["input_ids"]])
    fused.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, fused.model(input_ids=ids).logits, rtol=1e-5,
                                   atol=1e-5)


def _saved_adapter(tmp_path, **conf):
    model = peft.get_peft_model(_llama(), peft.LoraConfig(**dict(LORA, **conf)))
    model.save_pretrained(tmp_path)
    return model


def _lora_layers(model):
    return [m for m in model.modules() if isinstance(m, PeftLinear)]


@pytest.mark.parametrize("damage", ["pickle_only", "bad_header", "hostile_regex", "nan"])
def test_patched_peft_loaders_refuse_hostile_adapter_dirs(tmp_path, patched, damage):
    """While patched, PEFT's own loaders validate a local directory first: AdapterFileError, model
    untouched (no LoRA layer injected), nothing unpickled."""
    import json

    from lorafuse.io_validate import AdapterFileError
    from safetensors.torch import load_file, save_file

    lorafuse.unpatch_peft()
    _saved_adapter(tmp_path)
    lorafuse.patch_peft()
    weights, config = tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"
    if damage == "pickle_only":
        weights.rename(tmp_path / "adapter_model.bin")
    elif damage == "bad_header":
        weights.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    elif damage == "hostile_regex":
        conf = json.loads(config.read_text())
        conf["target_modules"] = "(a+)+$"
        config.write_text(json.dumps(conf))
    else:
        tensors = load_file(weights)
        next(iter(tensors.values()))[0, 0] = float("nan")
        save_file(tensors, weights)
    base = _llama()
    with pytest.raises(AdapterFileError):
        peft.PeftModel.from_pretrained(base, tmp_path)
    assert not _lora_layers(base)
    host = peft.get_peft_model(_llama(), peft.LoraConfig(**LORA))
    with pytest.raises(AdapterFileError):
        host.load_adapter(tmp_path, adapter_name="other")
    assert "other" not in host.peft_config


def test_patched_loaders_take_what_peft_writes_and_unpatch_restores(tmp_path, patched):
    """A DoRA adapter PEFT saved loads through the patched (validating) loader as through stock PEFT (and then
    runs fused: fp32 summation order is all that differs); unpatch_peft gives PEFT's loaders back."""
    lorafuse.unpatch_peft()
    saved = _saved_adapter(tmp_path, use_dora=True)
    stock_loaded = peft.PeftModel.from_pretrained(_llama(), tmp_path)
    lorafuse.patch_peft()
    loaded = peft.PeftModel.from_pretrained(_llama(), tmp_path)
    assert len(_fused_layers(loaded)) == 14
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = saved(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
        assert {m.lorafuse_path for m in _fused_layers(loaded)} == {"c"}
        torch.testing.assert_close(stock_loaded(input_ids=ids).logits, ref, rtol=0, atol=0)
    lorafuse.unpatch_peft()
    from lorafuse import peft_fused

    assert peft.PeftModel.__dict__["from_pretrained"] is peft_fused._STOCK_FROM_PRETRAINED
    assert peft.PeftModel.__dict__["load_adapter"] is peft_fused._STOCK_LOAD_ADAPTER


class _ConvNet(torch.nn.Module):
    """A Conv2d and a Linear: PEFT puts LoRA on both (4-D lora_A / lora_B for the convolution)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(9)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.lin = torch.nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.lin(self.conv(x).flatten(1))


@pytest.mark.parametrize("method", ["lora-conv2d", "ia3"])
def test_patched_loaders_take_other_peft_adapters(tmp_path, patched, method):
    """PEFT adapters lorafuse's own loader would not take (a Conv2d LoRA, another PEFT method) load
    through the patched loaders exactly as through stock PEFT: the validation there is method-independent."""
    if method == "ia3":
        config = peft.IA3Config(target_modules=["conv", "lin"], feedforward_modules=["lin"], init_ia3_weights=False)
    else:
        config = peft.LoraConfig(target_modules=["conv", "lin"], r=2, init_lora_weights=False)
    lorafuse.unpatch_peft()
    saved = peft.get_peft_model(_ConvNet(), config)
    saved.save_pretrained(tmp_path)
    lorafuse.patch_peft()
    loaded = peft.PeftModel.from_pretrained(_ConvNet(), tmp_path)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), saved(x), rtol=1e-6, atol=1e-6)
    if method == "lora-conv2d":
        assert len(_fused_layers(loaded)) == 1  # the Linear; the Conv2d layer is PEFT's own


def test_trl_sft_trainer_with_peft_config_after_patch(tmp_path):
    """trl's SFTTrainer(model=base, peft_config=peft.LoraConfig(...)) after patch_peft() trains with
    lorafuse layers inside a real PeftModel; the losses equal the unpatched run's (dropout 0) to bf16
    accuracy: SFTConfig defaults to bf16=True, so both runs compute every linear under CPU autocast in
    bf16 (the fused layers too, on the bf16 kernels), rounding y once where PEFT rounds twice — 1e-3
    relative on a loss averaged over 64 tokens (a bf16 rounding is ≤ 2⁻⁸ ≈ 4e-3 per value)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizers = pytest.importorskip("tokenizers")
    words = "the a cat dog sat ran on under mat log big small red blue".split()
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]"] + words)}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", pad_token="[PAD]",
                                               eos_token="[EOS]")
    gen = torch.Generator().manual_seed(0)
    texts = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (10,), generator=gen)) for _ in range(16)]
    data = datasets.Dataset.from_dict({"text": texts})

    def run(patched, out):
        cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=136,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
                                       eos_token_id=2, bos_token_id=None)
        torch.manual_seed(0)
        base = transformers.LlamaForCausalLM(cfg)
        if patched:
            lorafuse.patch_peft()
        try:
            args = trl.SFTConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, report_to=[],
                                 use_cpu=True, max_length=16, seed=0, logging_steps=1, save_strategy="no")
            trainer = trl.SFTTrainer(model=base, args=args, train_dataset=data, processing_class=tok,
                                     peft_config=peft.LoraConfig(**LORA))
            trainer.train()
        finally:
            lorafuse.unpatch_peft()
        assert isinstance(trainer.model, peft.PeftModel)
        kinds = {type(m) for m in trainer.model.modules() if isinstance(m, PeftLinear)}
        return [e["loss"] for e in trainer.state.log_history if "loss" in e], kinds

    losses, kinds = run(True, tmp_path / "fused")
    ref, ref_kinds = run(False, tmp_path / "stock")
    assert kinds == {FusedLinear} and ref_kinds == {PeftLinear}
    assert len(losses) == 3 and losses == pytest.approx(ref, rel=1e-3)


def test_packed_weight_cache_on_fused_layers():
    """lorafuse.cache_packed_weights reaches FusedLinear: the same results bit for bit, W's panels kept
    (packed_weight_bytes > 0), dropped by PEFT's merge, a merged-unmerged W repacked."""
    stock, fused = _twins()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(11))
    plain = _step(fused, ids)
    assert lorafuse.cache_packed_weights(fused) == 14
    layers = _fused_layers(fused)
    assert sum(m.packed_weight_bytes for m in layers) == 0
    cached = _step(fused, ids)
    assert all(m.packed_weight_bytes > 0 for m in layers)
    _assert_same(plain, cached, tol=0)
    fused.base_model.merge_adapter()
    assert sum(m.packed_weight_bytes for m in layers) == 0
    fused.base_model.unmerge_adapter()
    stock.base_model.merge_adapter()
    stock.base_model.unmerge_adapter()  # the same round trip of W on the stock side
    _assert_same(_step(stock, ids), _step(fused, ids))
    assert lorafuse.cache_packed_weights(fused, enabled=False) == 14
    assert sum(m.packed_weight_bytes for m in layers) == 0
