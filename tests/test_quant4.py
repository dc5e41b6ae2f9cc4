"""4-bit bases in bitsandbytes' storage (lorafuse/quant.h, lorafuse.quant): the code tables, quantize →
dequantize round trips within each block's step, odd shapes, every block size, double quantization,
sub-ranges, every ISA bit-identical to the generic code, bad input; and, where bitsandbytes is
installed, the bits of its quantize_4bit / dequantize_4bit and a bnb Linear4bit read as it is."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lorafuse  # noqa: E402
from lorafuse import _C  # noqa: E402
from lorafuse import quant  # noqa: E402

BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SHAPES = ((1, 7), (7, 33), (33, 100), (3, 64), (5, 130))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
FP4 = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]


def isas():
    order = ["generic", "avx2", "avx512", "avx512_bf16", "amx_bf16"]
    best = _C.cpu_isa()
    return order[: order.index(best) + 1] if best in order else order


@pytest.fixture
def restore_isa():
    isa = _C.get_isa()
    yield
    _C.set_isa(isa)


def reference(data: torch.Tensor, state, dtype) -> torch.Tensor:
    """bnb's formula (backends/default): code[q] · absmax[e / B] in fp32, rounded once to dtype"""
    code = torch.tensor(_C.quant_tables()[state.quant_type])
    b = data.reshape(-1).to(torch.int64)
    q = torch.stack([b >> 4, b & 15], 1).reshape(-1)
    n = int(np.prod(state.shape))
    absmax = state.absmax
    if state.nested:
        absmax = state.state2.code[absmax.long()] * state.state2.absmax.repeat_interleave(256)[: absmax.numel()]
        absmax = absmax + state.offset
    w = code[q[:n]] * absmax[torch.arange(n) // state.blocksize]
    return w.to(dtype).reshape(state.shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def test_code_tables_are_bnbs():
    t = _C.quant_tables()
    assert t["nf4"] == torch.tensor(NF4, dtype=torch.float32).tolist()
    fp4 = torch.tensor(FP4, dtype=torch.float32)
    assert t["fp4"] == (fp4 / fp4.abs().max()).tolist()
    assert len(t["dynamic"]) == 256 and t["dynamic"] == sorted(t["dynamic"]) and t["dynamic"][-1] == 1.0


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_within_a_step(quant_type, block, double_quant):
    """every element comes back within half the largest gap of the code table times its block's scale
    (plus the double-quantized scale's own error), for odd shapes and blocks that straddle rows"""
    code = sorted(_C.quant_tables()[quant_type])
    half_gap = max(b - a for a, b in zip(code, code[1:])) / 2
    g = torch.Generator().manual_seed(block)
    for shape in SHAPES:
        W = torch.randn(shape, generator=g) * 2
        data, state = quant.quantize_weight(W, quant_type, block_size=block, double_quant=double_quant)
        assert data.shape == ((W.numel() + 1) // 2, 1) and data.dtype == torch.uint8
        D = quant.dequantize(data, state)
        assert D.shape == W.shape and D.dtype == W.dtype
        n, nb = W.numel(), -(-W.numel() // block)
        flat = torch.nn.functional.pad(W.reshape(-1).abs(), (0, nb * block - n))
        scale = flat.view(nb, block).amax(1).repeat_interleave(block)[:n].reshape(shape)
        slack = 1.02 if double_quant else 1.0 + 1e-6
        assert ((D - W).abs() <= scale * half_gap * slack + 1e-7).all()
        assert torch.equal(bits(D), bits(reference(data, state, W.dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type, double_quant, block",
                         [("nf4", False, 64), ("nf4", True, 64), ("nf4", True, 256), ("nf4", True, 32),
                          ("fp4", False, 128)])
def test_every_isa_gives_the_generic_bits_and_sub_ranges_match(dtype, quant_type, double_quant, block, restore_isa):
    """Every ISA level the CPU has (a 16-bit output takes the vpshufb span from avx2 up, the VBMI span on avx512_bf16
    / amx_bf16 where the CPU has it: 64 elements a step, tails), whole and in row and column ranges: odd starts,
    block edges, blocks crossing rows (300 columns), runs shorter than a step, blocks shorter than one (32)."""
    W = torch.randn(37, 300) * 3
    data, state = quant.quantize_weight(W, quant_type, block_size=block, double_quant=double_quant)
    kw = {}
    if double_quant:
        kw = dict(nested_absmax=state.state2.absmax, nested_code=state.state2.code, offset=float(state.offset))
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    full = {}
    for isa in isas():
        _C.set_isa(isa)
        full[isa] = quant.dequantize(data, state, dtype=dtype)
        assert torch.equal(bits(full[isa]), bits(full["generic"])), isa
        for r0, r1 in ((0, 1), (5, 6), (3, 20), (36, 37), (4, 4)):
            part = quant.dequantize(data, state, dtype=dtype, rows=(r0, r1))
            assert torch.equal(bits(part), bits(full["generic"][r0:r1])), (isa, r0, r1)
        for c0, c1 in ((0, 1), (1, 2), (3, 250), (63, 65), (1, 130), (299, 300)):  # odd starts, block edges
            part = torch.from_numpy(_C.dequant_4bit(data, state.absmax, (37, 300), block, quant_type, name, rows=(2, 9),
                                                    cols=(c0, c1), **kw))
            assert torch.equal(part.view(torch.int32 if dtype == torch.float32 else torch.int16),
                               bits(full["generic"][2:9, c0:c1].contiguous())), (isa, c0, c1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_scales_round_as_the_generic_code_on_every_isa(dtype, restore_isa):
    """Blocks whose scale is NaN (a payload, a signalling one), +inf or -inf (code 0 times inf: NaN): every ISA gives
    the generic bits (kernels/cpu/half_store.h: bf16 NaN 0x7FC0, c10's rounding; fp16 a quiet NaN keeping its
    payload's top bits, torch's conversion of the float32 values) — where finite scales take the SIMD spans' integer
    rounding (quant4_internal.h lf_q4_byte_tables)."""
    W = torch.randn(6, 256)
    data, state = quant.quantize_weight(W, "nf4", block_size=64, double_quant=False)
    odd = torch.tensor([0x7FC00001, 0x7FA00000, 0xFFE00000, 0x7F800000, 0xFF800000], dtype=torch.int64)
    state.absmax[3:8] = odd.to(torch.int32).view(torch.float32)
    generic = None
    for isa in isas():
        _C.set_isa(isa)
        D = quant.dequantize(data, state, dtype=dtype)
        generic = D if generic is None else generic
        assert torch.equal(bits(D), bits(generic)), isa
    _C.set_isa("generic")
    wide = quant.dequantize(data, state, dtype=torch.float32)
    if dtype == torch.float16:
        assert torch.equal(bits(generic), bits(wide.to(dtype)))
    if dtype == torch.bfloat16:
        nan = wide.isnan()
        assert torch.equal(bits(generic)[~nan], bits(wide.to(dtype))[~nan])
        assert (bits(generic)[nan] == 0x7FC0).all()
    assert torch.isnan(generic.view(-1)[3 * 64:6 * 64]).all()


def edge_scales() -> torch.Tensor:
    """Finite scales around the edges of the SIMD spans' fast bf16 rounding (quant4_internal.h lf_q4_byte_tables:
    Veltkamp's split for 2⁻¹⁰⁰ ≤ |s| ≤ 2¹⁰⁰, the integer rounding beyond), and scales whose products with the codes
    ±1, ±0.5, ±0.25 are exact bf16 ties (the low 16 bits 0x8000, the bit above them 0 and 1) or one off a tie."""
    edges = [2.0 ** -100, np.nextafter(np.float32(2.0 ** -100), np.float32(0)), 2.0 ** 100,
             np.nextafter(np.float32(2.0 ** 100), np.float32(np.inf)), 1e-38, 1e-45, 3e38, -2.0 ** -100, -3e38]
    rng = np.random.default_rng(7)
    high = rng.integers(0x0080, 0x7F00, size=24).astype(np.uint32) << 16
    low = np.array([0x8000, 0x8000, 0x7FFF, 0x8001] * 6, dtype=np.uint32) | (np.arange(24, dtype=np.uint32) % 2 << 16)
    ties = ((high | low) ^ (np.arange(24, dtype=np.uint32) % 3 == 0) * np.uint32(0x80000000)).view(np.float32)
    return torch.cat([torch.tensor(np.array(edges, dtype=np.float32)), torch.from_numpy(ties)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_scales_at_the_fast_roundings_edges_and_ties_round_as_torch_on_every_isa(dtype, quant_type, restore_isa):
    scales = edge_scales()
    W = torch.randn(scales.numel(), 64)
    data, state = quant.quantize_weight(W, quant_type, block_size=64, double_quant=False)
    state.absmax.copy_(scales)  # one block a row
    _C.set_isa("generic")
    wide = quant.dequantize(data, state, dtype=torch.float32)
    assert torch.equal(bits(wide), bits(reference(data, state, torch.float32)))
    for isa in isas():
        _C.set_isa(isa)
        assert torch.equal(bits(quant.dequantize(data, state, dtype=dtype)), bits(wide.to(dtype))), isa


def test_quantize_is_deterministic_for_each_input_dtype_and_zero_blocks():
    W = torch.zeros(4, 64)
    W[1, 3] = 1.5
    for dtype in DTYPES:
        data, state = quant.quantize_weight(W.to(dtype), "fp4", block_size=32, double_quant=False)
        assert state.absmax.tolist() == [0.0, 0.0, 1.5, 0.0, 0.0, 0.0, 0.0, 0.0]
        D = quant.dequantize(data, state)
        assert torch.equal(D.float(), W)


def test_model_quantize_and_state_dict_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(33, 20), nn.ReLU(), nn.Linear(20, 7, bias=False))
    model.lm_head = nn.Linear(7, 3)
    x = torch.randn(5, 33)
    lorafuse.quantize(model, "nf4", block_size=64, double_quant=True)
    assert isinstance(model[0], quant.Linear4bit) and isinstance(model[2], quant.Linear4bit)
    assert type(model.lm_head) is nn.Linear
    sd = model.state_dict()
    assert {"0.weight", "0.weight.absmax", "0.weight.quant_map", "0.weight.nested_absmax",
            "0.weight.nested_quant_map", "0.weight.quant_state.bitsandbytes__nf4", "0.bias"} <= set(sd)
    y = model[2](torch.relu(model[0](x)))
    twin = nn.Sequential(nn.Linear(33, 20), nn.ReLU(), nn.Linear(20, 7, bias=False))
    twin.lm_head = nn.Linear(7, 3)
    lorafuse.quantize(twin, "fp4", block_size=128, double_quant=False)
    twin.load_state_dict(sd)
    assert twin[0].weight.quant_state.quant_type == "nf4" and twin[0].weight.quant_state.nested
    assert torch.equal(twin[2](torch.relu(twin[0](x))), y)
    with pytest.raises(ValueError, match="block_size and double_quant apply"):  # int8: tests/test_quant8.py
        lorafuse.quantize(model, "int8", block_size=64)


def good_args():
    W = torch.randn(6, 40)
    data, state = quant.quantize_weight(W, "nf4", block_size=32, double_quant=True)
    return dict(data=data, absmax=state.absmax, shape=(6, 40), blocksize=32, quant_type="nf4",
                nested_absmax=state.state2.absmax, nested_code=state.state2.code, offset=float(state.offset))


BAD = [
    (dict(data=torch.zeros(119, dtype=torch.uint8)), ValueError, "data holds fewer"),
    (dict(absmax=torch.zeros(7, dtype=torch.uint8)), ValueError, "absmax holds fewer codes"),
    (dict(absmax=torch.zeros(8)), TypeError, "absmax must be uint8"),
    (dict(nested_absmax=torch.zeros(0)), ValueError, "nested_absmax holds fewer"),
    (dict(nested_code=torch.zeros(255)), ValueError, "256 values"),
    (dict(nested_code=None), ValueError, "come together"),
    (dict(blocksize=48), ValueError, "blocksize must be one of"),
    (dict(blocksize=8192), ValueError, "blocksize must be one of"),
    (dict(quant_type="int4"), ValueError, "quant_type"),
    (dict(shape=(6, -40)), ValueError, "sizes >= 0"),
    (dict(shape=(2**40, 2**40)), ValueError, "product fits int64"),
    (dict(shape=(7, 40)), ValueError, "data holds fewer"),
    (dict(shape=[6, 40]), TypeError, "shape must be a tuple"),
    (dict(data=torch.zeros(120)), TypeError, "data must be uint8"),
    (dict(data=[1, 2]), TypeError, "numpy array or a CPU tensor"),
    (dict(dtype="float64"), ValueError, "dtype must be"),
    (dict(rows=(3, 9)), ValueError, "rows must satisfy"),
    (dict(cols=(5, 2)), ValueError, "cols must satisfy"),
    (dict(nested_blocksize=0), ValueError, "nested_blocksize must be"),
    (dict(nested_blocksize=1), ValueError, "nested_absmax holds fewer scales than ceil"),
    (dict(out=torch.empty(6, 41)), ValueError, "out must have shape"),
    (dict(out=torch.empty(6, 40, dtype=torch.float16)), ValueError, "out must have the dtype"),
    (dict(out=torch.empty(40, 6).t()), ValueError, "C-contiguous"),
    (dict(out=torch.empty(6, 40, requires_grad=True)), TypeError, "requires grad"),
]


@pytest.mark.parametrize("over,exc,msg", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_is_refused(over, exc, msg):
    a = good_args()
    a.update(over)
    pos = [a.pop(k) for k in ("data", "absmax", "shape", "blocksize", "quant_type")]
    with pytest.raises(exc, match=msg.replace("(", r"\(")):
        _C.dequant_4bit(*pos, **a)


def test_quantize_refuses_bad_weights():
    with pytest.raises(ValueError, match="inf or NaN"):
        _C.quant_4bit(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="W must be float32"):
        _C.quant_4bit(np.zeros(4, np.float64))
    with pytest.raises(ValueError, match="blocksize"):
        _C.quant_4bit(torch.zeros(4), 100)
    with pytest.raises(ValueError, match="finite"):
        _C.double_quant(torch.tensor([1.0, float("inf")]))


# ---------------------------------------------------------------- against bitsandbytes itself

def bnb_functional():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: bit-identity with it is not checked")
    import bitsandbytes.functional as F

    return F


def test_tables_equal_bitsandbytes():
    F = bnb_functional()
    t = _C.quant_tables()
    assert t["nf4"] == F.get_4bit_type("nf4", device="cpu").tolist()
    assert t["fp4"] == F.get_4bit_type("fp4", device="cpu").tolist()
    assert t["dynamic"] == F.create_dynamic_map().tolist()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("block", BLOCKS)
def test_bit_identical_to_bitsandbytes(quant_type, double_quant, block):
    F = bnb_functional()
    g = torch.Generator().manual_seed(block)
    for shape in SHAPES + ((2, 4096),):
        for wdtype in DTYPES:
            W = (torch.randn(shape, generator=g) * 3).to(wdtype)
            q, st = F.quantize_4bit(W, blocksize=block, quant_type=quant_type, compress_statistics=double_quant)
            data, state = quant.quantize_weight(W, quant_type, block_size=block, double_quant=double_quant)
            assert torch.equal(data, q) and torch.equal(state.absmax, st.absmax)
            if double_quant:
                assert torch.equal(state.state2.absmax, st.state2.absmax) and torch.equal(state.offset, st.offset)
                assert torch.equal(state.state2.code, st.state2.code)
            for dtype in DTYPES:
                st.dtype = dtype
                ours = quant.dequantize(q, st)  # bnb's own QuantState, read as it is
                theirs = F.dequantize_4bit(q, st).reshape(shape)
                # bnb's C kernel (even in_features) and its torch one (odd) differ in the sign of FP4's
                # zero and, where a block straddles rows, its C kernel reads the scale of the wrong block
                # (shape[1] % block != 0); lorafuse gives the torch kernel's bits for every shape
                assert torch.equal(bits(ours), bits(reference(q, st, dtype)))
                if shape[1] % block == 0 or shape[1] % 2:
                    assert torch.equal(ours, theirs), (shape, wdtype, dtype)


def test_bnb_linear4bit_read_as_it_is_and_state_dicts_cross():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
    import bitsandbytes as bnb

    torch.manual_seed(0)
    lin = nn.Linear(128, 40)  # in_features a multiple of the block: bnb's C kernel reads the right scales
    q = bnb.nn.Linear4bit(128, 40, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")
    if getattr(q.weight, "quant_state", None) is None:  # quantized on the first move to a device
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)._quantize("cpu")
    import bitsandbytes.functional as F

    W = quant.dequantize(q.weight)
    assert torch.equal(W, F.dequantize_4bit(q.weight.data, q.weight.quant_state).reshape(40, 128))
    ours = quant.Linear4bit(128, 40, torch.zeros(1, 1, dtype=torch.uint8), None, bias=torch.zeros(40))
    ours.load_state_dict(q.state_dict())
    x = torch.randn(3, 128)
    assert torch.equal(ours(x), torch.nn.functional.linear(x, W, q.bias))
    mine = quant.Linear4bit.from_linear(lin, "fp4", block_size=128, double_quant=True)
    sd = mine.state_dict()  # read by bnb as transformers' loader does (Params4bit.from_prequantized)
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    back = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, requires_grad=False, device="cpu")
    assert torch.equal(F.dequantize_4bit(back.data, back.quant_state).reshape(40, 128),
                       quant.dequantize(mine.weight))
