"""lorafuse.cuda on a GPU: parity with a float64 torch reference and with PEFT, gradients, dropout,
streams, CUDA graphs, odd shapes. Skipped (with the reason) where no GPU or no CUDA build is present;
benchmarks/gpu_check.sh runs it on an H200.

Tolerances are bounds, not guesses. For an output accumulated in fp32 over K terms and rounded to the
output dtype, with `mag` the same expression on absolute values (e.g. |x|·|W|ᵀ + |b| + s·|u|·|B|ᵀ):
  * fp32 (TF32 off): each GEMM's result is within γ_K·mag (γ_K ≈ K·2⁻²⁴); the plan chains at most four
    roundings of partial results (x̃ when p > 0, u or v, the low-rank term, the sum), so
    |err| ≤ 6·(K+2)·2⁻²⁴·mag.
  * bf16 / fp16: inputs are exact in the reference (it upcasts the same values); the errors are at most
    four roundings (x̃ or the masked term when p > 0, u or v, the low-rank partial result, the output), each
    ≤ ulp/2 = 2⁻⁹ (bf16) / 2⁻¹¹ (fp16) relative to a quantity bounded by `mag`, plus the fp32
    accumulation (K·2⁻²⁴, negligible): |err| ≤ 5·2⁻⁹·mag (bf16), 5·2⁻¹¹·mag (fp16).
  * TF32: inputs rounded to 10-bit mantissas (2⁻¹¹ each, two operands): |err| ≤ 2⁻⁸·mag.
Against PEFT (which runs cuBLAS through torch, in another summation order) in fp32 the logits agree to
rtol = atol = 1e-5: both sides are within ~1e-6 relative of the exact value per GEMM, and the tiny model's
two decoder layers (RMSNorm, softmax) amplify that by well under 10×. In bf16 our error against a float64
copy of the model must be no worse than 2× PEFT's own bf16 error (plus 1e-3 absolute).
"""
from __future__ import annotations

import copy
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import lorafuse.cuda as lc  # noqa: E402

DEVICE = "cuda"


def _skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    if not lc.is_compiled():
        return "lorafuse was built without CUDA support (lorafuse._C_cuda missing): " + str(lc.cuda_info())
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

U = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


@pytest.fixture(autouse=True)
def _no_tf32():
    """Tests run with TF32 off unless they turn it on (torch's own default for matmul)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _rand(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(dtype).to(DEVICE)


def _mask64(n, k, p, seed):
    return torch.from_numpy(lc.reference_dropout_mask(n, k, p, seed).astype(np.float64)).to(DEVICE)


def _ref(x, W, bias, A, B, s, p, seed, g, fifo=False):
    """float64 forward/backward and the matching magnitudes (|·| everywhere) for the bounds."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    x, W, bias, A, B, g = map(d, (x, W, bias, A, B, g))
    if fifo:
        W = W.t()
    k = x.shape[-1]
    x2, g2 = x.reshape(-1, k), g.reshape(-1, W.shape[0])
    n = x2.shape[0]
    mask = _mask64(n, k, p, seed) if p > 0 else torch.ones_like(x2)
    xd = x2 * mask
    u = xd @ A.t()
    y = x2 @ W.t() + s * u @ B.t() + (0 if bias is None else bias)
    v = g2 @ B
    dB = s * g2.t() @ u
    dA = s * v.t() @ xd
    dx = g2 @ W + s * (v @ A) * mask
    a = lambda t: t.abs()  # noqa: E731
    ua = a(xd) @ a(A).t()
    va = a(g2) @ a(B)
    mags = dict(
        y=a(x2) @ a(W).t() + s * ua @ a(B).t() + (0 if bias is None else a(bias)),
        u=ua,
        dB=s * a(g2).t() @ ua,
        dA=s * va.t() @ a(xd),
        dx=a(g2) @ a(W) + s * (va @ a(A)) * mask,
    )
    return dict(y=y, u=u, dx=dx, dA=dA, dB=dB), mags


def _bound(dtype, K, mag, tf32=False):
    if dtype == torch.float32:
        rel = 2.0 ** -8 if tf32 else 6 * (K + 2) * U[torch.float32]
    elif dtype == torch.bfloat16:
        rel = 5 * 2.0 ** -9
    else:
        rel = 5 * 2.0 ** -11
    return rel * mag + 1e-30


def _check(name, got, ref, mag, dtype, K, tf32=False):
    got = got.double().reshape(ref.shape)
    err = (got - ref).abs()
    lim = _bound(dtype, K, mag, tf32)
    bad = err > lim
    assert not bool(bad.any()), (f"{name} ({dtype}, K={K}): {int(bad.sum())}/{bad.numel()} elements off; worst "
                                 f"err {float(err[bad].max()):.3g} vs bound {float(lim[bad].min()):.3g}")


SHAPES = [  # lead dims, k, m, r
    ((32,), 64, 48, 8),
    ((1,), 13, 7, 1),          # n = 1, r = 1, k not a multiple of 8 (rows not 16-byte aligned)
    ((2, 5), 24, 40, 16),      # leading batch dims
    ((7,), 33, 130, 3),        # odd everything
    ((257,), 128, 96, 16),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _problem(lead, k, m, r, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = _rand(lead + (k,), dtype, gen)
    W = _rand((m, k), dtype, gen, k ** -0.5)
    b = _rand((m,), dtype, gen) if bias else None
    A = _rand((r, k), dtype, gen, k ** -0.5)
    B = _rand((m, r), dtype, gen, r ** -0.5)
    g = _rand(lead + (m,), dtype, gen)
    return x, W, b, A, B, g


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,m,r", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_vs_float64(dtype, lead, k, m, r, bias):
    x, W, b, A, B, g = _problem(lead, k, m, r, dtype, bias)
    s = 2.0
    y, u = lc.cuda_lora_forward(x, W, A, B, s, b)
    dx, dA, dB = lc.cuda_lora_backward(g, x, u, W, A, B, s)
    torch.cuda.synchronize()
    assert y.shape == lead + (m,) and u.shape == lead + (r,) and dx.shape == x.shape
    assert y.dtype == dtype and dA.shape == (r, k) and dB.shape == (m, r)
    ref, mag = _ref(x, W, b, A, B, s, 0.0, 0, g)
    n = int(np.prod(lead))
    _check("u", u, ref["u"], mag["u"], dtype, k)
    _check("y", y, ref["y"], mag["y"], dtype, k + r)
    _check("dx", dx, ref["dx"], mag["dx"], dtype, m + r)
    _check("dA", dA, ref["dA"], mag["dA"], dtype, n + m)
    _check("dB", dB, ref["dB"], mag["dB"], dtype, n + k)


def test_tf32_only_when_torch_allows():
    x, W, b, A, B, g = _problem((64,), 256, 128, 8, torch.float32)
    ref, mag = _ref(x, W, b, A, B, 1.0, 0.0, 0, g)
    assert lc._allow_tf32(torch.float32) == 0
    y, _ = lc.cuda_lora_forward(x, W, A, B, 1.0, b)
    _check("y (TF32 off)", y, ref["y"], mag["y"], torch.float32, 256 + 8)
    torch.backends.cuda.matmul.allow_tf32 = True
    assert lc._allow_tf32(torch.float32) == 1
    assert lc._allow_tf32(torch.bfloat16) == 0
    y, _ = lc.cuda_lora_forward(x, W, A, B, 1.0, b)
    _check("y (TF32 on)", y, ref["y"], mag["y"], torch.float32, 256 + 8, tf32=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fan_in_fan_out_and_transposed_views(dtype):
    x, W, b, A, B, g = _problem((19,), 40, 24, 4, dtype)
    ref, mag = _ref(x, W, b, A, B, 0.5, 0.0, 0, g)
    Wt = W.t().contiguous()  # (k, m): GPT-2 Conv1D layout
    y1, u1 = lc.cuda_lora_forward(x, Wt, A, B, 0.5, b, fan_in_fan_out=True)
    dx1, dA1, dB1 = lc.cuda_lora_backward(g, x, u1, Wt, A, B, 0.5, fan_in_fan_out=True)
    y2, u2 = lc.cuda_lora_forward(x, Wt.t(), A, B, 0.5, b)  # non-contiguous view of W: read in place
    for name, got in (("y fifo", y1), ("y view", y2)):
        _check(name, got, ref["y"], mag["y"], dtype, 44)
    _check("dx fifo", dx1, ref["dx"], mag["dx"], dtype, 28)
    _check("dA fifo", dA1, ref["dA"], mag["dA"], dtype, 19 + 24)
    with pytest.raises(ValueError, match="never copied"):
        lc.cuda_lora_forward(x[:, ::2].contiguous(), W[:, ::2], A[:, ::2].contiguous(), B, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_matches_reference_and_regenerates(dtype):
    lead, k, m, r, p, seed = (45,), 72, 56, 8, 0.25, 987654321
    x, W, b, A, B, g = _problem(lead, k, m, r, dtype)
    y, u = lc.cuda_lora_forward(x, W, A, B, 1.5, b, dropout_p=p, seed=seed)
    dx, dA, dB = lc.cuda_lora_backward(g, x, u, W, A, B, 1.5, dropout_p=p, seed=seed)
    ref, mag = _ref(x, W, b, A, B, 1.5, p, seed, g)
    _check("u", u, ref["u"], mag["u"], dtype, k)
    _check("y", y, ref["y"], mag["y"], dtype, k + r)
    _check("dx", dx, ref["dx"], mag["dx"], dtype, m + r)
    _check("dA", dA, ref["dA"], mag["dA"], dtype, 45 + m)
    _check("dB", dB, ref["dB"], mag["dB"], dtype, 45 + k)


def test_dropout_deterministic_by_seed_and_same_mask_as_cpu():
    n, k, p = 123, 77, 0.3
    m1 = lc.dropout_mask(n, k, p, 42)
    m2 = lc.dropout_mask(n, k, p, 42)
    m3 = lc.dropout_mask(n, k, p, 43)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    ref = torch.from_numpy(lc.reference_dropout_mask(n, k, p, 42)).to(DEVICE)
    assert torch.equal(m1, ref)
    try:
        from lorafuse import ops
    except ImportError:
        return
    assert torch.equal(m1.cpu() != 0, torch.from_numpy(ops.dropout_mask(n, k, p, 42)) != 0)
    x, W, b, A, B, g = _problem((n,), k, 32, 4, torch.bfloat16)
    ya, ua = lc.cuda_lora_forward(x, W, A, B, 1.0, b, dropout_p=p, seed=7)
    yb, ub = lc.cuda_lora_forward(x, W, A, B, 1.0, b, dropout_p=p, seed=7)
    yc, _ = lc.cuda_lora_forward(x, W, A, B, 1.0, b, dropout_p=p, seed=8)
    assert torch.equal(ya, yb) and torch.equal(ua, ub) and not torch.equal(ya, yc)


def test_runs_on_the_current_stream():
    """The inputs are written on a side stream after a long GPU sleep; only kernels that run on that
    (current) stream see them. Work on any other stream would read the stale values."""
    x, W, b, A, B, g = _problem((512,), 256, 256, 16, torch.float32)
    x_new = x * -3.0
    ref, mag = _ref(x_new, W, b, A, B, 1.0, 0.0, 0, g)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on `side`
        x.copy_(x_new)
        y, u = lc.cuda_lora_forward(x, W, A, B, 1.0, b)
        dx, dA, dB = lc.cuda_lora_backward(g, x, u, W, A, B, 1.0)
    side.synchronize()
    _check("y", y, ref["y"], mag["y"], torch.float32, 272)
    _check("dx", dx, ref["dx"], mag["dx"], torch.float32, 272)
    _check("dA", dA, ref["dA"], mag["dA"], torch.float32, 512 + 256)


def test_cuda_graph_capture_and_replay():
    """No host synchronisation and no allocation on the hot path: the calls capture into a CUDA graph."""
    x, W, b, A, B, g = _problem((64,), 128, 96, 8, torch.bfloat16)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):  # warm-up: workspace for this stream + algorithm cache
        y, u = lc.cuda_lora_forward(x, W, A, B, 1.0, b)
        lc.cuda_lora_backward(g, x, u, W, A, B, 1.0)
    s.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        y, u = lc.cuda_lora_forward(x, W, A, B, 1.0, b)
        dx, dA, dB = lc.cuda_lora_backward(g, x, u, W, A, B, 1.0)
    x.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    ref, mag = _ref(x, W, b, A, B, 1.0, 0.0, 0, g)
    _check("y", y, ref["y"], mag["y"], torch.bfloat16, 136)
    _check("dA", dA, ref["dA"], mag["dA"], torch.bfloat16, 64 + 96)


def test_threads_on_separate_streams():
    probs = [_problem((100 + i,), 64, 80, 8, torch.bfloat16, seed=i) for i in range(4)]
    results, errors = [None] * 4, []

    def work(i):
        try:
            st = torch.cuda.Stream()
            with torch.cuda.stream(st):
                x, W, b, A, B, g = probs[i]
                for _ in range(5):
                    y, u = lc.cuda_lora_forward(x, W, A, B, 1.0, b)
                results[i] = (y, u)
            st.synchronize()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    for i, (x, W, b, A, B, g) in enumerate(probs):
        ref, mag = _ref(x, W, b, A, B, 1.0, 0.0, 0, g)
        _check(f"y[{i}]", results[i][0], ref["y"], mag["y"], torch.bfloat16, 72)


def test_empty_batch():
    x, W, b, A, B, g = _problem((0,), 16, 8, 2, torch.float32)
    y, u = lc.cuda_lora_forward(x, W, A, B, 1.0, b)
    dx, dA, dB = lc.cuda_lora_backward(g, x, u, W, A, B, 1.0)
    torch.cuda.synchronize()
    assert y.shape == (0, 8) and dx.shape == (0, 16)
    assert not dA.any() and not dB.any()


def test_argument_errors():
    x, W, b, A, B, g = _problem((4,), 16, 8, 2, torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        lc.cuda_lora_forward(x, W.double(), A, B, 1.0)
    with pytest.raises(ValueError, match="CUDA tensor"):
        lc.cuda_lora_forward(x.cpu(), W, A, B, 1.0)
    with pytest.raises(ValueError, match="on cpu"):
        lc.cuda_lora_forward(x, W.cpu(), A, B, 1.0)
    with pytest.raises(ValueError, match="shape"):
        lc.cuda_lora_forward(x, W, A, B[:, :1], 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lc.cuda_lora_forward(x, W, A, B, 1.0, dropout_p=1.0)
    out = torch.empty(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="overlaps"):
        lc.cuda_lora_forward(x, W, A, B, 1.0, out=out, u_out=out.view(-1)[:8].view(4, 2))
    y, u = lc.cuda_lora_forward(x, W, A, B, 1.0, out=out)
    assert y.data_ptr() == out.data_ptr()


# ------------------------------------------------------------------------------ through autograd

def test_lorafuse_autograd_dispatches_here():
    """lorafuse.autograd (the torch layer) routes same-dtype CUDA tensors to these kernels."""
    autograd = pytest.importorskip("lorafuse.autograd")
    from lorafuse.backend import backend_name

    x, W, b, A, B, g = _problem((3, 11), 40, 24, 4, torch.bfloat16)
    assert backend_name(x, W, b, A, B) == "cuda"
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    y = autograd.lora_linear(x, W, b, A, B, 2.0)
    y.backward(g)
    ref, mag = _ref(x.detach(), W, b, A.detach(), B.detach(), 2.0, 0.0, 0, g)
    _check("y", y.detach(), ref["y"], mag["y"], torch.bfloat16, 44)
    _check("dx", x.grad, ref["dx"], mag["dx"], torch.bfloat16, 28)
    _check("dA", A.grad, ref["dA"], mag["dA"], torch.bfloat16, 33 + 24)
    _check("dB", B.grad, ref["dB"], mag["dB"], torch.bfloat16, 33 + 40)


def _tiny_llama(dtype):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attention_bias=False, mlp_bias=False, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model.to(device=DEVICE, dtype=dtype).eval()


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_config(dora=False):
    """A fresh LoRA config (r 8, no dropout, random B ≠ 0; DoRA with ``dora``) on every projection of
    `_tiny_llama`, for either side (``lorafuse.LoraConfig`` is PEFT's own class)."""
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False, target_modules=TARGETS,
                           use_dora=dora)


def _peft_model(base, dora=False):
    """Stock PEFT on ``base``, adapters (and DoRA magnitudes) in the base's dtype (``autocast_adapter_dtype=False``)."""
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(base, _lora_config(dora), autocast_adapter_dtype=False)


def _fused_layers(model):
    from lorafuse import FusedLinear

    return [m for m in model.modules() if isinstance(m, FusedLinear)]


def _fuse(peft_model):
    """A deep copy of a stock PEFT model (sharing nothing with it) converted by `lorafuse.fuse_peft_model`:
    every LoRA layer a `FusedLinear`, whose forward must dispatch to these kernels (``backend`` 'cuda')."""
    import lorafuse

    fused = copy.deepcopy(peft_model)
    assert lorafuse.fuse_peft_model(fused) == 2 * len(TARGETS)
    assert {m.backend for m in _fused_layers(fused)} == {"cuda"}
    return fused


def _assert_ran_fused(model, path="cuda"):
    """Every LoRA layer's last forward took ``path`` ('cuda': these kernels; 'c': the CPU ones)."""
    layers = _fused_layers(model)
    assert len(layers) == 2 * len(TARGETS) and {m.lorafuse_path for m in layers} == {path}


def _lora_grads(model):
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters()
            if "lora_" in n and p.grad is not None}


def _run(model, ids):
    """logits and LoRA gradients of a fixed random linear functional of the logits (O(1) gradients)."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    (logits.to(w.dtype) * w.to(logits.dtype).to(w.dtype)).sum().backward()
    return logits.detach().double(), _lora_grads(model)


def test_llama_vs_peft_fp32():
    model = _peft_model(_tiny_llama(torch.float32))
    fused = _fuse(model)
    ids = torch.randint(0, 96, (2, 17), device=DEVICE, generator=None)
    l_peft, g_peft = _run(model, ids)
    l_ours, g_ours = _run(fused, ids)
    _assert_ran_fused(fused)
    torch.testing.assert_close(l_ours, l_peft, rtol=1e-5, atol=1e-5)
    assert g_peft.keys() == g_ours.keys() and len(g_peft) == 2 * 7 * 2
    for name in g_peft:  # gradients: sums over all tokens of products of the above, so 10× looser, normwise
        err = (g_ours[name] - g_peft[name]).abs().max().item()
        assert err <= 1e-4 * g_peft[name].abs().max().item() + 1e-7, (name, err)


def test_llama_vs_peft_bf16_no_worse_than_peft():
    peft_bf16 = _peft_model(_tiny_llama(torch.bfloat16))
    exact = copy.deepcopy(peft_bf16).to(torch.float64)  # the same bf16 weights, evaluated in float64
    fused = _fuse(peft_bf16)
    ids = torch.randint(0, 96, (2, 17), device=DEVICE)
    l_ref, g_ref = _run(exact, ids)
    l_peft, g_peft = _run(peft_bf16, ids)
    l_ours, g_ours = _run(fused, ids)
    _assert_ran_fused(fused)
    e_peft = (l_peft - l_ref).abs().max().item()
    e_ours = (l_ours - l_ref).abs().max().item()
    assert e_ours <= 2 * e_peft + 1e-3, (e_ours, e_peft)
    for name in g_ref:
        scale = g_ref[name].abs().max().item() + 1e-12
        ep = (g_peft[name] - g_ref[name]).abs().max().item() / scale
        eo = (g_ours[name] - g_ref[name]).abs().max().item() / scale
        assert eo <= 2 * ep + 1e-2, (name, eo, ep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_llama_dora_vs_peft(dtype):
    """DoRA adapters (``use_dora=True``, adapters and magnitudes in the base dtype) run on the CUDA LoRA plan
    (`lorafuse.dora.dora_linear`: z̃ from these kernels, ν without W + s·B·A). fp32: logits and every adapter
    gradient, the magnitudes' included, equal PEFT's DoRA within fp32 rounding (as the LoRA test above); bf16:
    no further from a float64 copy of the model than PEFT's own bf16 results (2× + slack)."""
    model = _peft_model(_tiny_llama(dtype), dora=True)
    fused = _fuse(model)
    ids = torch.randint(0, 96, (2, 17), device=DEVICE)
    l_peft, g_peft = _run(model, ids)
    l_ours, g_ours = _run(fused, ids)
    _assert_ran_fused(fused)
    assert g_peft.keys() == g_ours.keys() and len(g_peft) == 3 * 7 * 2
    assert sum("lora_magnitude_vector" in name for name in g_peft) == 7 * 2
    if dtype == torch.float32:
        torch.testing.assert_close(l_ours, l_peft, rtol=1e-5, atol=1e-5)
        for name in g_peft:
            err = (g_ours[name] - g_peft[name]).abs().max().item()
            assert err <= 1e-4 * g_peft[name].abs().max().item() + 1e-7, (name, err)
        return
    l_ref, g_ref = _run(copy.deepcopy(model).to(torch.float64), ids)
    ep, gp = _errors(l_ref, g_ref, l_peft, g_peft)
    eo, go = _errors(l_ref, g_ref, l_ours, g_ours)
    assert eo <= 2 * ep + 1e-3, (eo, ep)
    for name in g_ref:
        assert go[name] <= 2 * gp[name] + 1e-2, (name, go[name], gp[name])


def test_dora_with_dropout_vs_float64():
    """One DoRA layer with dropout 0.25 on CUDA tensors (fp32): output and the gradients of x, A, B and the
    magnitude against `dora_reference` in float64 on the CPU with the kernels' mask for the same seed."""
    from lorafuse.backend import DISPATCH, mask_for
    from lorafuse.dora import dora_linear, dora_reference

    x, W, b, A, B, g = _problem((3, 11), 40, 24, 4, torch.float32)
    mag = torch.linalg.norm(W, dim=1) * 1.5
    leaves = [t.clone().requires_grad_(True) for t in (x, A, B, mag)]
    y = dora_linear(leaves[0], W, b, *leaves[1:3], leaves[3], 2.0, 0.25, 1234, False, kern=DISPATCH)
    y.backward(g)
    ref = [t.detach().cpu().double().requires_grad_(True) for t in (x, A, B, mag)]
    mask = mask_for(ref[0].detach().reshape(-1, 40), 0.25, 1234).view(ref[0].shape)
    y_ref = dora_reference(ref[0], W.cpu().double(), b.cpu().double(), ref[1], ref[2], ref[3], 2.0, False, mask)
    y_ref.backward(g.cpu().double())
    torch.testing.assert_close(y.detach().cpu().double(), y_ref.detach(), rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("dx", "dA", "dB", "dmag"), leaves, ref):
        err = (got.grad.cpu().double() - want.grad).abs().max().item()
        assert err <= 1e-5 * want.grad.abs().max().item() + 1e-6, (name, err)


def test_dora_fp32_adapters_on_bf16_runs_peft():
    """DoRA with PEFT's default fp32 adapters and magnitude on a bf16 base is not fused on CUDA (PEFT adds its
    fp32 DoRA term to the rounded base result; no kernel here does that): PEFT's own forward runs."""
    peft = pytest.importorskip("peft")
    import lorafuse

    model = peft.get_peft_model(_tiny_llama(torch.bfloat16), _lora_config(dora=True))
    fused = copy.deepcopy(model)
    assert lorafuse.fuse_peft_model(fused) == 2 * len(TARGETS)
    assert {m.backend for m in _fused_layers(fused)} == {"peft"}
    ids = torch.randint(0, 96, (2, 17), device=DEVICE)
    l_peft, _ = _run(model, ids)
    l_ours, _ = _run(fused, ids)
    _assert_ran_fused(fused, "peft")
    torch.testing.assert_close(l_ours, l_peft, rtol=1e-6, atol=1e-6)  # PEFT's code on identical copies


def test_cuda_info_reports_build():
    info = lc.cuda_info()
    assert info["compiled"] and info["device_count"] >= 1
    assert "sm_90" in info["archs"] and info["cublaslt_runtime"] > 0
    assert "compiled in" in str(info)


def test_aligned_shapes_run_on_cublaslt_not_the_fallback():
    """The naive fallback GEMM is for problems cuBLASLt declines (dimensions of 1); aligned shapes must not
    land there (it would be correct but slow)."""
    before = lc.cuda_info()["fallback_gemms"]
    for dtype in DTYPES:
        x, W, b, A, B, g = _problem((64,), 128, 96, 16, dtype, seed=11)
        y, u = lc.cuda_lora_forward(x, W, A, B, 1.0, b)
        lc.cuda_lora_backward(g, x, u, W, A, B, 1.0)
    torch.cuda.synchronize()
    assert lc.cuda_info()["fallback_gemms"] == before


def _compiled_and_eager_grads(step, x, params):
    """[x's gradient, then each param's] of step(x).backward(), first under torch.compile(fullgraph=True),
    then eagerly: two lists to compare."""
    torch._dynamo.reset()
    results = []
    try:
        for run in (torch.compile(step, fullgraph=True), step):
            xx = x.clone().requires_grad_(True)
            run(xx).backward()
            results.append([xx.grad] + [p.grad.clone() for p in params])
            for p in params:
                p.grad = None
    finally:
        torch._dynamo.reset()
    return results


def test_compiled_lora_linear_matches_eager_on_cuda():
    """torch.compile(fullgraph=True) over `lora_linear` on CUDA tensors (fp32, dropout 0.2, a trained
    base): the custom operators reach the CUDA kernels, and x, W, bias, A, B gradients equal eager
    mode's (the same kernels both ways)."""
    from lorafuse.autograd import lora_linear
    from lorafuse.backend import backend_name

    torch.manual_seed(0)
    dev = torch.device(DEVICE)
    W = torch.randn(40, 72, device=dev, requires_grad=True)
    b = torch.randn(40, device=dev, requires_grad=True)
    A = (torch.randn(8, 72, device=dev) * 0.1).requires_grad_(True)
    B = (torch.randn(40, 8, device=dev) * 0.1).requires_grad_(True)
    x = torch.randn(3, 17, 72, device=dev)
    assert backend_name(x, W, b, A, B) == "cuda"

    def step(xx):
        return torch.tanh(lora_linear(xx, W, b, A, B, 1.5, 0.2, 7)).square().sum()

    results = _compiled_and_eager_grads(step, x, (W, b, A, B))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ bf16 base with float32 adapters (PEFT's default)

def _bound_mixed(name, mag):
    """y, dx: bf16 outputs (5·2⁻⁹·mag as for bf16 above); u, dA, dB: float32 outputs whose fp32 operands went
    through the GEMMs as bf16 hi + lo parts (each product exact to ~2⁻¹⁶), bounded by 2⁻¹⁴·mag."""
    rel = 5 * 2.0 ** -9 if name in ("y", "dx") else 2.0 ** -14
    return rel * mag + 1e-30


@pytest.mark.parametrize("lead,k,m,r", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("fifo", [False, True])
def test_fp32_adapters_on_bf16_vs_float64(lead, k, m, r, p, fifo):
    x, W, b, _, _, g = _problem(lead, k, m, r, torch.bfloat16, seed=3)
    gen = torch.Generator().manual_seed(4)
    A = _rand((r, k), torch.float32, gen, k ** -0.5)
    B = _rand((m, r), torch.float32, gen, r ** -0.5)
    Warg = W.t().contiguous() if fifo else W
    s, seed = 2.0, 77
    y, u = lc.cuda_lora_forward(x, Warg, A, B, s, b, dropout_p=p, seed=seed, fan_in_fan_out=fifo)
    dx, dA, dB = lc.cuda_lora_backward(g, x, u, Warg, A, B, s, dropout_p=p, seed=seed, fan_in_fan_out=fifo)
    torch.cuda.synchronize()
    assert (y.dtype, dx.dtype) == (torch.bfloat16,) * 2 and (u.dtype, dA.dtype, dB.dtype) == (torch.float32,) * 3
    ref, mag = _ref(x, W, b, A, B, s, p, seed, g)
    for name, got in (("y", y), ("u", u), ("dx", dx), ("dA", dA), ("dB", dB)):
        err = (got.double().reshape(ref[name].shape) - ref[name]).abs()
        lim = _bound_mixed(name, mag[name])
        assert not bool((err > lim).any()), (name, float(err.max()), float((err / (mag[name] + 1e-30)).max()))


def _twins(dtype):
    """(PEFT model, lorafuse model) on one tiny Llama in ``dtype`` with PEFT's default adapter dtype
    (float32 on a half-precision base) and the same adapter weights (B ≠ 0)."""
    peft = pytest.importorskip("peft")
    import lorafuse

    base = _tiny_llama(dtype)
    ours = lorafuse.get_peft_model(copy.deepcopy(base), _lora_config())
    theirs = peft.get_peft_model(base, _lora_config())
    lora = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    missing = set(lora) - set(ours.state_dict())
    assert not missing, sorted(missing)[:3]
    ours.load_state_dict(lora, strict=False)
    return theirs, ours


def _count_fused(monkeypatch):
    calls = []
    real = lc.cuda_lora_forward

    def counting(*a, **kw):
        calls.append(a[0].dtype)
        return real(*a, **kw)
    monkeypatch.setitem(lc._KERNELS, "lora_forward", counting)
    monkeypatch.setattr(lc, "lora_forward", counting, raising=False)
    from lorafuse import backend

    monkeypatch.setitem(backend._loaded, "cuda", lc)
    return calls


def _loss(model, ids):
    """The causal-LM loss (next-token cross-entropy) of ids, as a float."""
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.double().item()


def _errors(loss_ref, g_ref, loss, g):
    el = (loss - loss_ref).abs().max().item()
    eg = {n: (g[n] - g_ref[n]).abs().max().item() / (g_ref[n].abs().max().item() + 1e-12) for n in g_ref}
    return el, eg


def test_llama_bf16_fp32_adapters_fused_vs_peft(monkeypatch):
    """A bf16 Llama with PEFT's default fp32 adapters: every LoRA layer runs the fused CUDA kernels
    (backend 'cuda', one kernel call per layer), and logits, the LM loss and every adapter gradient are
    no further from a float64 copy of the same model than PEFT's own bf16 results are (2× + slack)."""
    theirs, ours = _twins(torch.bfloat16)
    layers = _fused_layers(ours)
    assert len(layers) == 14 and {m.backend for m in layers} == {"cuda"}
    assert {m.lora_A["default"].weight.dtype for m in layers} == {torch.float32}
    exact = copy.deepcopy(theirs).to(torch.float64)
    ids = torch.randint(0, 96, (2, 17), device=DEVICE)
    calls = _count_fused(monkeypatch)
    l_ours, g_ours = _run(ours, ids)
    assert len(calls) == 14 and set(calls) == {torch.bfloat16}
    _assert_ran_fused(ours)
    l_ref, g_ref = _run(exact, ids)
    l_peft, g_peft = _run(theirs, ids)
    assert g_ref.keys() == g_ours.keys() == g_peft.keys() and len(g_ref) == 28
    assert {v.dtype for n, v in ours.named_parameters() if "lora_" in n} == {torch.float32}
    ep, gp = _errors(l_ref, g_ref, l_peft, g_peft)
    eo, go = _errors(l_ref, g_ref, l_ours, g_ours)
    assert eo <= 2 * ep + 1e-3, (eo, ep)
    for name in g_ref:
        assert go[name] <= 2 * gp[name] + 1e-2, (name, go[name], gp[name])
    loss_ref, loss_peft, loss_ours = _loss(exact, ids), _loss(theirs, ids), _loss(ours, ids)
    assert abs(loss_ours - loss_ref) <= 2 * abs(loss_peft - loss_ref) + 1e-3, (loss_ours, loss_peft, loss_ref)


def test_llama_fp32_under_bf16_autocast_fused_vs_peft(monkeypatch):
    """An fp32 Llama under torch.autocast("cuda", bfloat16): the LoRA layers cast their operands to bf16
    (as autocast casts PEFT's linears) and run the fused kernels; logits, the LM loss and adapter gradients
    are no further from the float64 model than PEFT's under the same autocast."""
    theirs, ours = _twins(torch.float32)
    exact = copy.deepcopy(theirs).to(torch.float64)
    ids = torch.randint(0, 96, (2, 17), device=DEVICE)
    calls = _count_fused(monkeypatch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        l_ours, g_ours = _run(ours, ids)
        l_peft, g_peft = _run(theirs, ids)
    assert len(calls) == 14 and set(calls) == {torch.bfloat16}
    _assert_ran_fused(ours)
    assert {p.grad.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.float32}
    l_ref, g_ref = _run(exact, ids)
    ep, gp = _errors(l_ref, g_ref, l_peft, g_peft)
    eo, go = _errors(l_ref, g_ref, l_ours, g_ours)
    assert eo <= 2 * ep + 1e-3, (eo, ep)
    for name in g_ref:
        assert go[name] <= 2 * gp[name] + 1e-2, (name, go[name], gp[name])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_peft, loss_ours = _loss(theirs, ids), _loss(ours, ids)
    loss_ref = _loss(exact, ids)
    assert abs(loss_ours - loss_ref) <= 2 * abs(loss_peft - loss_ref) + 1e-3, (loss_ours, loss_peft, loss_ref)


def test_bf16_gpu_matches_cpu_kernels():
    """The same bf16 model with fp32 adapters: the CUDA kernels (bf16) against lorafuse's C kernels on the
    CPU (the same weights upcast to fp32, exactly): within 2× PEFT-on-GPU's distance from that CPU result."""
    theirs, ours = _twins(torch.bfloat16)
    cpu = copy.deepcopy(ours).to(device="cpu", dtype=torch.float32)
    assert {m.backend for m in _fused_layers(cpu)} == {"c"}
    ids = torch.randint(0, 96, (2, 17), device=DEVICE)
    with torch.no_grad():
        l_cpu = cpu(input_ids=ids.cpu()).logits.double()
        l_ours = ours(input_ids=ids).logits.double().cpu()
        l_peft = theirs(input_ids=ids).logits.double().cpu()
    _assert_ran_fused(cpu, "c")
    _assert_ran_fused(ours)
    eo, ep = (l_ours - l_cpu).abs().max().item(), (l_peft - l_cpu).abs().max().item()
    assert eo <= 2 * ep + 1e-3, (eo, ep)


def test_compiled_fp32_adapters_on_bf16_match_eager():
    """torch.compile(fullgraph=True) over `lora_linear` with a bf16 x and W and float32 A, B: the operators'
    shape functions give u, dA, dB the adapters' dtype, and the compiled gradients equal eager mode's."""
    from lorafuse.autograd import lora_linear
    from lorafuse.backend import backend_name

    torch.manual_seed(1)
    dev = torch.device(DEVICE)
    W = torch.randn(48, 64, device=dev).to(torch.bfloat16)
    A = (torch.randn(8, 64, device=dev) * 0.1).requires_grad_(True)
    B = (torch.randn(48, 8, device=dev) * 0.1).requires_grad_(True)
    x = torch.randn(2, 9, 64, device=dev).to(torch.bfloat16)
    assert backend_name(x, W, A, B) == "cuda"

    def step(xx):
        return lora_linear(xx, W, None, A, B, 2.0).float().square().sum()

    results = _compiled_and_eager_grads(step, x, (A, B))
    assert results[0][1].dtype == torch.float32 and results[0][0].dtype == torch.bfloat16
    for got, want in zip(*results):  # the same kernels on the same inputs: equal to the dtype's round-off
        torch.testing.assert_close(got, want)
