"""lorafuse vs PEFT on drawn LoRA configurations: family (Llama, Qwen2, GPT-2's Conv1D, BERT), dtype, rank, alpha,
rsLoRA, DoRA, dropout, bias mode, a subset of the target modules and the initialisation, drawn from one seeded
generator a case (the draw is the test's id; LORAFUSE_PARITY_DRAWS=300 draws more). test_peft_parity.py checks
four chosen configurations in depth; these reach their combinations — bias "all" with DoRA, rsLoRA on fp16, r = 1,
PiSSA and OLoRA on half-precision bases …

Each case, on identical weights (`_pair`: PEFT's model, its adapters and trained biases randomised, loaded into
lorafuse's; then `_tame`; PEFT given lorafuse's dropout masks, test_dora.SeededDropout): one training step's
logits, loss and every trainable gradient, with every layer on the C kernels, within the configuration's own noise
of PEFT's (`_assert_within_peft_noise`); the adapter files each library saves, tensor for tensor and config for
config; merge_and_unload's weights. A configuration PEFT itself fails on (orthogonal init at an odd rank; PiSSA /
OLoRA on GPT-2's Conv1D, whose transposed weight PEFT's SVD misreads) must fail in lorafuse too, never run with
other results. (Checked: the fused layers' scale × 1.1 fails every case that runs them, × 1.01 every fp32 one;
PEFT without the masks every case with dropout.)"""
from __future__ import annotations

import copy
import json
import os
import random
import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import lorafuse  # noqa: E402
from test_dora import SeededDropout  # noqa: E402
from test_peft_parity import CASES, _assert_match, _base, _inputs, _pair, _paths, _run  # noqa: E402

TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc", "mlp.c_proj", "attn.c_proj"],
    "bert": ["query", "key", "value", "dense"],
}
SEEDS = range(int(os.environ.get("LORAFUSE_PARITY_DRAWS", "24")))


def draw(seed: int) -> tuple[str, str, dict]:
    """(family, dtype, LoRA kwargs over the family's case) of case ``seed``."""
    rnd = random.Random(seed)
    name = rnd.choice(sorted(TARGETS))
    dtype = rnd.choice(["float32", "float32", "bfloat16", "float16"])
    targets = TARGETS[name]
    lora = dict(r=rnd.choice([1, 2, 4, 8, 16]), lora_alpha=rnd.choice([1, 4, 8, 16, 32]),
                target_modules=sorted(rnd.sample(targets, rnd.randint(1, len(targets)))),
                use_rslora=rnd.random() < 0.3, use_dora=rnd.random() < 0.4,
                bias=rnd.choice(["none", "none", "lora_only", "all"]),
                init_lora_weights=rnd.choice([True, True, True, "gaussian", "pissa", "olora", "orthogonal"]),
                rank_pattern={}, alpha_pattern={}, lora_dropout=rnd.choice([0.0, 0.0, 0.1, 0.3]))
    return name, dtype, lora


def _describe(seed: int) -> str:
    name, dtype, lora = draw(seed)
    flags = [f for f, on in (("rslora", lora["use_rslora"]), ("dora", lora["use_dora"])) if on]
    flags += [f"dropout{lora['lora_dropout']:g}"] if lora["lora_dropout"] else []
    init = [] if lora["init_lora_weights"] is True else [str(lora["init_lora_weights"])]
    return "-".join([f"s{seed}", name, dtype, f"r{lora['r']}a{lora['lora_alpha']}", *flags, f"bias_{lora['bias']}",
                     *init, f"{len(lora['target_modules'])}targets"])


def _tame(*models: Any) -> None:
    """lora_B ÷ the layer's scaling, in every model alike: `_pair`'s randomised adapters times a drawn scale (up to
    32, rsLoRA at r = 1) made s·B·A ~60× W, whose saturated attention amplified fp32's summation-order differences
    to ~1e-4 on either side; trained adapters stay far smaller than W."""
    with torch.no_grad():
        for model in models:
            for module in model.modules():
                if isinstance(module, peft.tuners.lora.LoraLayer):
                    for adapter, lora_b in module.lora_B.items():
                        lora_b.weight.div_(module.scaling[adapter])


def _assert_within_peft_noise(got: dict, want: dict, ref: dict, dtype: str) -> None:
    """Each tensor of lorafuse's (got) within floor + 10× PEFT's own distance from the float64 model (ref) of PEFT's
    (want), relative to the tensor's largest magnitude; floor: fp32 1e-5 (test_peft_parity's summation-order
    bound), half 8 u_h. A drawn configuration can be ill-conditioned — PiSSA / OLoRA adapters the size of W, r = 1
    at s = 32 — and then amplifies each library's roundings by chance (the fp32 draws of seeds 0–119, before
    `_tame`: lorafuse's error up to 7× PEFT's either way, the geometric mean of the ratios 1.1; both small). PEFT's
    distance from float64 is that configuration's noise; 300 draws pass. A wrong term misses by orders of
    magnitude."""
    floor = {"float32": 1e-5, "bfloat16": 8 * 2.0 ** -8, "float16": 8 * 2.0 ** -11}[dtype]
    assert got.keys() == want.keys() == ref.keys() and ref
    for key, exact in ref.items():
        scale = exact.abs().max().clamp_min(1e-30)
        apart = float((got[key].double() - want[key].double()).abs().max() / scale)
        noise = float((want[key].double() - exact).abs().max() / scale)
        assert got[key].dtype == want[key].dtype and apart <= floor + 10 * noise, (key, apart, noise)


def _peft_fails(name: str, dtype: Any, lora: dict) -> bool:
    """PEFT's own model of this configuration fails to build or to run a training step."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(_base(name, dtype), peft.LoraConfig(**{**CASES[name].lora, **lora}))
            _run(model, _inputs(CASES[name]))
    except (RuntimeError, ValueError, TypeError):
        return True
    return False


def _saved(model: Any, path: Any) -> tuple[dict, dict]:
    """The tensors and the config ``model.save_pretrained(path)`` wrote."""
    from safetensors.torch import load_file

    model.save_pretrained(str(path))
    with open(path / "adapter_config.json") as handle:
        config = json.load(handle)
    return load_file(str(path / "adapter_model.safetensors")), config


@pytest.mark.parametrize("seed", SEEDS, ids=[_describe(s) for s in SEEDS])
def test_drawn_configuration_matches_peft(seed: int, tmp_path: Any) -> None:
    name, dtype_name, lora = draw(seed)
    dtype = getattr(torch, dtype_name)
    if _peft_fails(name, dtype, lora):
        with pytest.raises((RuntimeError, ValueError, TypeError)), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lorafuse.get_peft_model(_base(name, dtype), lorafuse.LoraConfig(**{**CASES[name].lora, **lora}))
            _run(model, _inputs(CASES[name]))
        return
    theirs, ours = _pair(name, dtype, **lora)
    _tame(theirs, ours)
    for module in theirs.modules():  # PEFT given lorafuse's dropout masks (test_dora.SeededDropout)
        if isinstance(module, peft.tuners.lora.LoraLayer):
            for key, drop in list(module.lora_dropout.items()):
                if isinstance(drop, torch.nn.Dropout):
                    module.lora_dropout[key] = SeededDropout(drop.p)
    inputs = _inputs(CASES[name], seed=seed)
    ref_model = copy.deepcopy(theirs).double()  # the float64 model: the noise's reference
    for model in (theirs, ours, ref_model):
        model.train()
        model.get_base_model().set_attn_implementation("eager")  # one attention kernel in all three
    want, got = _run(theirs, inputs), _run(ours, inputs)
    assert _paths(ours) == {"c"}
    _assert_within_peft_noise(got, want, _run(ref_model, inputs), dtype_name)

    (tmp_path / "peft").mkdir()
    (tmp_path / "lorafuse").mkdir()
    want_files, got_files = _saved(theirs, tmp_path / "peft"), _saved(ours, tmp_path / "lorafuse")
    assert got_files[1] == want_files[1]
    assert got_files[0].keys() == want_files[0].keys() and got_files[0]
    for key, tensor in want_files[0].items():
        assert torch.equal(got_files[0][key], tensor), key

    theirs.eval()
    ours.eval()
    with torch.no_grad():
        plain_theirs, plain_ours = theirs.merge_and_unload(), ours.merge_and_unload()
        _assert_match(plain_ours.state_dict(), plain_theirs.state_dict())
