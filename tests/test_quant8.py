"""8-bit (LLM.int8) bases in bitsandbytes' storage (lorafuse.quant8): quantize → dequantize within half a
code step of the float16 weight, zero rows, forward against float64, state dicts, copies and pickles, bad
input; and, where bitsandbytes is installed, the bits of its Int8Params quantization and of MatMul8bitFp's
W, Linear8bitLt's training-mode forward, state dicts both ways, and `lorafuse.quantize(model, "int8")` saved
and reloaded by transformers + bitsandbytes."""
from __future__ import annotations

import copy
import io
import json
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lorafuse  # noqa: E402
from lorafuse.quant8 import Linear8bit, Weight8bit, dequantize_int8, quantize_weight_int8  # noqa: E402

SHAPES = ((1, 1), (7, 33), (257, 65))
SOURCES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
HALF_U = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float64: 2.0 ** -53}


def weights(shape, dtype, seed=0):
    """Random W with an all-zero row, a -0 row and a row that underflows to zero in float16 (where there are
    rows enough), and a wide spread of row magnitudes."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g, dtype=torch.float64)
    W *= torch.logspace(-3, 2, shape[0], dtype=torch.float64)[:, None]
    if shape[0] >= 4:
        W[1] = 0.0
        W[2] = -0.0
        W[3] = 1e-9
    return W.to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float64: torch.int64, torch.float32: torch.int32}.get(t.dtype, torch.int16))


# ---------------------------------------------------------------- without bitsandbytes

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("src", SOURCES)
def test_round_trip_within_half_a_step_and_zero_rows(shape, src):
    """SCB is each row's absmax in float16; every code is within half a step (SCB/127) of W16·127/SCB and the
    largest reaches ±127; W' (exact, float64) within half a step of W16; zero rows give codes and scales 0."""
    W = weights(shape, src)
    CB, SCB = quantize_weight_int8(W)
    assert CB.dtype == torch.int8 and CB.shape == shape and SCB.dtype == torch.float32 and SCB.shape == shape[:1]
    W16 = W.to(torch.float16).double()
    absmax = W16.abs().amax(1)
    assert torch.equal(SCB.double(), absmax)
    nz = absmax > 0
    ideal = W16[nz] * 127 / absmax[nz, None]
    assert ((CB[nz].double() - ideal).abs() <= 0.5 + 1e-5).all()
    assert (CB[nz].abs().amax(1) == 127).all()
    assert (CB[~nz] == 0).all() and (SCB[~nz] == 0).all()
    exact = dequantize_int8(CB, SCB, torch.float64)
    assert ((exact - W16).abs() <= (absmax / 254 * (1 + 1e-5))[:, None]).all()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        D = dequantize_int8(CB, SCB, dtype)
        assert D.dtype == dtype and D.shape == shape
        fi = torch.finfo(dtype)  # one rounding of W' (half a subnormal step below the normal range)
        assert ((D.double() - exact).abs() <= exact.abs() * HALF_U[dtype] * 1.0001 + fi.tiny * fi.eps / 2).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_against_float64(dtype):
    """y = x·W'ᵀ + b within the rounding of W' and of y to x's dtype (fp32 accumulation) of the float64 product
    on the exact W'; x requires grad: dx = g·W'."""
    torch.manual_seed(0)
    lin = nn.Linear(65, 31)
    layer = Linear8bit.from_linear(lin)
    x = torch.randn(4, 3, 65).to(dtype).requires_grad_()
    y = layer(x)
    assert y.dtype == dtype and y.shape == (4, 3, 31)
    W = dequantize_int8(layer.weight.data, layer.weight.SCB, torch.float64)
    ref = torch.nn.functional.linear(x.detach().double(), W, lin.bias.detach().double())
    mag = torch.nn.functional.linear(x.detach().double().abs(), W.abs(), lin.bias.detach().double().abs())
    u = HALF_U[dtype]
    assert ((y.detach().double() - ref).abs() <= u * ref.abs() + (2 * u + 65 * 2.0 ** -24) * mag).all()
    g = torch.randn(4, 3, 31).to(dtype)
    y.backward(g)
    dref = g.double() @ W
    dmag = g.double().abs() @ W.abs()
    assert ((x.grad.double() - dref).abs() <= u * dref.abs() + (2 * u + 31 * 2.0 ** -24) * dmag).all()
    assert layer.weight.grad is None and not layer.weight.requires_grad and not layer.bias.requires_grad


def test_state_dict_round_trip_copies_pickles_and_moves():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(33, 20), nn.ReLU(), nn.Linear(20, 7, bias=False))
    model.lm_head = nn.Linear(7, 3)
    x = torch.randn(5, 33, dtype=torch.bfloat16)
    lorafuse.quantize(model, "int8")
    assert isinstance(model[0], Linear8bit) and isinstance(model[2], Linear8bit) and type(model.lm_head) is nn.Linear
    assert model[2].bias is None and "in_features=20, out_features=7, bias=False" in repr(model[2])
    sd = model.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items() if k.startswith("0.")} == {
        "0.weight": (torch.int8, (20, 33)), "0.bias": (torch.float32, (20,)), "0.SCB": (torch.float32, (20,)),
        "0.weight_format": (torch.uint8, ())}
    assert sd["0.weight_format"].item() == 0 and "2.bias" not in sd
    want = model[2](torch.relu(model[0](x)))
    twin = nn.Sequential(Linear8bit(33, 20, bias=torch.zeros(20)), nn.ReLU(), Linear8bit(20, 7))
    twin.lm_head = nn.Linear(7, 3)
    twin.load_state_dict(sd)
    assert torch.equal(twin[0].weight.SCB, model[0].weight.SCB) and isinstance(twin[0].weight, Weight8bit)
    assert torch.equal(twin[2](torch.relu(twin[0](x))), want)
    buf = io.BytesIO()
    torch.save(sd, buf)  # a state dict needs no pickled classes
    buf.seek(0)
    twin.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(twin[2](torch.relu(twin[0](x))), want)
    assigned = nn.Sequential(Linear8bit(33, 20, bias=torch.zeros(20)), nn.ReLU(), Linear8bit(20, 7))
    assigned.lm_head = nn.Linear(7, 3)
    assigned.load_state_dict(sd, assign=True)
    assert isinstance(assigned[0].weight, Weight8bit) and torch.equal(assigned[0].weight.SCB, model[0].weight.SCB)
    # the module and the weight themselves: deepcopy and pickling keep SCB
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert isinstance(other[0].weight, Weight8bit) and torch.equal(other[0].weight.SCB, model[0].weight.SCB)
        assert other[0].weight.SCB is not model[0].weight.SCB
        assert torch.equal(other[2](torch.relu(other[0](x))), want)
    w = copy.deepcopy(model[0].weight)
    assert isinstance(w, Weight8bit) and torch.equal(w.SCB, model[0].weight.SCB) and torch.equal(w.CB, w.data)
    # dtype moves leave the codes int8 and the scales float32; the bias follows
    model.to(torch.float16)
    assert model[0].weight.dtype == torch.int8 and model[0].weight.SCB.dtype == torch.float32
    assert isinstance(model[0].weight, Weight8bit) and model[0].bias.dtype == torch.float16


def test_a_float_linear_state_dict_loads_quantized():
    lin = nn.Linear(9, 5)
    layer = Linear8bit(9, 5, bias=torch.zeros(5))
    layer.load_state_dict(lin.state_dict())
    ref = Linear8bit.from_linear(lin)
    assert torch.equal(layer.weight.data, ref.weight.data) and torch.equal(layer.weight.SCB, ref.weight.SCB)
    assert torch.equal(layer.bias, lin.bias)


def test_quantize_int8_refuses_4bit_options_and_bad_types():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="block_size and double_quant apply to 'nf4' / 'fp4' only"):
        lorafuse.quantize(model, "int8", block_size=64)
    with pytest.raises(ValueError, match="block_size and double_quant apply"):
        lorafuse.quantize(model, "int8", double_quant=False)
    with pytest.raises(ValueError, match="'nf4', 'fp4' or 'int8'"):
        lorafuse.quantize(model, "int4")
    assert type(model[0]) is nn.Linear


def _good():
    return dict(CB=torch.zeros(3, 4, dtype=torch.int8), SCB=torch.ones(3), dtype=torch.float32)


BAD_DEQUANT = [
    (dict(CB=torch.zeros(3, 4)), TypeError, "CB must be an int8 tensor, got a torch.float32 tensor"),
    (dict(CB=[[1]]), TypeError, "CB must be an int8 tensor, got list"),
    (dict(SCB=torch.ones(3, dtype=torch.float16)), TypeError, "SCB must be a float32 tensor"),
    (dict(SCB=torch.ones(4)), ValueError, r"SCB \(out_features,\), got CB \(3, 4\) and SCB \(4,\)"),
    (dict(CB=torch.zeros(12, dtype=torch.int8), SCB=torch.ones(12)), ValueError, "CB must be 2-D"),
    (dict(SCB=torch.tensor([1.0, float("nan"), 1.0])), ValueError, "finite row scales >= 0"),
    (dict(SCB=torch.tensor([1.0, float("inf"), 1.0])), ValueError, "finite row scales >= 0"),
    (dict(SCB=torch.tensor([1.0, -1.0, 1.0])), ValueError, "finite row scales >= 0"),
    (dict(dtype=torch.int32), ValueError, "dtype must be float32, bfloat16, float16 or float64"),
]


@pytest.mark.parametrize("over,exc,msg", BAD_DEQUANT, ids=[m for _, _, m in BAD_DEQUANT])
def test_dequantize_refuses_bad_input(over, exc, msg):
    a = {**_good(), **over}
    with pytest.raises(exc, match=msg):
        dequantize_int8(a["CB"], a["SCB"], a["dtype"])


BAD_QUANT = [
    ([[1.0]], TypeError, "W must be a floating-point tensor, got list"),
    (torch.ones(2, 2, dtype=torch.int32), TypeError, "floating-point tensor, got a torch.int32 tensor"),
    (torch.ones(4), ValueError, r"must be 2-D .* got shape \(4,\)"),
    (torch.ones(2, 2, 2), ValueError, "must be 2-D"),
    (torch.ones(0, 3), ValueError, "no empty dimension"),
    (torch.tensor([[1.0, float("nan")]]), ValueError, "holds inf or NaN"),
    (torch.tensor([[1.0, float("-inf")]]), ValueError, "holds inf or NaN"),
    (torch.tensor([[1.0, 7e4]]), ValueError, "exceeds float16's range"),
]


@pytest.mark.parametrize("W,exc,msg", BAD_QUANT, ids=[m for _, _, m in BAD_QUANT])
def test_quantize_refuses_bad_weights(W, exc, msg):
    with pytest.raises(exc, match=msg):
        quantize_weight_int8(W)


def test_layer_refuses_bad_input():
    layer = Linear8bit.from_linear(nn.Linear(6, 4))
    with pytest.raises(TypeError, match="x must be a float32, bfloat16, float16 or float64 tensor"):
        layer(torch.ones(2, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 6\), got \(2, 5\)"):
        layer(torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"CB must have shape \(4, 6\)"):
        Linear8bit(6, 4, torch.zeros(6, 4, dtype=torch.int8), torch.zeros(6))
    with pytest.raises(TypeError, match="SCB must be a float32 tensor"):
        Weight8bit(torch.zeros(2, 2, dtype=torch.int8), None)
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        Linear8bit.from_linear(nn.Conv1d(2, 2, 1))
    sd = layer.state_dict()
    with pytest.raises(ValueError, match="only the 'row' weight format"):
        Linear8bit(6, 4).load_state_dict({**sd, "weight_format": torch.tensor(1, dtype=torch.uint8)})
    with pytest.raises(RuntimeError, match="Missing key.*SCB"):
        Linear8bit(6, 4).load_state_dict({k: v for k, v in sd.items() if k != "SCB"})
    with pytest.raises(RuntimeError, match=r"SCB must be a float32 tensor of shape \(4,\)"):
        Linear8bit(6, 4).load_state_dict({**sd, "SCB": torch.ones(5)})
    with pytest.raises(RuntimeError, match="weight must be int8 codes"):
        Linear8bit(6, 4).load_state_dict({**sd, "weight": sd["weight"].to(torch.uint8)})


# ---------------------------------------------------------------- against bitsandbytes itself

def bnb():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: bit-identity with it is not checked")


def bnb_linear(lin: nn.Linear):
    """bnb's Linear8bitLt (has_fp16_weights=False) loaded from ``lin`` and quantized by its move to the CPU."""
    b = bnb()
    q = b.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False)
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")
    assert q.weight.dtype == torch.int8 and q.weight.SCB is not None
    return q


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("src", SOURCES)
def test_quantization_bit_identical_to_bitsandbytes(shape, src):
    """bnb's Int8Params quantizes W (its own dtype) on its move to the CPU: the same CB and SCB bits, zero rows
    (bnb's NaN cast to int8) included."""
    b = bnb()
    W = weights(shape, src, seed=shape[0])
    p = b.nn.Int8Params(W.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    CB, SCB = quantize_weight_int8(W)
    assert torch.equal(CB, p.data) and torch.equal(bits(SCB), bits(p.SCB))
    if src == torch.float32:  # the module path: Linear8bitLt loaded from a float linear, then .to("cpu")
        lin = nn.Linear(shape[1], shape[0])
        with torch.no_grad():
            lin.weight.copy_(W)
        q = bnb_linear(lin)
        assert torch.equal(CB, q.weight.data) and torch.equal(bits(SCB), bits(q.weight.SCB))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_bit_identical_to_matmul8bitfp(dtype, monkeypatch):
    """The W that bnb's MatMul8bitFp (Linear8bitLt in training mode, CPU) hands to F.linear, caught there."""
    torch.manual_seed(0)
    lin = nn.Linear(65, 257)
    with torch.no_grad():
        lin.weight[5] = 0.0
    q = bnb_linear(lin).train()
    CB, SCB = q.weight.data.clone(), q.weight.SCB.clone()
    seen = []
    real = torch.nn.functional.linear

    def spy(x, w, b=None):
        seen.append(w.detach().clone())
        return real(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    q(torch.randn(2, 65, dtype=dtype))
    monkeypatch.undo()
    assert len(seen) == 1 and seen[0].dtype == dtype
    assert torch.equal(bits(dequantize_int8(CB, SCB, dtype)), bits(seen[0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_forward_matches_linear8bitlt_training(dtype):
    """float32 x: both run ``F.linear`` on the same W' — the same bits. bf16 / fp16 x: lorafuse's fused kernels
    and bnb's ``F.linear`` each round an fp32 sum of the same products once, in their own order: within
    eps·|y| of each other (one or two units in the last place)."""
    torch.manual_seed(1)
    lin = nn.Linear(333, 7)
    ours, theirs = Linear8bit.from_linear(lin), bnb_linear(lin).train()
    x = torch.randn(3, 5, 333).to(dtype)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    if dtype == torch.float32:
        assert torch.equal(bits(a), bits(b))
    else:
        ulp = torch.finfo(dtype).eps * torch.maximum(a.abs(), b.abs()).double()
        assert ((a.double() - b.double()).abs() <= ulp).all()


def test_state_dicts_match_and_load_both_ways():
    torch.manual_seed(2)
    for bias in (True, False):
        lin, other = nn.Linear(33, 7, bias=bias), nn.Linear(33, 7, bias=bias)
        theirs, ours = bnb_linear(lin), Linear8bit.from_linear(lin)
        a, b = theirs.state_dict(), ours.state_dict()
        assert list(a) == list(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
        x = torch.randn(4, 33, dtype=torch.bfloat16)
        mine = Linear8bit(33, 7, bias=torch.zeros(7) if bias else None)
        mine.load_state_dict(a)  # bnb's → lorafuse's
        assert torch.equal(mine.weight.data, theirs.weight.data) and torch.equal(mine.weight.SCB, theirs.weight.SCB)
        back = bnb_linear(other)  # lorafuse's → bnb's (bnb loads into an already quantized layer)
        back.load_state_dict(b)
        assert torch.equal(back.weight.data, ours.weight.data) and torch.equal(back.weight.SCB, ours.weight.SCB)
        back.train()
        with torch.no_grad():
            assert torch.equal(back(x), mine(x)) and torch.equal(mine(x), ours(x))


def test_quantized_llama_saves_and_reloads_with_bitsandbytes(tmp_path):
    """`lorafuse.quantize(model, "int8")` writes transformers' own 8-bit quantization_config; the
    ``save_pretrained`` directory loads with transformers + bitsandbytes as Linear8bitLt modules holding the same
    codes and scales, computing the same logits (training mode: MatMul8bitFp)."""
    b = bnb()
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = lorafuse.quantize(transformers.LlamaForCausalLM(cfg), "int8")
    want = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"]).to_dict()
    got = model.config.quantization_config
    assert json.loads(json.dumps(got)) == json.loads(json.dumps(want))  # as config.json holds them
    model.save_pretrained(tmp_path / "q")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    mods = dict(loaded.named_modules())
    ours = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear8bit)]
    assert len(ours) == 14 and type(mods["lm_head"]) is nn.Linear
    for name, m in ours:
        theirs = mods[name]
        assert isinstance(theirs, b.nn.Linear8bitLt), name
        assert torch.equal(m.weight.data, theirs.weight.data), name
        assert torch.equal(bits(m.weight.SCB), bits(theirs.weight.SCB)), name
    ids = torch.randint(1, 61, (1, 6), generator=torch.Generator().manual_seed(6))
    model.train()
    loaded.train()  # bnb's eval mode is another computation (int8 activations)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
