"""The fused LoRA kernels on an 8-bit W (bitsandbytes' LLM.int8 storage: int8 codes CB (m, k), fp32 row scales
SCB): `ops.lora_forward` / `ops.lora_backward` with W given as `_C.q8_weight`'s handle, against float64 of
the values the codes stand for — W' = CB·(SCB·(1/127)) rounded to the base dtype, bitsandbytes' own expression
(``MatMul8bitFp``) written here with torch — under the half-precision bounds of tests/test_ops_lora_half.py
(its `Case`, W given as the handle): every ISA, odd sizes, dropout, 1–8-token decode, every plan; W's
elements bit for bit (an identity x); bad handles → clear errors. The layers: tests/test_qlora.py."""
from __future__ import annotations

import gc

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lorafuse import _C, ops  # noqa: E402
from lorafuse.backend import _tensor  # noqa: E402
from lorafuse.quant8 import lora_linear_8bit, q8_handle  # noqa: E402
from test_ops_lora_half import SEED, HandleCase  # noqa: E402


def bnb_int8_weight(CB: torch.Tensor, SCB: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' W in training (autograd/_functions.py, MatMul8bitFp): CB cast, times SCB·(1/127) in fp32."""
    return CB.to(dtype).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))


def int8_storage(m: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes in [-127, 127] (rows holding ±127, as quantized rows do) and positive row scales."""
    gen = torch.Generator().manual_seed(seed)
    CB = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int16).to(torch.int8)
    if k:
        CB[:, 0] = 127
    return CB, torch.rand(m, generator=gen) * 4 + 0.01


class Q8Case(HandleCase):
    """A `Case` whose W is an 8-bit weight: the kernels get its handle, the float64 reference W' (module
    docstring)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.CB, self.SCB = int8_storage(self.m, self.k, self.n * 7 + self.k)
        self.W = bnb_int8_weight(self.CB, self.SCB, self.x.dtype)
        self.handle = q8_handle(self.CB, self.SCB, self.x.dtype)


SHAPES = [(1, 64, 33, 4), (7, 33, 65, 5), (8, 257, 40, 16), (33, 130, 257, 8), (257, 96, 70, 3)]


def test_transposed_gemm_window(half_isa):
    """64 tokens × a 1030 × 2050 W (≥ 2M elements, K even): on avx512_bf16 the forward's base product runs
    transposed, each block of W's rows dequantized into rows the pair tile reads in place (gemm.c
    w_rows_block_run); within the bounds there as everywhere."""
    Q8Case(64, 2050, 1030, 4, "bfloat16", "float32", 0.0).check()


@pytest.mark.parametrize("base", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_of_the_dequantized_weight(half_isa, base, shape):
    for adapters, p in (("float32", 0.0), (base, 0.2)):
        Q8Case(*shape, base, adapters, p).check()


@pytest.mark.parametrize("base", ["bfloat16", "float16"])
@pytest.mark.parametrize("k", [1, 7, 16, 33, 257])
def test_elements_bit_for_bit(half_isa, base, k):
    """x = I (k tokens) at rank 0: y = W'ᵀ exactly (one product, zeros summed), through the GEMM's packing (k > 8)
    or the decode path (k ≤ 8) — every ISA's dequantization gives bitsandbytes' bits. Then, through the widened
    GEMM ('augmented', forced: the bf16 tiles read denormals as 0), row 1's scale SCB/127 below the normal range
    (denormal products, which the avx512_bf16 level's vcvtne2ps2bf16 conversion would flush) and row 2's just above."""
    dt = getattr(torch, base)
    CB, SCB = int8_storage(37, k, k)
    eye = torch.eye(k, dtype=dt)
    y, _ = ops.lora_forward(eye, q8_handle(CB, SCB, dt), torch.zeros(0, k), torch.zeros(37, 0), 0.0)
    assert torch.equal(_tensor(y), bnb_int8_weight(CB, SCB, dt).t())
    if k > 8:
        SCB[1], SCB[2] = 1e-37, 2e-36
        y, _ = ops.lora_forward(eye, q8_handle(CB, SCB, dt), torch.zeros(1, k), torch.zeros(37, 1), 0.0,
                                plan=("skinny", "augmented"))  # rank 1, zero adapters: the plan's u needs r ≥ 1
        assert torch.equal(_tensor(y), bnb_int8_weight(CB, SCB, dt).t())


@pytest.mark.parametrize("n", range(1, 9))
def test_decode(half_isa, n):
    """1–8 tokens: W's rows dequantized a block at a time in cache for the decode kernel (rowdots_half.c) and
    for dx (lf_rows_axpy_half); K = 8232 for 3 and 8 tokens: two of the vdpbf16ps kernel's K blocks (8192), the
    last 8 elements past its 32-element steps, x's rows strided."""
    case = Q8Case(n, 96 if n % 2 else 1024, 37, 3, "bfloat16", "float32")
    case.check(("skinny", "decode"), ("skinny", "gemm", "masked"))
    if n in (3, 8):
        Q8Case(n, 8192 + 40, 9, 2, "bfloat16", "float32", x_pad=3).check(("skinny", "decode"))


@pytest.mark.parametrize("n", [1, 8, 9, 33])
def test_plans_chosen_and_forced(half_isa, n):
    c = Q8Case(n, 72, 40, 4, "bfloat16", "float32")
    for y_path in ("decode", "split", "augmented") if n <= 8 else ("split", "augmented"):
        for u_path, da_path, dx_path in (("skinny", "gemm", "masked"), ("gemm", "skinny", "augmented")):
            c.check((u_path, y_path), (u_path, da_path, dx_path))
            assert _C.last_forward_plan() == (u_path, y_path)


def test_zero_sizes():
    Q8Case(0, 64, 16, 2, "bfloat16", "float32").check()
    CB, SCB = int8_storage(0, 5, 0)
    y, _ = ops.lora_forward(torch.ones(3, 5, dtype=torch.bfloat16), q8_handle(CB, SCB, torch.bfloat16),
                            torch.zeros(1, 5), torch.zeros(0, 1), 1.0)
    assert _tensor(y).shape == (3, 0)


def test_handle_keeps_its_arrays_and_is_kept_until_they_change():
    CB, SCB = int8_storage(16, 40, 1)
    W = bnb_int8_weight(CB, SCB, torch.bfloat16)
    h = _C.q8_weight(CB.clone(), SCB.clone())  # the only references to the copies: the handle's
    gc.collect()
    eye = torch.eye(40, dtype=torch.bfloat16)
    y, _ = ops.lora_forward(eye, h, torch.zeros(0, 40), torch.zeros(16, 0), 0.0)
    assert torch.equal(_tensor(y), W.t())
    assert q8_handle(CB, SCB, torch.bfloat16) is q8_handle(CB, SCB, torch.bfloat16)
    first = q8_handle(CB, SCB, torch.bfloat16)
    SCB.mul_(2)  # a new version of the scales: a new handle
    assert q8_handle(CB, SCB, torch.bfloat16) is not first


def test_bad_handles_and_operands():
    CB, SCB = int8_storage(16, 64, 2)
    with pytest.raises(TypeError, match="CB must be int8"):
        _C.q8_weight(CB.to(torch.uint8), SCB)
    with pytest.raises(TypeError, match="SCB must be float32"):
        _C.q8_weight(CB, SCB.double())
    with pytest.raises(ValueError, match="one scale per row"):
        _C.q8_weight(CB, SCB[:-1])
    with pytest.raises(ValueError, match="one scale per row"):
        _C.q8_weight(CB.reshape(-1), SCB)
    with pytest.raises(ValueError, match="dtype must be 'bfloat16' or 'float16'"):
        _C.q8_weight(CB, SCB, dtype="float32")
    with pytest.raises(ValueError, match="dtype must be"):
        _C.q8_weight(CB, SCB, dtype="int8")
    h = _C.q8_weight(CB, SCB)
    x = torch.randn(3, 64).bfloat16()
    with pytest.raises(TypeError, match="elements are bfloat16 but x is float16"):
        ops.lora_forward(x.half(), h, torch.zeros(2, 64), torch.zeros(16, 2), 1.0)
    with pytest.raises(ValueError, match=r"k = x.shape\[-1\] = 32"):
        ops.lora_forward(x[:, :32], h, torch.zeros(2, 32), torch.zeros(16, 2), 1.0)
    with pytest.raises(TypeError, match="float32"):  # bnb computes a float32 x in float32: not this function's
        lora_linear_8bit(x.float(), CB, SCB, None, torch.zeros(2, 64), torch.zeros(16, 2), 1.0)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_linear_8bit_gradients_and_double_backward(p):
    """The autograd function: dx, dA, dB, db from the kernels equal torch's autograd over the same math
    (W', lorafuse's dropout mask) within bf16 bounds; under create_graph the gradients are differentiable."""
    n, k, m, r = 9, 64, 24, 4
    CB, SCB = int8_storage(m, k, 3)
    W = bnb_int8_weight(CB, SCB, torch.bfloat16).float()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(n, k, generator=gen).bfloat16().requires_grad_()
    A = (torch.randn(r, k, generator=gen) * 0.3).requires_grad_()
    B = (torch.randn(m, r, generator=gen) * 0.3).requires_grad_()
    bias = torch.randn(m, generator=gen).bfloat16().requires_grad_()
    g = torch.randn(n, m, generator=gen)
    mask = torch.from_numpy(ops.dropout_mask(n, k, p, SEED)) if p else torch.ones(n, k)

    def reference(x, A, B, bias):
        return x.float() @ W.t() + bias.float() + 0.5 * ((x.float() * mask) @ A.t()) @ B.t()

    y = lora_linear_8bit(x, CB, SCB, bias, A, B, 0.5, p, SEED)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference(x, A, B, bias), rtol=2e-2, atol=2e-2 * W.abs().max().item())
    ours = torch.autograd.grad((y.float() * g).sum(), (x, A, B, bias))
    xr, Ar, Br, br = (t.detach().clone().requires_grad_() for t in (x, A, B, bias))
    theirs = torch.autograd.grad((reference(xr, Ar, Br, br) * g).sum(), (xr, Ar, Br, br))
    for name, a, b in zip(("dx", "dA", "dB", "db"), ours, theirs):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item(), msg=name)
    (gB,) = torch.autograd.grad((lora_linear_8bit(x, CB, SCB, bias, A, B, 0.5, p, SEED).float() * g).sum(), (B,),
                                create_graph=True)
    (hA,) = torch.autograd.grad(gB.square().sum(), (A,))
    (gBr,) = torch.autograd.grad((reference(xr, Ar, Br, br) * g).sum(), (Br,), create_graph=True)
    (hAr,) = torch.autograd.grad(gBr.square().sum(), (Ar,))
    torch.testing.assert_close(hA, hAr, rtol=3e-2, atol=3e-2 * hAr.abs().max().item())
    assert np.isfinite(hA.numpy()).all()
