"""`torch.compile` over lorafuse layers: the custom operators (`lorafuse.compiled`) pass torch's
operator checks, a Llama from `lorafuse.get_peft_model` (`FusedLinear` layers) compiles with
fullgraph=True (a graph break at a LoRA layer would be an error), runs the fused kernels and gives
eager mode's loss and gradients, dropout included."""
from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import torch._dynamo  # noqa: E402
import torch._inductor.config  # noqa: E402

import lorafuse  # noqa: E402
import lorafuse.autograd  # noqa: E402
from lorafuse.autograd import lora_linear  # noqa: E402
from lorafuse import ops  # noqa: E402
from lorafuse.backend import seed_tensor  # noqa: E402
from stock_compile import unless_stock_peft_fails_too  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    """Each test compiles from scratch, as in a fresh process (no kernel module loaded yet by an
    eager call); Inductor draws random numbers with torch's eager generator (fallback_random), so
    a compiled dropout seed equals the one eager mode draws."""
    monkeypatch.setattr(lorafuse.backend, "_loaded", {})
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


# (leading dims, k, m, r, dropout p, fan_in_fan_out, bias)
OP_CASES = [((3, 5), 16, 24, 4, 0.0, False, True), ((7,), 33, 9, 1, 0.25, True, False),
            ((1,), 8, 8, 2, 0.5, False, True)]


@pytest.mark.parametrize("lead,k,m,r,p,fifo,bias", OP_CASES)
def test_operators_pass_torch_opcheck(lead, k, m, r, p, fifo, bias) -> None:
    """Schema, fake (shape) functions against the real kernels, autograd registration, and
    AOT dispatch with dynamic shapes — torch.library.opcheck's checks, each must succeed."""
    x = torch.randn(*lead, k, requires_grad=True)
    W = torch.randn(k, m) if fifo else torch.randn(m, k)
    b = torch.randn(m) if bias else None
    A, B = torch.randn(r, k, requires_grad=True), torch.randn(m, r, requires_grad=True)
    fwd_args = (x, W, b, A, B, 2.0, p, seed_tensor(p, 123), fifo, True)
    results = torch.library.opcheck(torch.ops.lorafuse.lora_forward.default, fwd_args)
    assert set(results.values()) == {"SUCCESS"}, results
    y, u = torch.ops.lorafuse.lora_forward(*fwd_args)
    g = torch.randn_like(y)
    for need_dx in (True, False):
        bwd_args = (g, x.detach(), u.detach(), W, A.detach(), B.detach(), 2.0, p, seed_tensor(p, 123), fifo, need_dx)
        results = torch.library.opcheck(torch.ops.lorafuse.lora_backward.default, bwd_args)
        assert set(results.values()) == {"SUCCESS"}, results


def test_dropout_mask_operator_passes_opcheck_and_is_the_kernels_mask() -> None:
    """`lorafuse::dropout_mask` (DoRA's x̃ under torch.compile): torch's operator checks, and the very multiplier
    the kernels apply for that seed (`lorafuse.ops.dropout_mask`)."""
    seed = torch.tensor([12345], dtype=torch.int64)
    for n, k, p, dtype in ((3, 7, 0.1, torch.float32), (1, 33, 0.5, torch.bfloat16)):
        results = torch.library.opcheck(torch.ops.lorafuse.dropout_mask.default, (n, k, p, seed, dtype))
        assert set(results.values()) == {"SUCCESS"}, results
        mask = torch.ops.lorafuse.dropout_mask(n, k, p, seed, dtype)
        assert mask.dtype == dtype and torch.equal(mask.float(), torch.from_numpy(ops.dropout_mask(n, k, p, 12345)))


def _llama(dropout: float, use_dora: bool = False, api: Any = lorafuse) -> Any:
    """A 2-layer Llama with LoRA (DoRA) on five projections, from ``api``: lorafuse, or stock peft."""
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    config = api.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, init_lora_weights=False, use_dora=use_dora,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    return api.get_peft_model(model, config)


def _adapter_grads(model: Any) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _paths(model: Any) -> list:
    """``lorafuse_path`` of every LoRA layer: which path each one's last forward took."""
    return [m.lorafuse_path for m in model.modules() if isinstance(m, lorafuse.FusedLinear)]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_compiled_llama_fullgraph_matches_eager_with_dropout(use_dora: bool) -> None:
    """Training step (dropout 0.1): the compiled model's loss and every adapter gradient (DoRA's magnitudes too)
    equal eager mode's, with the same seeds drawn, both through the fused kernels (``lorafuse_path`` 'c' on
    every LoRA layer; DoRA compiled: x̃ from the `lorafuse::dropout_mask` operator); then inference under
    no_grad gives eager's logits."""
    model = _llama(0.1, use_dora)
    model.train()
    ids = torch.randint(0, 97, (2, 12))
    assert _paths(model) == [None] * 10
    compiled = torch.compile(model, fullgraph=True)  # first: nothing has run eagerly yet
    torch.manual_seed(1)
    with unless_stock_peft_fails_too(lambda: _llama(0.1, use_dora, pytest.importorskip("peft")).train(),
                                     input_ids=ids, labels=ids):
        loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    assert _paths(model) == ["c"] * 10
    grads = _adapter_grads(model)
    model.zero_grad(set_to_none=True)

    torch.manual_seed(1)
    eager_loss = model(input_ids=ids, labels=ids).loss
    eager_loss.backward()
    assert _paths(model) == ["c"] * 10
    eager_grads = _adapter_grads(model)
    assert len(eager_grads) == 2 * 5 * (3 if use_dora else 2)  # A, B (μ) of five projections in two layers
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    model.eval()
    with torch.no_grad():
        eager_logits = model(input_ids=ids).logits
        torch.testing.assert_close(compiled(input_ids=ids).logits, eager_logits, rtol=1e-5, atol=1e-5)


class _Functional(torch.nn.Module):
    """`lora_linear` on a trainable base (W and bias require grad: dW and db are formed)."""

    def __init__(self, k: int, m: int, r: int, fifo: bool) -> None:
        super().__init__()
        self.fifo = fifo
        self.weight = torch.nn.Parameter(torch.randn(k, m) if fifo else torch.randn(m, k))
        self.bias = torch.nn.Parameter(torch.randn(m))
        self.lora_a = torch.nn.Parameter(torch.randn(r, k) * 0.1)
        self.lora_b = torch.nn.Parameter(torch.randn(m, r) * 0.1)

    def forward(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        return torch.tanh(lora_linear(x, self.weight, self.bias, self.lora_a, self.lora_b, 1.5, 0.2, seed, self.fifo))


@pytest.mark.parametrize("fifo", [False, True])
def test_compiled_functional_with_trainable_base_matches_eager(fifo: bool) -> None:
    """x, W, bias, A and B gradients of a compiled `lora_linear` (an int seed, dropout 0.2)
    equal eager mode's, at a first shape and at a second one (recompiled with dynamic shapes)."""
    module = _Functional(33, 17, 4, fifo)
    compiled = torch.compile(module, fullgraph=True)
    for shape in ((3, 5, 33), (4, 7, 33)):
        x = torch.randn(*shape)
        results = []
        for run in (compiled, module):
            xx = x.clone().requires_grad_(True)
            run(xx, 7).square().sum().backward()
            results.append([xx.grad] + [p.grad.clone() for p in module.parameters()])
            module.zero_grad(set_to_none=True)
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_operators_refuse_bad_input_with_named_errors() -> None:
    """A wrong width, a float or multi-element seed, a dropout p of 1: TypeError / ValueError
    naming what was wrong, from the operator called directly and from a compiled caller."""
    x, W, A, B = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    seed = seed_tensor(0.0)
    op = torch.ops.lorafuse.lora_forward
    with pytest.raises(ValueError, match=r"W must have shape \(m, k\)"):
        op(x, torch.randn(6, 9), None, A, B, 1.0, 0.0, seed, False, True)
    with pytest.raises(TypeError, match="seed"):
        op(x, W, None, A, B, 1.0, 0.0, torch.zeros(1), False, True)
    with pytest.raises(ValueError, match="seed"):
        op(x, W, None, A, B, 1.0, 0.0, torch.zeros(2, dtype=torch.int64), False, True)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        op(x, W, None, A, B, 1.0, 1.0, seed, False, True)
    with pytest.raises(TypeError, match="seed"):
        torch.ops.lorafuse.lora_backward(torch.randn(4, 6), x, torch.randn(4, 2), W, A, B, 1.0, 0.0,
                                         torch.zeros(1), False, True)
    compiled = torch.compile(lambda a: lora_linear(a, torch.randn(6, 9), None, A, B, 1.0), fullgraph=True)
    with pytest.raises(ValueError, match=r"W must have shape \(m, k\)"):
        compiled(x)
