"""lorafuse's LoRA layer (`lorafuse.FusedLinear`: PEFT's ``lora.Linear`` with a fused forward) and
the autograd function under it: gradcheck, the C path vs a float64 reference, which path a layer
takes (the fused kernels, 'c', or PEFT's own forward, 'peft') and that the 'peft' path is PEFT's code
exactly, dropout, merge/unmerge, Conv1D (fan_in_fan_out), errors, the packed-W cache.

Layers are built in pairs (`layer_pair`, also used by test_stress.py): stock PEFT's and lorafuse's on
copies of one base layer, with the same non-zero adapter weights. fp32 comparisons of the fused path
allow summation-order differences (1e-5); where PEFT's forward runs in both, results must be
bit-identical.
"""

from __future__ import annotations

import copy
import functools
import inspect
import warnings
from typing import Any, Callable, Optional

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from torch import nn  # noqa: E402
from torch.autograd import forward_ad  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import lorafuse  # noqa: E402
from lorafuse import FusedLinear  # noqa: E402
from lorafuse.autograd import lora_linear  # noqa: E402
from lorafuse.backend import backend_name, draw_seed, dropout_mask  # noqa: E402

Conv1D = transformers.pytorch_utils.Conv1D
ops = pytest.importorskip("lorafuse.ops")
PeftLinear = peft.tuners.lora.Linear
LORA = dict(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False)  # B random: the adapter counts
TOL = dict(rtol=1e-5, atol=1e-5)


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


# --------------------------------------------------------------------------- the autograd function


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
    torch.testing.assert_close(y32.double(), y64.detach(), **TOL)
    for key in ("x", "bias", "lora_a", "lora_b"):
        torch.testing.assert_close(t32[key].grad.double(), t64[key].grad, **TOL, msg=lambda m: f"d{key}: {m}")
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
    torch.testing.assert_close(t["weight"].grad.double(), t64["weight"].grad, **TOL)


def test_no_autograd_node_when_no_gradient_can_flow() -> None:
    t = _tensors(torch.float32)
    assert lora_linear(*t.values(), 1.0).grad_fn is None  # nothing requires grad
    t["lora_a"].requires_grad_(True)
    with torch.no_grad():
        assert lora_linear(*t.values(), 1.0).grad_fn is None
    assert type(lora_linear(*t.values(), 1.0).grad_fn).__name__ == "LoraLinearFunctionBackward"


# --------------------------------------------------------------------------- the layer: helpers


def layer_pair(base: nn.Module, autocast_adapter_dtype: bool = True, **lora: Any) -> tuple[PeftLinear, FusedLinear]:
    """(stock PEFT ``lora.Linear``, lorafuse `FusedLinear`) on copies of ``base``, each made by
    ``get_peft_model`` on a holder module, with the same adapter weights (LORA, updated by ``lora``)."""
    config = {**LORA, **lora}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notice that it sets fan_in_fan_out for Conv1D
        stock = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), peft.LoraConfig(**config),
                                    autocast_adapter_dtype=autocast_adapter_dtype)
        fused = lorafuse.get_peft_model(nn.Sequential(base), lorafuse.LoraConfig(**config),
                                        autocast_adapter_dtype=autocast_adapter_dtype)
    fused.load_state_dict(stock.state_dict(), strict=True)
    stock_layer, fused_layer = stock.base_model.model[0], fused.base_model.model[0]
    assert type(stock_layer) is PeftLinear and type(fused_layer) is FusedLinear
    return stock_layer, fused_layer


def _trainable(layer: nn.Module) -> list:
    """The layer's parameters that require grad (the active adapters'), in a fixed order."""
    return [p for _, p in sorted(layer.named_parameters()) if p.requires_grad]


def _loss(y: torch.Tensor) -> torch.Tensor:
    """Σ y ⊙ sin(0, 1, 2, ...): a loss whose incoming gradient is fixed and non-uniform."""
    return (y * torch.arange(y.numel(), dtype=torch.float64).sin().view_as(y).to(y.dtype)).sum()


def forward_backward(layer: nn.Module, x: torch.Tensor,
                     run: Callable[[nn.Module, torch.Tensor], torch.Tensor] = nn.Module.__call__,
                     seed: int = 0) -> tuple[list, Optional[str]]:
    """[y, dx, d(each trainable parameter) or None where unused] for `_loss`, and the path
    ``layer.backend`` reported right after the call (None for a stock layer). ``run(layer, x)``
    makes the call (default ``layer(x)``); torch is seeded with ``seed`` first."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = run(layer, x)
    backend = getattr(layer, "backend", None)
    grads = torch.autograd.grad(_loss(y), [x, *_trainable(layer)], allow_unused=True)
    return [y.detach(), *grads], backend


def assert_all_close(got: list, want: list, **tol: Any) -> None:
    """Two equally long, non-empty lists of tensors (or Nones) pairwise close to ``tol``."""
    assert len(got) == len(want) and want
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"tensor {i}: {m}")


def _base(kind: str) -> nn.Module:
    """A seeded base layer: in 24 → out 20 (Conv1D: nx=24, nf=20, weight stored (24, 20))."""
    torch.manual_seed(0)
    return {"linear": lambda: nn.Linear(24, 20), "linear-no-bias": lambda: nn.Linear(24, 20, bias=False),
            "conv1d": lambda: Conv1D(20, 24)}[kind]()


# --------------------------------------------------------------------------- the fused path


@pytest.mark.parametrize("kind", ["linear", "linear-no-bias", "conv1d"])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3), (2, 1, 3)], ids=str)
def test_fused_layer_matches_peft_and_the_float64_reference(kind: str, lead: tuple) -> None:
    """Output, dx, dA and dB of the fused layer ('c') vs stock PEFT and vs float64 autograd, for any
    leading shape; a Conv1D base gets fan_in_fan_out from PEFT and is fused in that layout."""
    stock, fused = layer_pair(_base(kind))
    assert fused.backend == "c" and fused.fan_in_fan_out == stock.fan_in_fan_out == (kind == "conv1d")
    x = torch.randn(*lead, 24)
    got, _ = forward_backward(fused, x)
    assert fused.lorafuse_path == "c" and got[0].shape == (*lead, 20)
    assert_all_close(got, forward_backward(stock, x)[0], **TOL)

    def as64(t: Optional[torch.Tensor], grad: bool = False) -> Optional[torch.Tensor]:
        return None if t is None else t.detach().double().requires_grad_(grad)

    base = fused.base_layer
    t64 = dict(x=as64(x, True), weight=as64(base.weight), bias=as64(base.bias),
               lora_a=as64(fused.lora_A["default"].weight, True), lora_b=as64(fused.lora_B["default"].weight, True))
    y64 = _reference(t64, fused.scaling["default"], 0.0, 0, fused.fan_in_fan_out)
    want64 = [y64.detach(), *torch.autograd.grad(_loss(y64), [t64["x"], t64["lora_a"], t64["lora_b"]])]
    assert_all_close([g.double() for g in got], want64, **TOL)


class _ScaledLinear(nn.Linear):
    """A Linear subclass with its own forward: must not be bypassed by the fused path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


def _plain() -> nn.Module:
    return nn.Linear(8, 5)


def _hooked(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    layer.base_layer.register_forward_hook(lambda mod, inp, out: out + 1.0)
    return layer(x)


def _hooked_lora_a(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    layer.lora_A["default"].register_forward_hook(lambda mod, inp, out: 2.0 * out)
    return layer(x)


def _hooked_dropout(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    layer.lora_dropout["default"].register_forward_pre_hook(lambda mod, inp: (inp[0] + 0.5,))
    return layer(x)


def _instance_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The base's forward replaced on the instance, as accelerate's offload hooks do (add_hook_to_module)."""
    base = layer.base_layer
    base.forward = functools.partial(lambda mod, inp: 3.0 * type(mod).forward(mod, inp), base)
    return layer(x)


def _global_hook(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A global module forward hook (every module's output through it) while the layer runs."""
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, inp, out: out * 1.5)
    try:
        return layer(x)
    finally:
        handle.remove()


def _two_active(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(7)  # the same second adapter in both layers
    if "config" in inspect.signature(layer.update_layer).parameters:  # PEFT >= 0.19 takes the config itself
        layer.update_layer("other", 2, 4, config=peft.LoraConfig(init_lora_weights=False))
    else:
        layer.update_layer("other", 2, 4, lora_dropout=0.0, init_lora_weights=False, use_rslora=False)
    layer.set_adapter(["default", "other"])
    return layer(x)


def _disabled(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    layer.enable_adapters(False)
    return layer(x)


def _merged(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    layer.merge()
    return layer(x)


def _mixed_batch(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x, adapter_names=["default", "__base__", "default"])


_CALL = nn.Module.__call__
# (base layer, how the layer is called, `backend` after the call, get_peft_model's autocast_adapter_dtype)
PEFT_PATH = {
    "subclassed-base": (lambda: _ScaledLinear(8, 5), _CALL, "peft", True),
    "hooked-base": (_plain, _hooked, "peft", True),
    "hooked-lora-A": (_plain, _hooked_lora_a, "peft", True),
    "hooked-dropout": (_plain, _hooked_dropout, "peft", True),
    "base-forward-set-on-instance": (_plain, _instance_forward, "peft", True),
    "global-module-hook": (_plain, _global_hook, "c", True),  # removed after the call: `backend` is 'c' again
    "two-active-adapters": (_plain, _two_active, "peft", True),
    "adapters-disabled": (_plain, _disabled, "peft", True),
    "merged": (_plain, _merged, "peft", True),
    "mixed-batch-adapter-names": (_plain, _mixed_batch, "c", True),  # `backend` does not see call arguments
    "float64-layer": (lambda: nn.Linear(8, 5).double(), _CALL, "peft", True),
}


@pytest.mark.parametrize("name", list(PEFT_PATH))
def test_unfused_configurations_run_peft_forward_exactly(name: str) -> None:
    """Where the kernels do not apply — hooks on a module PEFT's forward calls (base, lora_A, dropout) or global
    ones, a base layer with its own forward (a subclass, or set on the instance as accelerate does), several active
    adapters, adapters disabled or merged, PEFT's mixed batch (``adapter_names``), a float64 layer — the
    layer reports and takes PEFT's path, and its output and every gradient are stock PEFT's bit for bit."""
    make_base, run, backend, autocast_adapter_dtype = PEFT_PATH[name]
    base = make_base()
    stock, fused = layer_pair(base, autocast_adapter_dtype=autocast_adapter_dtype)
    x = torch.randn(3, 8).to(base.weight.dtype)
    got, backend_seen = forward_backward(fused, x, run)
    assert (backend_seen, fused.lorafuse_path) == (backend, "peft")
    want, _ = forward_backward(stock, x, run)
    assert_all_close(got, want, rtol=0, atol=0)


def test_torch_func_transforms_and_forward_ad_run_peft_forward_exactly() -> None:
    """Per-sample gradients (torch.func.vmap of torch.func.grad over functional_call), torch.func.jvp and
    forward-mode AD: lorafuse's autograd Functions run C kernels and so have neither a vmap rule nor a jvp; inside
    a transform or a dual level the layer takes PEFT's forward (`layers.under_transform`) and gives PEFT's results
    bit for bit, and outside it is fused again."""
    stock, fused = layer_pair(_plain())
    x, tangent = torch.randn(5, 8), torch.randn(5, 8)
    names = ["lora_A.default.weight", "lora_B.default.weight"]

    def per_sample_grads(layer: nn.Module) -> dict:
        params = {n: p.detach() for n, p in layer.named_parameters() if n in names}

        def loss(p: dict, xi: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(layer, p, (xi,)).pow(2).sum()

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x.unsqueeze(1))

    want, got = per_sample_grads(stock), per_sample_grads(fused)
    assert fused.lorafuse_path == "peft" and got[names[0]].shape == (5, 4, 8)
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)
    (_, jvp_want), (_, jvp_got) = (torch.func.jvp(layer, (x,), (tangent,)) for layer in (stock, fused))
    torch.testing.assert_close(jvp_got, jvp_want, rtol=0, atol=0)
    with forward_ad.dual_level():
        dual_want, dual_got = (forward_ad.unpack_dual(layer(forward_ad.make_dual(x, tangent))).tangent
                               for layer in (stock, fused))
        torch.testing.assert_close(dual_got, dual_want, rtol=0, atol=0)
        assert fused.lorafuse_path == "peft"
    fused(x)
    assert fused.lorafuse_path == "c"


HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want| (the scale of a half-precision rounding error)."""
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", list(HALF))
@pytest.mark.parametrize("fp32_adapters", [True, False], ids=["fp32-adapters", "base-dtype-adapters"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_half_precision_layer_is_fused_and_matches_peft(kind: str, dtype: str, fp32_adapters: bool, p: float) -> None:
    """A bf16 / fp16 base with PEFT's default fp32 adapters (``autocast_adapter_dtype=True``) or adapters of
    its own dtype runs the C kernels ('c'); output, dx, dA and dB match stock PEFT within what their
    roundings allow. Every term is bounded by its maximum: the fused layer rounds y and dx once, PEFT
    twice (x·Wᵀ + b, then the sum with the LoRA term), each rounding ≤ u_h of the result's magnitude, so
    the two differ by ≤ 3·u_h relative (u_h = 2⁻⁸ bf16, 2⁻¹¹ fp16; + 2 u_h slack for the fp32 sums seen
    through the rounded loss gradient). dA and dB with fp32 adapters are fp32 sums of the same products:
    1e-4. With dropout the masks differ (lorafuse's seeded hash, PEFT's RNG): both are checked against
    the float64 reference with lorafuse's mask instead."""
    half = HALF[dtype]
    stock, fused = layer_pair(_base(kind).to(half), autocast_adapter_dtype=fp32_adapters, lora_dropout=p)
    adt = torch.float32 if fp32_adapters else half
    assert fused.lora_A["default"].weight.dtype == adt and fused.backend == "c"
    x = torch.randn(4, 3, 24).to(half)
    got, _ = forward_backward(fused, x)
    assert fused.lorafuse_path == "c" and got[0].dtype == half and got[1].dtype == half
    assert got[2].dtype == got[3].dtype == adt
    u_h = 2.0 ** -8 if dtype == "bf16" else 2.0 ** -11
    tol = [5 * u_h, 5 * u_h] + [1e-4 if fp32_adapters else 5 * u_h] * 2
    if p == 0.0:
        want, _ = forward_backward(stock, x)
    else:  # float64 with the kernels' mask, from the fused layer's own parameters
        def as64(t: Optional[torch.Tensor], grad: bool = False) -> Optional[torch.Tensor]:
            return None if t is None else t.detach().double().requires_grad_(grad)

        base, seed = fused.base_layer, _seed_drawn_by(fused, x)
        t64 = dict(x=as64(x, True), weight=as64(base.weight), bias=as64(base.bias),
                   lora_a=as64(fused.lora_A["default"].weight, True), lora_b=as64(fused.lora_B["default"].weight, True))
        y64 = _reference(t64, fused.scaling["default"], p, seed, fused.fan_in_fan_out)
        grads = torch.autograd.grad(_loss(y64.to(half).double()), [t64["x"], t64["lora_a"], t64["lora_b"]])
        want = [y64.detach(), *grads]
    for i, (a, b, t) in enumerate(zip(got, want, tol)):
        assert _max_rel_err(a, b) <= t, f"tensor {i}: {_max_rel_err(a, b):.3g} > {t:.3g}"


def _seed_drawn_by(layer: nn.Module, x: torch.Tensor) -> int:
    """The dropout seed the layer's forward draws after torch.manual_seed(0) (forward_backward's seeding)."""
    torch.manual_seed(0)
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _cpu_autocast(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return layer(x)


@pytest.mark.parametrize("kind", ["linear", "linear-no-bias", "conv1d"])
def test_cpu_autocast_is_fused_like_peft(kind: str) -> None:
    """A float32 layer under ``torch.autocast("cpu", bfloat16)``: PEFT computes base and adapters in bf16
    (autocast casts every linear); the fused layer casts the operands the same way, runs the bf16 kernels
    ('c') and returns bf16, and autograd casts dA, dB back to the fp32 parameters."""
    stock, fused = layer_pair(_base(kind))
    x = torch.randn(4, 3, 24)
    got, _ = forward_backward(fused, x, _cpu_autocast)
    want, _ = forward_backward(stock, x, _cpu_autocast)
    assert fused.lorafuse_path == "c" and got[0].dtype == want[0].dtype == torch.bfloat16
    assert [t.dtype for t in got[1:]] == [t.dtype for t in want[1:]] == [torch.float32] * 3
    for i, (a, b) in enumerate(zip(got, want)):
        assert _max_rel_err(a, b) <= 5 * 2.0 ** -8, f"tensor {i}: {_max_rel_err(a, b):.3g}"


def test_wrong_input_width_raises_like_peft() -> None:
    stock, fused = layer_pair(nn.Linear(8, 5))
    errors = []
    for layer in (stock, fused):
        with pytest.raises(Exception) as info:
            layer(torch.randn(2, 9))
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]
    assert fused.lorafuse_path == "peft"


def test_input_dtype_mismatch_and_foreign_adapters_raise_type_errors() -> None:
    """A float64 input to a float32 layer names both dtypes; an adapter off the input's device names A."""
    _, fused = layer_pair(nn.Linear(4, 3))
    with pytest.raises(TypeError, match=r"input dtype torch\.float64 does not match .*torch\.float32"):
        fused(torch.randn(2, 4, dtype=torch.float64))
    fused.lora_A["default"].to("meta")
    with pytest.raises(TypeError, match="A .* cannot be read as a CPU array"):
        fused(torch.randn(2, 4))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_and_unmerge_match_peft(kind: str) -> None:
    """PEFT's merge on both layers gives the same W; merged, PEFT's forward runs and equals the
    unmerged fused output; unmerged, W is back and the fused path runs again."""
    stock, fused = layer_pair(_base(kind))
    x = torch.randn(5, 24)
    w0 = fused.base_layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = fused(x)
        for layer in (stock, fused):
            layer.merge()
        torch.testing.assert_close(fused.base_layer.weight, stock.base_layer.weight, rtol=0, atol=0)
        torch.testing.assert_close(fused(x), unmerged, **TOL)
        assert fused.merged and fused.lorafuse_path == "peft"
        for layer in (stock, fused):
            layer.unmerge()
        torch.testing.assert_close(fused.base_layer.weight, w0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused(x), stock(x), **TOL)
        assert not fused.merged and fused.lorafuse_path == "c"


# --------------------------------------------------------------------------- dropout


def test_dropout_is_seeded_and_off_in_eval_no_grad_and_inference_mode() -> None:
    stock, fused = layer_pair(nn.Linear(12, 6), lora_dropout=0.5)
    x = torch.randn(4, 12)
    stock.eval()
    fused.eval()
    expected = fused(x)
    torch.testing.assert_close(expected, stock(x), **TOL)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), expected, rtol=0, atol=0)
    fused.train()
    runs = {}
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.setdefault(seed, []).append(fused(x))
        assert fused.lorafuse_path == "c"
    torch.testing.assert_close(runs[3][0], runs[3][1], rtol=0, atol=0)  # the seed comes from torch's RNG
    assert not torch.allclose(runs[3][0], runs[4][0])
    assert not torch.allclose(runs[3][0], expected)  # dropout acts in training


def test_dropout_statistics_match_peft() -> None:
    """With A = B = I and s = 1 the adapter term is drop(x) itself: the fused layer's mask keeps each
    element with probability 1 - p, scales kept ones by 1/(1 - p) and draws each row anew, as PEFT's
    nn.Dropout does. n·k = 16,384 Bernoulli draws per layer: bounds of 6 standard deviations."""
    p, n, k = 0.3, 512, 32
    stock, fused = layer_pair(nn.Linear(k, k), r=k, lora_alpha=k, lora_dropout=p)
    x = torch.rand(n, k) + 0.5  # no zeros: a dropped element is exactly 0
    fractions = []
    for layer in (stock, fused):
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(torch.eye(k))
            layer.lora_B["default"].weight.copy_(torch.eye(k))
            dropped = layer(x) - layer.base_layer(x)
        kept = dropped.abs() > 1e-3
        torch.testing.assert_close(dropped[kept], x[kept] / (1 - p), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dropped[~kept], torch.zeros_like(dropped[~kept]), rtol=0, atol=1e-5)
        same_as_next_row = (kept[1:] == kept[:-1]).double().mean().item()
        fractions.append((1 - kept.double().mean().item(), same_as_next_row))
    assert fused.lorafuse_path == "c"
    sd = (p * (1 - p) / (n * k)) ** 0.5
    agree = p * p + (1 - p) ** 2  # two independent rows agree at a position
    sd_agree = (agree * (1 - agree) / ((n - 1) * k)) ** 0.5
    for drop_fraction, row_agreement in fractions:
        assert abs(drop_fraction - p) < 6 * sd, fractions
        assert abs(row_agreement - agree) < 6 * sd_agree, fractions


def test_dropout_gradients_use_the_forward_mask() -> None:
    _, layer = layer_pair(nn.Linear(16, 8), lora_dropout=0.3)
    x = torch.randn(5, 16, requires_grad=True)
    torch.manual_seed(11)
    layer(x).square().sum().backward()
    assert layer.lorafuse_path == "c"
    torch.manual_seed(11)
    seed = draw_seed()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    # float64 reference: the fp32 kernels and an fp32 torch reference sum in different orders,
    # and a few dA elements cancel to ~1e-3, so fp32-vs-fp32 at atol 1e-5 would test round-off
    ref = {"x": x.detach().double().requires_grad_(True), "a": a.detach().double().requires_grad_(True)}
    xd = ref["x"] * dropout_mask(5, 16, 0.3, seed, dtype=torch.float64, device=x.device)
    base = nn.functional.linear(ref["x"], layer.base_layer.weight.double(), layer.base_layer.bias.double())
    y = base + layer.scaling["default"] * (xd @ ref["a"].t()) @ b.detach().double().t()
    y.square().sum().backward()
    torch.testing.assert_close(x.grad.double(), ref["x"].grad, **TOL)
    torch.testing.assert_close(a.grad.double(), ref["a"].grad, **TOL)


def test_gradient_checkpointing_with_dropout_gives_the_same_gradients() -> None:
    _, layer = layer_pair(nn.Linear(16, 16), lora_dropout=0.2)
    x = torch.randn(6, 16)

    def checkpointed(module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        return checkpoint(module, inp, use_reentrant=False)

    plain, _ = forward_backward(layer, x, seed=21)
    assert_all_close(forward_backward(layer, x, checkpointed, seed=21)[0], plain, rtol=0, atol=0)
    assert layer.lorafuse_path == "c"


# --------------------------------------------------------------------------- packed-W cache


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_packed_weight_cache_is_bit_identical_and_follows_w(kind: str) -> None:
    """With the cache on: the same output and gradients bit for bit, W's panels kept; W changed in
    place (version bump) is repacked — still stock PEFT's result; PEFT's merge drops the panels."""
    stock, fused = layer_pair(_base(kind))
    x = torch.randn(2, 3, 24)
    plain, _ = forward_backward(fused, x)
    assert lorafuse.cache_packed_weights(nn.Sequential(fused)) == 1 and fused.packed_weight_bytes == 0
    assert_all_close(forward_backward(fused, x)[0], plain, rtol=0, atol=0)
    kept = fused.packed_weight_bytes
    assert kept > 0 and fused.lorafuse_path == "c"
    with torch.no_grad():
        for layer in (stock, fused):
            layer.base_layer.weight.mul_(-0.5)
    assert_all_close(forward_backward(fused, x)[0], forward_backward(stock, x)[0], **TOL)
    assert fused.packed_weight_bytes == kept
    fused.merge()
    assert fused.packed_weight_bytes == 0
    fused.set_packed_weight_cache(False)
    assert fused.packed_weight_bytes == 0


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cuda_layer_matches_the_float64_reference(p: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # full float32 on both paths
    _, layer = layer_pair(nn.Linear(64, 48), lora_dropout=p)
    layer.cuda()
    assert layer.backend == "cuda"
    x = torch.randn(5, 7, 64, device="cuda", requires_grad=True)
    torch.manual_seed(2)
    out = layer(x)
    assert layer.lorafuse_path == "cuda"
    out.square().sum().backward()
    torch.manual_seed(2)
    seed = draw_seed() if p else 0
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
