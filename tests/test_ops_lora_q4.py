"""The fused LoRA kernels on a 4-bit W: `ops.lora_forward` / `ops.lora_backward` with W given as its codes
(`_C.q4_weight`: kernels/cpu/lora_half.c, rowdots_quant.c) and `lorafuse.quant.lora_linear_4bit`, against float64
of the values W's codes stand for (W dequantized exactly as bitsandbytes does, tests/test_quant4.py), with the
half-precision bounds of tests/test_ops_lora_half.py (its `Case`, W given as the handle): every ISA, NF4 /
FP4, double quantization on and off, block sizes, odd sizes, dropout, every plan, float32 activations
('mixed'); bad handles and mismatched operands → clear errors. The layers: tests/test_qlora.py."""
from __future__ import annotations


import pytest

torch = pytest.importorskip("torch")

from lorafuse import _C, ops, quant  # noqa: E402
from lorafuse.quant import lora_linear_4bit, q4_handle  # noqa: E402
from test_ops_lora_half import SEED, HandleCase, check_mixed  # noqa: E402

QUANTS = [("nf4", True, 64), ("fp4", False, 64), ("nf4", False, 32), ("fp4", True, 128)]


class Q4Case(HandleCase):
    """A `Case` whose W is a 4-bit weight: the kernels get its handle, the float64 reference the values
    it dequantizes to (bnb's dequantize_4bit, then rounded to the base dtype — what the kernels multiply)."""

    def __init__(self, *args, quant_type: str = "nf4", double_quant: bool = True, block_size: int = 64, **kw) -> None:
        super().__init__(*args, **kw)
        self.data, self.state = quant.quantize_weight(self.W.float(), quant_type, block_size=block_size,
                                                      double_quant=double_quant)
        self.W = quant.dequantize(self.data, self.state, dtype=self.x.dtype)
        self.weight = torch.nn.Parameter(self.data, requires_grad=False)
        self.weight.quant_state = self.state
        self.handle = q4_handle(self.weight, self.x.dtype)


SHAPES = [(1, 64, 33, 4), (7, 33, 65, 5), (8, 257, 40, 16), (33, 130, 257, 8), (257, 96, 70, 3)]


@pytest.mark.parametrize("base", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_of_the_dequantized_weight(half_isa, base, shape):
    n = shape[0]
    quant_type, double_quant, block = QUANTS[(n + len(base)) % len(QUANTS)]
    for adapters, p in (("float32", 0.0), (base, 0.2)):
        Q4Case(*shape, base, adapters, p, quant_type=quant_type, double_quant=double_quant, block_size=block).check()


@pytest.mark.parametrize("base", ["bfloat16", "float16"])
@pytest.mark.parametrize("n", range(1, 9))
def test_decode_reads_the_codes_through_block_tables(half_isa, base, n):
    """1–8 tokens with K a multiple of the block size: the decode kernel that looks W's elements up in
    per-block tables (rowdots_quant.c, AVX2 and up; generic: the block-buffer path) — one row or two at a time,
    an odd number of rows, K in one or several blocks of the kernel (the fp32 kernels' at n = 8, K = 1024; the
    vdpbf16ps kernels' 8192 at K = 8448, blocks of 32: the vpermd kernel, of 64: the byte-shuffle one; one token's
    4096 at K = 8320), blocks of 32–4096 (AVX2 with a bf16 x: 64 elements a step from blocks of 64 up, 32 below);
    x's rows strided for n = 2 and 8 (the kernels read x re-laid in chunks of 32 or 64, token after token)."""
    block = (32, 64, 128)[n % 3]
    k = 1024 if n in (3, 8) else 128 * (1 + n % 2)
    c = Q4Case(n, k, 37, 3, base, "float32", quant_type=("nf4", "fp4")[n % 2], double_quant=n % 4 != 1,
               block_size=block, x_pad=5 if n in (2, 8) else 0)
    c.check(("skinny", "decode"))
    if n in (3, 8):
        Q4Case(n, 8192 + 256, 9, 2, base, "float32", block_size=32 if n == 3 else 64,
               x_pad=3).check(("skinny", "decode"))
    if n == 1:
        Q4Case(n, 8192 + 128, 7, 2, base, "float32", block_size=64, x_pad=3).check(("skinny", "decode"))
    if n == 8:
        Q4Case(n, 4096, 5, 2, base, "float32", block_size=4096).check(("skinny", "decode"))


@pytest.mark.parametrize("n", [9, 17, 24, 25])
def test_decode_takes_groups_of_8_tokens_where_the_gemm_would_widen_w(half_isa, n):
    """9–24 tokens, K a multiple of the block size, where the base GEMM would widen W (below avx512_bf16, or an fp16
    x: rowdots_quant.c grouped_for): y 'decode' runs the decode kernels on each group of 8 tokens (the last one
    short), x's rows strided, K over several of the fp32 kernels' K blocks; the plan takes it by itself. Elsewhere,
    and above 24 tokens, 'decode' is refused."""
    for base in ("bfloat16", "float16"):
        c = Q4Case(n, 1024, 37, 3, base, "float32", quant_type="fp4" if n % 2 else "nf4", block_size=128, x_pad=5)
        grouped = _C.get_isa() in ("avx2", "avx512") or (base == "float16" and _C.get_isa() != "generic")
        if grouped and n <= 24:
            c.check(("skinny", "decode"))
            c.forward()
            assert _C.last_forward_plan() == ("skinny", "decode")
        else:
            with pytest.raises(ValueError, match="'decode' needs at most 8 tokens"):
                c.forward(("skinny", "decode"))


@pytest.mark.parametrize("quant_type, double_quant, block", QUANTS)
def test_every_storage_variant(quant_type, double_quant, block):
    Q4Case(9, 200, 37, 4, "bfloat16", "float32", 0.1, quant_type=quant_type, double_quant=double_quant,
           block_size=block).check()


@pytest.mark.parametrize("n", [1, 8, 9, 33])
def test_plans_chosen_and_forced(half_isa, n):
    """A few tokens: y 'decode' reads the 4-bit codes a block at a time; more: the GEMMs dequantize W while
    packing. Every legal plan forced stays within the bounds."""
    for base in ("bfloat16", "float16"):
        c = Q4Case(n, 72, 40, 4, base, "float32")
        _, u = c.forward()
        c.backward(u)
        tile = base == "bfloat16" and _C.get_isa() in ("avx512_bf16", "amx_bf16")
        assert _C.last_forward_plan() == ("skinny", "decode" if n <= 8 else "split" if tile else "augmented")
        for y_path in ("decode", "split", "augmented") if n <= 8 else ("split", "augmented"):
            for u_path, da_path, dx_path in (("skinny", "gemm", "masked"), ("gemm", "skinny", "augmented")):
                c.check((u_path, y_path), (u_path, da_path, dx_path))
                assert _C.last_forward_plan() == (u_path, y_path)


@pytest.mark.parametrize("base", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(1, 64, 33, 4), (8, 128, 40, 3), (33, 130, 70, 8), (257, 64, 65, 16)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_float32_x_keeps_peft_and_bitsandbytes_roundings(half_isa, base, shape, p):
    """x and g float32 on a 4-bit W of a half compute dtype ('mixed': QLoRA with fp32 activations, as after
    PEFT's prepare_model_for_kbit_training): y = round(round(x)·Wᵀ + b) + s·(x̃·Aᵀ)·Bᵀ and dx = round(round(g)·W)
    + s·drop'((g·B)·A) in float32 — bitsandbytes rounds its product, PEFT adds its fp32 LoRA term —, dA and dB
    from the fp32 x and g. Bounds: the base as a half result rounded once (its inputs x, g rounded first),
    the LoRA terms as fp32 sums."""
    check_mixed(Q4Case(*shape, base, "float32", p))


def test_zero_tokens():
    Q4Case(0, 64, 16, 2, "bfloat16", "float32").check()


def test_bad_handles_and_operands():
    c = Q4Case(3, 64, 16, 2, "bfloat16", "float32")
    with pytest.raises(TypeError, match="float32 x on a half or quantized W the adapters must be float32"):
        ops.lora_forward(c.x.float(), c.handle, c.A.bfloat16(), c.B.bfloat16(), 1.0)
    with pytest.raises(ValueError, match="float32 x on a bf16/fp16 base takes y 'decode' or 'split'"):
        ops.lora_forward(c.x.float(), c.handle, c.A, c.B, 1.0, plan=("skinny", "augmented"))
    with pytest.raises(ValueError, match="float32 g on a bf16/fp16 base takes dx 'masked'"):
        ops.lora_backward(c.g.float(), c.x.float(), torch.zeros(3, 2), c.handle, c.A, c.B, 1.0,
                          plan=("skinny", "skinny", "augmented"))
    with pytest.raises(TypeError, match="elements are bfloat16 but x is float16"):
        ops.lora_forward(c.x.half(), c.handle, c.A, c.B, 1.0)
    with pytest.raises(ValueError, match="fan_in_fan_out must be False"):
        ops.lora_forward(c.x, c.handle, c.A, c.B, 1.0, fan_in_fan_out=True)
    with pytest.raises(ValueError, match=r"k = x.shape\[-1\] = 32"):
        ops.lora_forward(c.x[:, :32], c.handle, c.A[:, :32], c.B, 1.0)
    with pytest.raises(ValueError, match="B"):
        ops.lora_forward(c.x, c.handle, c.A, c.B[:8], 1.0)
    with pytest.raises(ValueError, match="'decode', 'split' or 'augmented' only"):  # a plan of the fp32 kernels
        ops.lora_forward(c.x, c.handle, c.A, c.B, 1.0, plan=("gemm", "merged"))
    data, absmax, rows2d, kw, st = quant._stored(c.weight, c.state, "t")
    with pytest.raises(ValueError, match="dtype must be 'bfloat16' or 'float16'"):
        _C.q4_weight(data, absmax, rows2d, 64, "nf4", dtype="float32", **kw)
    with pytest.raises(ValueError):  # absmax too short for the weight's blocks
        _C.q4_weight(data, absmax[:-1], rows2d, 64, "nf4", **kw)
    with pytest.raises(ValueError, match="quant_type"):
        _C.q4_weight(data, absmax, rows2d, 64, "int3", **kw)
    with pytest.raises(TypeError):
        lora_linear_4bit(c.x.float(), c.weight, None, c.A, c.B, 1.0)


def test_handle_is_kept_until_the_weight_changes():
    c = Q4Case(3, 64, 16, 2, "bfloat16", "float32")
    assert q4_handle(c.weight, torch.bfloat16) is c.handle
    assert q4_handle(c.weight, torch.float16) is not c.handle
    with torch.no_grad():
        c.weight.add_(0)  # an in-place change bumps the version: a new handle
    assert q4_handle(c.weight, torch.bfloat16) is not c.handle


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_linear_4bit_gradients_and_double_backward(p):
    """The autograd function: dx, dA, dB, db from the kernels equal torch's autograd over the same math
    (W dequantized, lorafuse's dropout mask) within bf16 bounds; under create_graph the gradients are
    differentiable (a gradient penalty's second derivative matches torch's)."""
    c = Q4Case(9, 64, 24, 4, "bfloat16", "float32", p)
    x = c.x.clone().requires_grad_()
    A, B = c.A.clone().requires_grad_(), c.B.clone().requires_grad_()
    bias = c.bias.clone().requires_grad_()
    mask = torch.from_numpy(ops.dropout_mask(9, 64, p, SEED)) if p else torch.ones(9, 64)

    def reference(x, A, B, bias):
        return (x.float() @ c.W.float().t() + bias.float() + c.s * ((x.float() * mask) @ A.t()) @ B.t())

    y = lora_linear_4bit(x, c.weight, bias, A, B, c.s, p, SEED)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference(x, A, B, bias), rtol=2e-2, atol=2e-2)
    ours = torch.autograd.grad((y.float() * c.g.float()).sum(), (x, A, B, bias))
    xr, Ar, Br, br = (t.detach().clone().requires_grad_() for t in (x, A, B, bias))
    theirs = torch.autograd.grad((reference(xr, Ar, Br, br) * c.g.float()).sum(), (xr, Ar, Br, br))
    for name, a, b in zip(("dx", "dA", "dB", "db"), ours, theirs):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item(), msg=name)
    # gradient penalty: ∂/∂A of ‖∂L/∂B‖²
    (gB,) = torch.autograd.grad((lora_linear_4bit(x, c.weight, bias, A, B, c.s, p, SEED).float() * c.g.float()).sum(),
                                (B,), create_graph=True)
    (hA,) = torch.autograd.grad(gB.square().sum(), (A,))
    (gBr,) = torch.autograd.grad((reference(xr, Ar, Br, br) * c.g.float()).sum(), (Br,), create_graph=True)
    (hAr,) = torch.autograd.grad(gBr.square().sum(), (Ar,))
    torch.testing.assert_close(hA, hAr, rtol=3e-2, atol=3e-2 * hAr.abs().max().item())
