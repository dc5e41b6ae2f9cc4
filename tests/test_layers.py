"""LoraLinear and the autograd function: gradcheck, C path vs torch path, dropout, modes, errors."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from lorafuse import autograd as lf_autograd  # noqa: E402
from lorafuse.autograd import backend_name, dropout_mask, lora_linear  # noqa: E402
from lorafuse.config import LoraConfig  # noqa: E402
from lorafuse.layers import LoraLinear  # noqa: E402
from lorafuse.model import get_peft_model  # noqa: E402

Conv1D = transformers.pytorch_utils.Conv1D
ops = pytest.importorskip("lorafuse.ops")


def _tensors(dtype: torch.dtype, fifo: bool = False, bias: bool = True, shape: tuple = (2, 5), k: int = 6,
             m: int = 7, r: int = 3, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)

    return dict(x=rnd(*shape, k), weight=rnd(k, m) if fifo else rnd(m, k), bias=rnd(m) if bias else None,
                lora_a=rnd(r, k), lora_b=rnd(m, r))


def _reference(t: dict, scale: float, p: float, seed: int, fifo: bool) -> torch.Tensor:
    """Plain torch autograd graph of y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ, mask from dropout_mask."""
    x = t["x"]
    xd = x
    if p:
        k = x.shape[-1]
        xd = x * dropout_mask(x.numel() // k, k, p, seed, dtype=x.dtype, device=x.device).view_as(x)
    w = t["weight"] if fifo else t["weight"].t()
    y = x @ w + scale * (xd @ t["lora_a"].t()) @ t["lora_b"].t()
    return y if t["bias"] is None else y + t["bias"]


@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck_float64_torch_path(fifo: bool, p: float, bias: bool) -> None:
    t = _tensors(torch.float64, fifo, bias)
    for v in t.values():
        if v is not None:
            v.requires_grad_(True)
    assert backend_name(t["x"], t["weight"]) == "torch"

    def fn(x, w, b, a, bb):  # noqa: ANN001, ANN202
        return lora_linear(x, w, b, a, bb, 0.7, p, 1234, fifo)

    assert torch.autograd.gradcheck(fn, (t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"]))
    torch.testing.assert_close(fn(*t.values()), _reference(t, 0.7, p, 1234, fifo))


@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_c_path_matches_float64_reference(fifo: bool, p: float) -> None:
    t32 = _tensors(torch.float32, fifo, shape=(3, 11), k=40, m=24, r=5)
    t64 = {k: (None if v is None else v.double()) for k, v in t32.items()}
    assert backend_name(*[v for v in t32.values() if v is not None]) == "c"
    for t in (t32, t64):
        for key in ("x", "bias", "lora_a", "lora_b"):
            t[key].requires_grad_(True)
    y32 = lora_linear(*t32.values(), 0.5, p, 77, fifo)
    y64 = _reference(t64, 0.5, p, 77, fifo)
    g = torch.randn(y64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y32.backward(g.float())
    y64.backward(g)
    torch.testing.assert_close(y32.double(), y64.detach(), rtol=1e-5, atol=1e-5)
    for key in ("x", "bias", "lora_a", "lora_b"):
        torch.testing.assert_close(t32[key].grad.double(), t64[key].grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"d{key}: {m}")
    assert t32["weight"].grad is None


def test_only_x_u_and_seed_are_saved_no_dropped_input() -> None:
    t = _tensors(torch.float32, shape=(4, 9), k=32, m=16, r=2)
    t["lora_a"].requires_grad_(True)
    y = lora_linear(*t.values(), 1.0, 0.5, 5, False)
    saved = y.grad_fn.saved_tensors
    sizes = sorted(s.numel() for s in saved)
    expected = sorted([t["x"].numel(), 36 * 2, t["weight"].numel(), t["lora_a"].numel(), t["lora_b"].numel()])
    assert sizes == expected  # x, u (n×r), W, A, B — no second n×k tensor
    assert any(s.data_ptr() == t["x"].data_ptr() for s in saved)  # x itself, not a copy


def test_zero_copy_handoff_to_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    t = _tensors(torch.float32, fifo=True, shape=(8,), k=16, m=12, r=4)
    seen = {}
    original = ops.lora_forward

    def spy(x, W, A, B, scale, bias=None, **kw):  # noqa: ANN001, ANN202
        seen.update(x=np.shares_memory(x, t["x"].numpy()), W=np.shares_memory(W, t["weight"].numpy()))
        seen["y"], seen["u"] = original(x, W, A, B, scale, bias, **kw)
        return seen["y"], seen["u"]

    monkeypatch.setattr(ops, "lora_forward", spy)
    y = lora_linear(*t.values(), 1.0, 0.0, 0, True)
    assert seen["x"] and seen["W"]  # inputs read in place
    assert np.shares_memory(y.detach().numpy(), seen["y"])  # the kernel's output is y, not a copy
    assert y.shape == (8, 12)


def test_need_dx_false_when_input_needs_no_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    t = _tensors(torch.float32)
    t["lora_b"].requires_grad_(True)
    flags = []
    original = ops.lora_backward

    def spy(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        flags.append(kw["need_dx"])
        return original(*a, **kw)

    monkeypatch.setattr(ops, "lora_backward", spy)
    lora_linear(*t.values(), 1.0).sum().backward()
    assert flags == [False] and t["x"].grad is None and t["lora_b"].grad is not None


def test_weight_gradient_when_base_is_unfrozen() -> None:
    t = _tensors(torch.float32, shape=(5,))
    t64 = {k: v.double().requires_grad_(True) for k, v in t.items()}
    for v in t.values():
        v.requires_grad_(True)
    lora_linear(*t.values(), 0.3).square().sum().backward()
    _reference(t64, 0.3, 0.0, 0, False).square().sum().backward()
    torch.testing.assert_close(t["weight"].grad.double(), t64["weight"].grad, rtol=1e-5, atol=1e-5)


def _layer(base: nn.Module, p: float = 0.0, r: int = 4) -> LoraLinear:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = LoraLinear(base, "default", r=r, lora_alpha=8, lora_dropout=p)
    nn.init.normal_(layer.lora_B["default"].weight)
    return layer


def test_seed_document_example_512x512_rank_8() -> None:
    model = get_peft_model(nn.Sequential(nn.Linear(512, 512, bias=False)), LoraConfig(r=8, target_modules=["0"]))
    trainable, total = model.get_nb_trainable_parameters()
    assert (trainable, total - trainable) == (8_192, 262_144)
    assert 1 - trainable / (total - trainable) == pytest.approx(0.96875)  # the "−97%"


def test_conv1d_layer_matches_base_plus_lora_and_sets_fan_in_fan_out() -> None:
    torch.manual_seed(0)
    base = Conv1D(10, 6)  # nf=out=10, nx=in=6, weight (6, 10)
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        layer = LoraLinear(base, "default", r=2, lora_alpha=4)
    nn.init.normal_(layer.lora_B["default"].weight)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (6, 10)
    x = torch.randn(3, 4, 6)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer(x), base(x) + 2.0 * x @ a.t() @ b.t())


def test_any_leading_shape_and_repr() -> None:
    layer = _layer(nn.Linear(8, 5))
    for shape in [(8,), (3, 8), (2, 3, 8), (2, 1, 3, 8)]:
        x = torch.randn(*shape)
        y = layer(x)
        assert y.shape == shape[:-1] + (5,)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(y, layer.base_layer(x) + 2.0 * x @ a.t() @ b.t())
    text = repr(layer)
    assert text.startswith("lora.") and "r=4" in text and "lora_alpha=8" in text and "backend='c'" in text
    assert "backend='torch'" in repr(_layer(nn.Linear(8, 5).double()))


def test_no_grad_inference_mode_and_eval_disable_dropout() -> None:
    layer = _layer(nn.Linear(12, 6), p=0.5)
    x = torch.randn(4, 12)
    layer.eval()
    expected = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected)
    layer.train()
    torch.manual_seed(3)
    train_a = layer(x)
    torch.manual_seed(3)
    train_b = layer(x)
    torch.testing.assert_close(train_a, train_b)  # seeded from torch's RNG: reproducible
    assert not torch.allclose(train_a, expected)  # dropout acts in training


def test_dropout_gradients_use_the_forward_mask() -> None:
    layer = _layer(nn.Linear(16, 8), p=0.3)
    x = torch.randn(5, 16, requires_grad=True)
    torch.manual_seed(11)
    layer(x).square().sum().backward()
    torch.manual_seed(11)
    seed = lf_autograd.draw_seed()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    # float64 reference: the fp32 kernels and an fp32 torch reference sum in different orders,
    # and a few dA elements cancel to ~1e-3, so fp32-vs-fp32 at atol 1e-5 would test round-off
    ref = {"x": x.detach().double().requires_grad_(True), "a": a.detach().double().requires_grad_(True)}
    xd = ref["x"] * dropout_mask(5, 16, 0.3, seed, dtype=torch.float64, device=x.device)
    base = nn.functional.linear(ref["x"], layer.base_layer.weight.double(), layer.base_layer.bias.double())
    y = base + layer.scaling["default"] * (xd @ ref["a"].t()) @ b.detach().double().t()
    y.square().sum().backward()
    torch.testing.assert_close(x.grad.double(), ref["x"].grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad.double(), ref["a"].grad, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_with_dropout_gives_the_same_gradients() -> None:
    layer = _layer(nn.Linear(16, 16), p=0.2)
    x = torch.randn(6, 16, requires_grad=True)

    def grads(use_checkpoint: bool) -> list:
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(21)
        out = checkpoint(layer, x, use_reentrant=False) if use_checkpoint else layer(x)
        out.square().sum().backward()
        return [x.grad.clone(), layer.lora_A["default"].weight.grad.clone()]

    for plain, ckpt in zip(grads(False), grads(True)):
        torch.testing.assert_close(plain, ckpt)


def test_merge_unmerge_roundtrip_and_merging_twice_warns() -> None:
    layer = _layer(nn.Linear(9, 7))
    layer.eval()
    x = torch.randn(3, 9)
    expected = layer(x)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight - w0, layer.get_delta_weight("default"))
    with pytest.warns(UserWarning, match="All adapters are already merged"):
        layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)  # not counted twice
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=1e-6, atol=1e-6)
    with pytest.warns(UserWarning, match="Already unmerged"):
        layer.unmerge()


def test_safe_merge_rejects_non_finite_weights() -> None:
    layer = _layer(nn.Linear(4, 4))
    with torch.no_grad():
        layer.lora_A["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    assert not layer.merged and torch.isfinite(layer.base_layer.weight).all()


def test_bf16_base_uses_float32_adapters_like_peft() -> None:
    base = nn.Linear(8, 4).to(torch.bfloat16)
    layer = _layer(base)
    assert layer.lora_A["default"].weight.dtype == torch.float32 and layer.backend == "torch"
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = (base(x) + (x.float() @ a.t() @ b.t()) * 2.0).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)


def test_half_precision_adapters_without_autocast() -> None:
    model = get_peft_model(nn.Sequential(nn.Linear(8, 4)).to(torch.bfloat16), LoraConfig(target_modules=["0"]),
                           autocast_adapter_dtype=False)
    layer = model.base_model.model[0]
    assert layer.lora_A["default"].weight.dtype == torch.bfloat16
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)
    out = model(x)
    assert out.dtype == torch.bfloat16
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x.float().to(torch.bfloat16)).float() + (x.float() @ a.float().t() @ b.float().t())
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    out.sum().backward()
    assert a.grad.dtype == torch.bfloat16 and x.grad is not None


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="not supported"):
        LoraLinear(nn.Embedding(10, 4), "default", r=2, lora_alpha=2)
    quantized = nn.Linear(4, 4)
    quantized.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ValueError, match="quantized base layers are not supported"):
        LoraLinear(quantized, "default", r=2, lora_alpha=2)
    with pytest.raises(ValueError, match="positive integer"):
        LoraLinear(nn.Linear(4, 4), "default", r=0, lora_alpha=2)
    layer = _layer(nn.Linear(4, 3))
    with pytest.raises(TypeError, match="float64 does not match .*float32"):
        layer(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected input \(\.\.\., 4\)"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="already exists"):
        layer.update_layer("default", 2, 2, 0.0)
    layer.lora_A["default"].to("meta")  # an adapter off the input's device: named, never read
    with pytest.raises(TypeError, match="A .* cannot be read as a CPU array"):
        layer(torch.randn(2, 4))


def test_rslora_scaling() -> None:
    layer = LoraLinear(nn.Linear(4, 4), "default", r=16, lora_alpha=8, use_rslora=True)
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(16))


class _ScaledLinear(nn.Linear):
    """A Linear subclass with its own forward: must not be bypassed by the fused path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


def test_subclassed_or_hooked_base_layers_keep_their_own_forward() -> None:
    for base in (_ScaledLinear(6, 3), nn.Linear(6, 3)):
        if type(base) is nn.Linear:
            base.register_forward_hook(lambda mod, inp, out: out + 1.0)
        layer = _layer(base)
        assert layer.backend == "torch"
        x = torch.randn(4, 6)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(layer(x), base(x) + 2.0 * x @ a.t() @ b.t())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cuda_layer_matches_the_float64_reference(p: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # full float32 on both paths
    layer = _layer(nn.Linear(64, 48), p=p).cuda()
    assert layer.backend in ("cuda", "torch")
    x = torch.randn(5, 7, 64, device="cuda", requires_grad=True)
    torch.manual_seed(2)
    out = layer(x)
    out.square().sum().backward()
    torch.manual_seed(2)
    seed = lf_autograd.draw_seed() if p else 0
    t64 = {"x": x.detach().double().cpu().requires_grad_(True),
           "weight": layer.base_layer.weight.detach().double().cpu(),
           "bias": layer.base_layer.bias.detach().double().cpu(),
           "lora_a": layer.lora_A["default"].weight.detach().double().cpu().requires_grad_(True),
           "lora_b": layer.lora_B["default"].weight.detach().double().cpu()}
    ref = _reference(t64, layer.scaling["default"], p, seed, False)
    ref.square().sum().backward()
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.detach().double().cpu(), ref.detach(), **tol)
    torch.testing.assert_close(x.grad.double().cpu(), t64["x"].grad, **tol)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad.double().cpu(), t64["lora_a"].grad, **tol)


def test_no_autograd_node_when_no_gradient_can_flow() -> None:
    t = _tensors(torch.float32)
    assert lora_linear(*t.values(), 1.0).grad_fn is None  # nothing requires grad
    t["lora_a"].requires_grad_(True)
    with torch.no_grad():
        assert lora_linear(*t.values(), 1.0).grad_fn is None
    assert type(lora_linear(*t.values(), 1.0).grad_fn).__name__ == "LoraLinearFunctionBackward"
