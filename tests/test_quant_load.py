"""`lorafuse.load_quantized`: a checkpoint saved from a bitsandbytes-quantized transformers model (4-bit NF4 or
8-bit), loaded with lorafuse's quantized modules and without bitsandbytes — the same bits, the same logits —,
then LoRA on it; lorafuse.quantize's own saved models too; bad directories → ValueError."""
from __future__ import annotations

import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import lorafuse  # noqa: E402
from lorafuse.quant import Linear4bit, dequantize  # noqa: E402
from lorafuse.quant8 import Linear8bit  # noqa: E402
from test_qlora import LORA, VOCAB  # noqa: E402

KINDS = {"nf4": Linear4bit, "int8": Linear8bit}


def _no_bitsandbytes(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError


def _logits(model, seed: int) -> torch.Tensor:
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))
    model.train()  # bitsandbytes' eval mode computes otherwise (4-bit: repacked W; int8: int8 activations)
    with torch.no_grad():
        return model(input_ids=ids).logits


def _same_weights(ours, theirs) -> None:
    mods = dict(theirs.named_modules())
    n = 0
    for name, m in ours.named_modules():
        if isinstance(m, Linear4bit):
            assert torch.equal(dequantize(m.weight), dequantize(mods[name].weight)), name
            n += 1
        elif isinstance(m, Linear8bit):
            other = mods[name].weight
            scb = getattr(other, "SCB", None)
            scb = mods[name].state.SCB if scb is None else scb
            assert torch.equal(m.weight.data, other.data) and torch.equal(m.weight.SCB, scb), name
            n += 1
    assert n == 14, n  # every linear layer but the head


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_bitsandbytes_checkpoint_loads_without_bitsandbytes(llama_dir, tmp_path, monkeypatch, kind):
    """Saved from a model transformers + bitsandbytes loaded quantized; loaded here with bitsandbytes made
    unimportable: lorafuse's modules hold the same bits and give the same logits (training mode); LoRA layers
    attach (`LoraLinear4bit` / `LoraLinear8bit`, fused); saved again, it reloads the same."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: no bitsandbytes checkpoint to write")
    cfg = (transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.bfloat16) if kind == "nf4"
           else transformers.BitsAndBytesConfig(load_in_8bit=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg,
                                                                   dtype=torch.bfloat16)
    theirs.save_pretrained(tmp_path / "bnb")
    want = _logits(theirs, 0)
    _no_bitsandbytes(monkeypatch)
    ours = lorafuse.load_quantized(tmp_path / "bnb")
    assert not ours.training and ours.model.embed_tokens.weight.dtype == torch.bfloat16
    assert isinstance(ours.model.layers[0].mlp.down_proj, KINDS[kind]) and type(ours.lm_head) is torch.nn.Linear
    _same_weights(ours, theirs)
    assert torch.equal(_logits(ours, 0), want)
    ours.save_pretrained(tmp_path / "again")
    assert torch.equal(_logits(lorafuse.load_quantized(tmp_path / "again"), 2), _logits(ours, 2))
    peft_model = lorafuse.get_peft_model(ours, lorafuse.LoraConfig(**LORA))
    _logits(peft_model, 1)
    paths = {m.lorafuse_path for m in peft_model.modules() if hasattr(m, "lorafuse_path") and hasattr(m, "lora_A")}
    assert paths == {"c"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_lorafuse_quantized_checkpoint_round_trip(llama_dir, tmp_path, monkeypatch, kind):
    """`lorafuse.quantize` → save_pretrained → `load_quantized`, no bitsandbytes anywhere: the same logits."""
    _no_bitsandbytes(monkeypatch)
    model = lorafuse.quantize(transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16),
                              kind)
    model.save_pretrained(tmp_path / "q")
    loaded = lorafuse.load_quantized(tmp_path / "q", model_class=transformers.LlamaForCausalLM)
    assert isinstance(loaded.model.layers[1].self_attn.q_proj, KINDS[kind])
    assert torch.equal(_logits(loaded, 3), _logits(model, 3))


def test_directories_it_refuses(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        lorafuse.load_quantized(tmp_path / "nothing")
    with pytest.raises(ValueError, match="not quantized by bitsandbytes"):
        lorafuse.load_quantized(llama_dir)  # a plain checkpoint
    model = lorafuse.quantize(transformers.AutoModelForCausalLM.from_pretrained(llama_dir), "nf4")
    model.save_pretrained(tmp_path / "q")
    (tmp_path / "q" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        lorafuse.load_quantized(tmp_path / "q")
