"""DoRA (``use_dora=True``) on the fused kernels (`lorafuse.dora`) against PEFT's own DoRA. The model-level
parity — logits, loss, every gradient with the magnitude vectors, eval with dropout configured, merge and
merge_and_unload — is test_peft_parity's tests in their DoRA cases; here: dropout in training (PEFT given
lorafuse's masks), double backward, files both ways, the row norms against the
explicit m×k matrix, the fused function's backward in float64, the kept norms' invalidation, and which DoRA
operands go to the CUDA path (tests/test_cuda.py runs that path on a GPU)."""
from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import lorafuse  # noqa: E402
from lorafuse.backend import draw_seed, dropout_mask  # noqa: E402
from lorafuse.dora import DoraLinearFunction, RowNorms, dora_reference, kept_row_norms, row_norms  # noqa: E402
from test_peft_parity import CASES, _assert_match, _fused, _inputs, _pair, _paths, _penalised_grads, _run  # noqa: E402


class SeededDropout(torch.nn.Module):
    """A stand-in for PEFT's lora_dropout that applies lorafuse's mask: the seed drawn from torch's RNG as the
    fused layer draws it (`backend.draw_seed`), the mask of `backend.dropout_mask` — so PEFT's DoRA sees the very
    x̃ of the fused path."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        x2 = x.reshape(-1, x.shape[-1])
        mask = dropout_mask(*x2.shape, self.p, draw_seed(), dtype=x.dtype, device=x.device)
        return (x2 * mask).view(x.shape)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_dropout_in_training_matches_peft_dora_with_the_same_mask(name: str) -> None:
    """Dropout active: PEFT's DoRA computes the base term twice (on x and on x̃); the fused layer runs the
    LoRA kernel on x̃ and one GEMM on x − x̃. With PEFT given lorafuse's masks, logits, loss and every gradient
    (magnitudes included) match."""
    theirs, ours = _pair(name, use_dora=True, lora_dropout=0.25)
    for module in theirs.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            for key, drop in list(module.lora_dropout.items()):
                module.lora_dropout[key] = SeededDropout(drop.p)
    theirs.train()
    ours.train()
    inputs = _inputs(CASES[name])
    torch.manual_seed(9)
    want = _run(theirs, inputs)
    torch.manual_seed(9)
    got = _run(ours, inputs)
    assert _paths(ours) == {"c"}
    _assert_match(got, want)
    with torch.no_grad():  # the masks mattered: without dropout the loss is another
        assert not torch.allclose(ours.eval()(**inputs).loss, got["loss"])


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_double_backward_matches_peft_dora(name: str) -> None:
    theirs, ours = _pair(name, use_dora=True)
    inputs = _inputs(CASES[name])
    want, got = _penalised_grads(theirs, inputs), _penalised_grads(ours, inputs)
    assert _paths(ours) == {"c"}
    _assert_match(got, want)


def test_files_cross_both_ways(tmp_path) -> None:
    theirs, ours = _pair("gpt2", use_dora=True)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    base = CASES["gpt2"].build
    torch.manual_seed(0)
    fresh = base()
    loaded_by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path / "ours")
    loaded_by_us = lorafuse.PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path / "theirs")
    for loaded in (loaded_by_peft, loaded_by_us):
        sd = {k: v for k, v in loaded.state_dict().items() if "lora_magnitude_vector" in k}
        assert sd
        _assert_match(sd, {k: v for k, v in theirs.state_dict().items() if k in sd}, tol=0)
    inputs = _inputs(CASES["gpt2"])
    loaded_by_us.eval()
    theirs.eval()
    with torch.no_grad():
        _assert_match({"logits": loaded_by_us(**inputs).logits}, {"logits": theirs(**inputs).logits})
    assert _paths(loaded_by_us) == {"c"}


@pytest.mark.parametrize("fifo", [False, True])
def test_row_norms_equal_the_explicit_matrix(fifo: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    m, k, r, s = 37, 29, 5, 1.7
    W = torch.randn((k, m) if fifo else (m, k), generator=gen, dtype=torch.float64)
    A, B = torch.randn(r, k, generator=gen, dtype=torch.float64), torch.randn(m, r, generator=gen, dtype=torch.float64)
    w_mk = W.t() if fifo else W
    want = torch.linalg.norm(w_mk + s * (B @ A), dim=1)
    norms = RowNorms()
    torch.testing.assert_close(row_norms(W, A, B, s, fifo, norms), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(row_norms(W, A, B, s, fifo, norms), want, rtol=1e-12, atol=0)  # kept ‖W_j‖²
    with torch.no_grad():
        W.mul_(2.0)  # an in-place change bumps the version counter: ‖W_j‖² is recomputed
    want = torch.linalg.norm((W.t() if fifo else W) + s * (B @ A), dim=1)
    torch.testing.assert_close(row_norms(W, A, B, s, fifo, norms), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("fifo, bias, p", [(False, True, 0.0), (True, False, 0.0), (False, True, 0.3),
                                           (True, True, 0.3)])
def test_fused_function_gradients_float64(fifo: bool, bias: bool, p: float) -> None:
    """The hand-written backward (g' = g⊙c, dμ = Σ g⊙z / ν), on the torch math (kern=None: float64): gradcheck
    for x, bias and μ (ν does not depend on them); for W, A and B — where ν, detached by design, does — equal
    to autograd through `dora_reference`, which detaches ν the same way."""
    gen = torch.Generator().manual_seed(5)
    n, k, m, r, s = 6, 7, 5, 3, 0.8

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    x, W, A, B, mag = rnd(n, k), rnd(*((k, m) if fifo else (m, k))), rnd(r, k), rnd(m, r), rnd(m)
    b = rnd(m) if bias else None

    def fused(x, W, b, A, B, mag):
        return DoraLinearFunction.apply(x, W, b, A, B, mag, s, p, 17, fifo, None, None, None)

    frozen = [t.detach() for t in (W, A, B)]
    assert torch.autograd.gradcheck(lambda x, b, mag: fused(x, frozen[0], b, frozen[1], frozen[2], mag), (x, b, mag))
    g = torch.randn(n, m, generator=gen, dtype=torch.float64)
    inputs = [t for t in (x, W, b, A, B, mag) if t is not None]
    got = torch.autograd.grad(fused(x, W, b, A, B, mag), inputs, g)
    mask = dropout_mask(n, k, p, 17, dtype=torch.float64, device=x.device) if p else None
    want = torch.autograd.grad(dora_reference(x, W, b, A, B, mag, s, fifo, mask), inputs, g)
    for got_t, want_t in zip(got, want):
        torch.testing.assert_close(got_t, want_t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fifo, p", [(False, 0.0), (True, 0.3)])
def test_float32_backward_scales_g_in_one_kernel_pass(monkeypatch, fifo: bool, p: float) -> None:
    """On the C kernels the float32 layer forms g' = g ⊙ c and Σ g ⊙ z̃ in one pass (`ops.dora_grad_scale`, once per
    backward), and every gradient — μ's from that pass — matches `dora_reference` in float64."""
    from lorafuse import ops

    calls = []
    real = ops.dora_grad_scale
    monkeypatch.setattr(ops, "dora_grad_scale", lambda *a: calls.append(a[2] is not None) or real(*a))
    gen = torch.Generator().manual_seed(9)
    n, k, m, r, s = 33, 40, 25, 4, 0.8
    x, W, A, B = (torch.randn(*shape, generator=gen) for shape in ((n, k), (k, m) if fifo else (m, k), (r, k), (m, r)))
    mag, b, g = torch.rand(m, generator=gen) + 2.0, torch.randn(m, generator=gen), torch.randn(n, m, generator=gen)
    leaves = [t.requires_grad_(True) for t in (x, b, A, B, mag)]
    y = DoraLinearFunction.apply(x, W, b, A, B, mag, s, p, 17, fifo, None, None, ops)
    got = torch.autograd.grad(y, leaves, g)
    assert calls == [True]
    wide = [t.detach().double().requires_grad_(True) for t in (x, b, A, B, mag)]
    mask = dropout_mask(n, k, p, 17, dtype=torch.float64, device=x.device) if p else None
    want = torch.autograd.grad(dora_reference(wide[0], W.double(), wide[1], wide[2], wide[3], wide[4], s, fifo, mask),
                               wide, g.double())
    for got_t, want_t in zip(got, want):
        torch.testing.assert_close(got_t.double(), want_t, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("kind, fifo, bias, p", [("dense", False, True, 0.0), ("dense", True, False, 0.0),
                                                 ("dense", False, True, 0.3), ("dense", True, True, 0.3),
                                                 ("nf4", False, True, 0.0), ("nf4", False, False, 0.3)])
def test_half_base_fused_function_against_float64(dtype: str, kind: str, fifo: bool, bias: bool, p: float) -> None:
    """`DoraHalfFunction` (a half W — dense, or 4-bit NF4 (`Quant4HalfW`, QLoRA; never stored transposed) —, fp32
    adapters and magnitude) against float64 of PEFT's formula on the same values (the 4-bit W dequantized) and
    the same dropout mask (`dora_reference`): y and every gradient within a few roundings of the half dtype (u_h)
    of each tensor's largest value; ν itself in float32, exact but for float32 sums; the no-grad call gives the
    grad call's y; under create_graph the gradients are differentiable (a gradient penalty matches float64's)."""
    from lorafuse.dora import DoraHalfFunction, dora_linear_half, half_row_norms
    from lorafuse.half_weight import DenseHalfW, Quant4HalfW

    half = getattr(torch, dtype)
    u_h = 2.0 ** -8 if dtype == "bfloat16" else 2.0 ** -11
    gen = torch.Generator().manual_seed(9)
    n, k, m, r, s = 7, 40, 33, 4, 0.75
    W = torch.randn((k, m) if fifo else (m, k), generator=gen).to(half)
    if kind == "nf4":  # W's values: its 4-bit codes dequantized (blocks of 64 straddle rows of 40)
        param = lorafuse.quant.Weight4bit(*lorafuse.quant.quantize_weight(W, "nf4"))
        W, base = lorafuse.quant.dequantize(param), Quant4HalfW(param, half)
    else:
        base = DenseHalfW(W, fifo)
    x = torch.randn(n, k, generator=gen).to(half).requires_grad_()
    A = (torch.randn(r, k, generator=gen) * 0.3).requires_grad_()
    B = (torch.randn(m, r, generator=gen) * 0.3).requires_grad_()
    mag = (torch.rand(m, generator=gen) + 0.5).requires_grad_()
    b = torch.randn(m, generator=gen).to(half).requires_grad_() if bias else None
    g = torch.randn(n, m, generator=gen).to(half)
    kern = lorafuse.backend.cpu_kernels()
    w64 = W.double()
    nu = row_norms(W, A, B, s, fifo)
    assert nu.dtype == torch.float32
    want_nu = torch.linalg.norm((w64.t() if fifo else w64) + s * (B.double() @ A.double()), dim=1)
    torch.testing.assert_close(nu.double(), want_nu, rtol=1e-5, atol=0)
    torch.testing.assert_close(half_row_norms(base, A, B, s).double(), want_nu, rtol=1e-5, atol=0)
    seed = 23
    mask = dropout_mask(n, k, p, seed, dtype=torch.float64, device=x.device) if p else None
    y = DoraHalfFunction.apply(x, base, b, A, B, mag, s, p, seed, None, kern)
    assert y.dtype == half
    with torch.no_grad():
        assert torch.equal(dora_linear_half(x, base, b, A, B, mag, s, p, seed, None, kern), y)
    inputs = [t for t in (x, b, A, B, mag) if t is not None]
    got = torch.autograd.grad(y, inputs, g)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    it = iter(ref_in)
    x64, b64 = next(it), next(it) if bias else None
    A64, B64, mag64 = next(it), next(it), next(it)
    y64 = dora_reference(x64, w64, b64, A64, B64, mag64, s, fifo, mask)
    want = torch.autograd.grad(y64, ref_in, g.double())
    for name, a, ref in zip(("y",) + tuple(f"d{i}" for i in range(len(inputs))), (y, *got), (y64, *want)):
        tol = 8 * u_h * ref.abs().max().item()
        torch.testing.assert_close(a.double(), ref.detach(), rtol=0, atol=tol, msg=name)
    # gradient penalty ∂/∂A of ‖∂L/∂B‖²: differentiable through create_graph
    (gB,) = torch.autograd.grad((DoraHalfFunction.apply(x, base, b, A, B, mag, s, p, seed, None, kern).float()
                                 * g.float()).sum(), (B,), create_graph=True)
    (hA,) = torch.autograd.grad(gB.square().sum(), (A,))
    (gB64,) = torch.autograd.grad((dora_reference(x64, w64, b64, A64, B64, mag64, s, fifo, mask)
                                   * g.double()).sum(), (B64,), create_graph=True)
    (hA64,) = torch.autograd.grad(gB64.square().sum(), (A64,))
    torch.testing.assert_close(hA.double(), hA64, rtol=0, atol=16 * u_h * hA64.abs().max().item())


def test_half_base_dora_with_dropout_matches_peft_given_the_same_mask() -> None:
    """A bf16 Llama with DoRA and dropout 0.1 in training: every layer fused ('c'), and PEFT's DoRA given
    lorafuse's masks (`SeededDropout`) computes the same loss and gradients within bf16's roundings (measured:
    ≤ 1.5 % of each tensor's largest value; without dropout the same model's gradients move by up to 200 %)."""
    theirs, ours = _pair("llama", torch.bfloat16, use_dora=True, lora_dropout=0.1)
    for model in (theirs, ours):
        model.train()
    for module in theirs.modules():
        drop = getattr(module, "lora_dropout", None)
        if drop is not None:
            for name in list(drop.keys()):
                drop[name] = SeededDropout(0.1)
    inputs = _inputs(CASES["llama"])
    want, got = _run(theirs, inputs), _run(ours, inputs)  # _run seeds torch: the same seeds drawn, the same masks
    assert _paths(ours) == {"c"}
    for key, ref in want.items():
        err = float((got[key].float() - ref.float()).abs().max() / ref.float().abs().max())
        assert err <= 4e-2, (key, err)


def test_merge_drops_the_kept_norms_and_train_keeps_them() -> None:
    """merge/unmerge write W through ``.data`` (no version bump): what is kept of W goes. ``train()`` — which
    transformers' Trainer calls every step — keeps ‖W_j‖² (W is unchanged; its version counter is the key)."""
    _, ours = _pair("llama", use_dora=True)
    layer = _fused(ours)[0]
    with torch.no_grad():
        ours(**_inputs(CASES["llama"]))
    kept = layer.__dict__.get("_dora_row_norms")
    assert isinstance(kept, RowNorms) and kept._norms is not None
    norms_before = kept._norms
    ours.train()
    with torch.no_grad():
        ours(**_inputs(CASES["llama"]))
    assert layer.__dict__.get("_dora_row_norms") is kept and kept._norms is norms_before
    with torch.no_grad():
        ours(**_inputs(CASES["llama"]))
    layer.merge()
    assert "_dora_row_norms" not in layer.__dict__
    layer.unmerge()
    with torch.no_grad():
        ours(**_inputs(CASES["llama"]))
    assert "_dora_row_norms" in layer.__dict__
    lorafuse.unfuse_peft_model(ours)  # stock PEFT classes again: the run-time attributes go too
    assert type(layer) is peft.tuners.lora.Linear and "_dora_row_norms" not in layer.__dict__


def test_inference_keeps_the_norms_until_an_adapter_changes() -> None:
    """no_grad forwards reuse ν while W, A and B are unchanged; an optimizer-style in-place update of B (version
    counter) makes the next forward recompute it — the output then follows the new B, as PEFT's does."""
    theirs, ours = _pair("llama", use_dora=True)
    theirs.eval()
    ours.eval()
    inputs = _inputs(CASES["llama"])
    layer = _fused(ours)[0]
    with torch.no_grad():
        first = ours(**inputs).logits
        kept = kept_row_norms(layer)._nu
        assert kept is not None
        torch.testing.assert_close(ours(**inputs).logits, first, rtol=0, atol=0)
        assert kept_row_norms(layer)._nu is kept
        for model in (ours, theirs):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(1.5)
        _assert_match({"logits": ours(**inputs).logits}, {"logits": theirs(**inputs).logits})
    assert kept_row_norms(layer)._nu is not kept


def test_training_steps_match_peft_and_refresh_the_norms() -> None:
    """Three AdamW steps on both models: losses and magnitudes stay PEFT's — each step's in-place update of A, B
    and μ (version counters) makes the next forward take fresh norms."""
    theirs, ours = _pair("qwen2", use_dora=True)
    inputs = _inputs(CASES["qwen2"])
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (theirs, ours)]
    for model in (theirs, ours):
        model.train()
    for _ in range(3):
        losses = []
        for model, opt in zip((theirs, ours), opts):
            opt.zero_grad(set_to_none=True)
            loss = model(**inputs).loss
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert _paths(ours) == {"c"}
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    mags = {n: p for n, p in theirs.named_parameters() if "lora_magnitude_vector" in n}
    _assert_match({n: p for n, p in ours.named_parameters() if n in mags}, mags, tol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "orthogonal"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_initialisations_equal_peft_and_train_fused(init: str, dora: bool) -> None:
    """PiSSA (full and fast SVD), OLoRA, orthogonal: PEFT's own initialisation code runs inside
    `lorafuse.get_peft_model`, so the same seed gives PEFT's adapters and PEFT's residual base weights; the
    layers then run fused."""
    base = CASES["llama"].build
    kwargs = dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init, use_dora=dora)
    models = []
    for get in (peft.get_peft_model, lorafuse.get_peft_model):
        torch.manual_seed(0)
        model = base()
        torch.manual_seed(1)
        models.append(get(model, peft.LoraConfig(**kwargs)))
    theirs, ours = models
    _assert_match(ours.state_dict(), theirs.state_dict(), tol=0)
    inputs = _inputs(CASES["llama"])
    want, got = _run(theirs.train(), inputs), _run(ours.train(), inputs)
    assert _paths(ours) == {"c"}
    _assert_match(got, want)


@pytest.mark.parametrize("wdt,adt,compiling,fused", [
    (torch.float32, torch.float32, False, True), (torch.bfloat16, torch.bfloat16, False, True),
    (torch.float16, torch.float16, False, True), (torch.bfloat16, torch.float32, False, False),
    (torch.float32, torch.float32, True, False)])
def test_which_dora_operands_fuse_off_the_cpu(wdt, adt, compiling, fused) -> None:
    """Off the CPU (meta tensors here; CUDA on a GPU) a DoRA adapter goes to `dora_linear` — z̃ on the kernels
    `backend.forward` picks for the device — for adapters and magnitude of W's dtype in eager mode; fp32 adapters
    on a half W, and torch.compile's tracing (a seed tensor), run PEFT's forward."""
    from lorafuse.backend import DISPATCH
    from lorafuse.dora import dora_linear, dora_operands

    def meta(*shape, dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    seed = torch.zeros(1, dtype=torch.int64) if compiling else 0
    operands = (meta(4, 8, dtype=wdt), meta(6, 8, dtype=wdt), None, meta(2, 8, dtype=adt), meta(6, 2, dtype=adt),
                2.0, 0.0, seed, False, None, DISPATCH)
    got = dora_operands(operands, meta(6, dtype=adt), RowNorms())
    assert (got is not None) == fused
    if fused:
        run, args = got
        assert run is dora_linear and args[:5] == operands[:5] and args[-1] is DISPATCH
