"""The opt-in packed-W cache: `ops.pack_weight` + ``packed_w`` give the same bits as packing on
every call (every ISA, odd and zero-size shapes, strided and fan_in_fan_out W, dropout), match
the float64 reference, reject packs of another W; the cache of a lorafuse layer (`FusedLinear`,
built by `lorafuse.get_peft_model`) repacks when W changes, is cleared by PEFT's merge, never caches
a trainable W, and survives deepcopy and pickling."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest

from lorafuse import ops
from reference import backward, forward, rand
from tolerances import assert_within

SHAPES = [(1, 7, 33, 1), (7, 33, 257, 8), (33, 257, 7, 16), (64, 384, 96, 4), (19, 800, 130, 3), (600, 40, 72, 5)]


def _weights(rng, n, k, m, r, fifo, strided):
    """x (n,k), W as passed ((k,m) with fifo; a strided view when asked), A, B, g (n,m)."""
    W = rand(rng, k, m) if fifo else rand(rng, m, k)
    if strided:  # every other column of a wider array: a non-contiguous view read in place
        wide = rand(rng, W.shape[0], 2 * W.shape[1])
        wide[:, ::2] = W
        W = wide[:, ::2]
    return rand(rng, n, k), W, rand(rng, r, k), rand(rng, m, r), rand(rng, n, m)


def _run(x, W, A, B, g, fifo, p, pf=None, pb=None):
    y, u = ops.lora_forward(x, W, A, B, 0.5, None, dropout_p=p, seed=11, fan_in_fan_out=fifo, packed_w=pf)
    grads = ops.lora_backward(g, x, u, W, A, B, 0.5, dropout_p=p, seed=11, fan_in_fan_out=fifo, packed_w=pb)
    return (y, u) + tuple(grads)


@pytest.mark.parametrize("n,k,m,r", SHAPES)
@pytest.mark.parametrize("fifo,strided,p", [(False, False, 0.0), (True, False, 0.0), (False, True, 0.1),
                                             (True, True, 0.25)])
def test_packed_is_bit_identical_and_matches_reference(isa, n, k, m, r, fifo, strided, p):
    rng = np.random.default_rng(n * 1000 + k)
    x, W, A, B, g = _weights(rng, n, k, m, r, fifo, strided)
    pf = ops.pack_weight(W, fan_in_fan_out=fifo)
    pb = ops.pack_weight(W, fan_in_fan_out=fifo, for_backward=True)
    assert pf.nbytes >= 4 * m * k and pb.nbytes >= 4 * m * k and pb.for_backward and not pf.for_backward
    plain = _run(x, W, A, B, g, fifo, p)
    packed = _run(x, W, A, B, g, fifo, p, pf, pb)
    for name, a, b in zip(("y", "u", "dx", "dA", "dB"), plain, packed):
        assert np.array_equal(a, b), name
    Wmk = W.T if fifo else W
    mask = ops.dropout_mask(n, k, p, 11) if p else None
    ry, _, my, _ = forward(x, Wmk, A, B, 0.5, None, mask)
    assert_within(packed[0], ry, my, 2 * k + r + 4, "y")
    (rdx, rdA, rdB), (mdx, mdA, mdB) = backward(g, x, Wmk, A, B, 0.5, mask)
    assert_within(packed[2], rdx, mdx, 2 * m + r + 4, "dx")
    assert_within(packed[3], rdA, mdA, 2 * n + m + 4, "dA")
    assert_within(packed[4], rdB, mdB, 2 * n + k + 4, "dB")


@pytest.mark.parametrize("n,k,m,r", [(64, 384, 96, 4), (33, 1000, 257, 8)])
def test_pack_is_a_snapshot_that_the_kernels_read(isa, n, k, m, r):
    # proves the kept panels are what the GEMMs read: W changed behind the pack's back still
    # gives the packed W's results (the contract: repack after changing W)
    rng = np.random.default_rng(k)
    x, W, A, B, g = _weights(rng, n, k, m, r, False, False)
    before = _run(x, W, A, B, g, False, 0.0)
    pf, pb = ops.pack_weight(W), ops.pack_weight(W, for_backward=True)
    W *= 3.0
    stale = _run(x, W, A, B, g, False, 0.0, pf, pb)
    for name, a, b in zip(("y", "u", "dx", "dA", "dB"), before, stale):
        assert np.array_equal(a, b), name


def test_inference_forward_with_pack_matches_merged_path():
    # without u the kernels may merge s·B·A into W's panels; with a pack they use the kept panels
    rng = np.random.default_rng(5)
    x, W, A, B = rand(rng, 512, 896), rand(rng, 128, 896), rand(rng, 16, 896), rand(rng, 128, 16)
    y0, _ = ops.lora_forward(x, W, A, B, 2.0, need_u=False)
    y1, u1 = ops.lora_forward(x, W, A, B, 2.0, need_u=False, packed_w=ops.pack_weight(W))
    assert u1 is None
    ry, _, my, _ = forward(x, W, A, B, 2.0)
    assert_within(y1, ry, my, 2 * 896 + 16 + 4, "y")
    assert_within(y0, ry, my, 2 * 896 + 16 + 4, "y merged")


@pytest.mark.parametrize("n,k,m,r", [(0, 5, 7, 2), (4, 0, 7, 2), (4, 5, 0, 2), (4, 5, 7, 0)])
def test_zero_size_dims(n, k, m, r):
    rng = np.random.default_rng(3)
    x, W, A, B, g = _weights(rng, n, k, m, r, False, False)
    plain = _run(x, W, A, B, g, False, 0.0)
    packed = _run(x, W, A, B, g, False, 0.0, ops.pack_weight(W), ops.pack_weight(W, for_backward=True))
    for a, b in zip(plain, packed):
        assert a.shape == b.shape and np.array_equal(a, b)


def test_isa_changed_after_packing_still_correct():
    from lorafuse import _C
    from conftest import supported_isas

    rng = np.random.default_rng(8)
    x, W, A, B, g = _weights(rng, 40, 300, 70, 4, False, False)
    pf, pb = ops.pack_weight(W), ops.pack_weight(W, for_backward=True)
    before = _C.get_isa()
    try:
        for name in supported_isas():  # a pack made for another tile is ignored, not misread
            _C.set_isa(name)
            plain = _run(x, W, A, B, g, False, 0.0)
            packed = _run(x, W, A, B, g, False, 0.0, pf, pb)
            for a, b in zip(plain, packed):
                assert np.array_equal(a, b), name
    finally:
        _C.set_isa(before)


def test_pack_of_another_weight_or_direction_is_rejected():
    rng = np.random.default_rng(4)
    x, W, A, B, g = _weights(rng, 6, 20, 12, 2, False, False)
    pf, pb = ops.pack_weight(W), ops.pack_weight(W, for_backward=True)
    with pytest.raises(ValueError, match="packed_w was not packed from this W"):
        ops.lora_forward(x, W.copy(), A, B, 1.0, packed_w=pf)
    with pytest.raises(ValueError, match="for_backward=False"):
        ops.lora_forward(x, W, A, B, 1.0, packed_w=pb)
    y, u = ops.lora_forward(x, W, A, B, 1.0, packed_w=pf)
    with pytest.raises(ValueError, match="for_backward=True"):
        ops.lora_backward(g, x, u, W, A, B, 1.0, packed_w=pf)
    Wt = np.ascontiguousarray(W.T)  # same numbers, other layout: (k, m) with fan_in_fan_out
    with pytest.raises(ValueError, match="packed_w was not packed"):
        ops.lora_forward(x, Wt, A, B, 1.0, fan_in_fan_out=True, packed_w=pf)
    with pytest.raises(TypeError, match="packed_w must be a lorafuse.ops.PackedWeight"):
        ops.lora_forward(x, W, A, B, 1.0, packed_w=object())
    with pytest.raises(TypeError):
        ops.pack_weight("not an array")
    with pytest.raises(ValueError, match=r"W must have shape \(m, k\)"):
        ops.pack_weight(np.ones(5, np.float32))


# ------------------------------------------------------------------ the torch layer

torch = pytest.importorskip("torch")


class _Holder(torch.nn.Module):
    """A module whose one child ``proj`` is the LoRA target."""

    def __init__(self, proj: torch.nn.Module) -> None:
        super().__init__()
        self.proj = proj


def _fused_layer(base: torch.nn.Module, fifo: bool = False, dropout: float = 0.0):
    """The `FusedLinear` that `lorafuse.get_peft_model` puts on ``base`` (r 8, alpha 16; frozen base)."""
    from lorafuse import FusedLinear, LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, fan_in_fan_out=fifo, target_modules=["proj"])
    layer = get_peft_model(_Holder(base), config).base_model.model.proj
    assert isinstance(layer, FusedLinear) and layer.backend == "c"
    return layer


def _layer_pair(fifo: bool = False):
    """(plain, cached): the same layer (dropout 0.1, B ≠ 0) twice, the second with the packed-W cache on."""
    from lorafuse.layers import conv1d_class

    torch.manual_seed(0)
    plain = _fused_layer(conv1d_class()(80, 96) if fifo else torch.nn.Linear(96, 80), fifo, dropout=0.1)
    torch.nn.init.normal_(plain.lora_B["default"].weight)
    cached = copy.deepcopy(plain)
    cached.set_packed_weight_cache(True)
    return plain, cached


def _step(layer, x, g, seed):
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    assert layer.lorafuse_path == "c"  # the fused kernels ran (the cache is theirs)
    y.backward(g)
    grads = (x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad)
    layer.zero_grad()
    return (y.detach(),) + grads


@pytest.mark.parametrize("fifo", [False, True])
def test_layer_cache_bit_identical_and_repacks_when_w_changes(fifo):
    plain, cached = _layer_pair(fifo)
    x, g = torch.randn(3, 17, 96), torch.randn(3, 17, 80)
    assert cached.packed_weight_bytes == 0  # made on first use
    for a, b in zip(_step(plain, x, g, 1), _step(cached, x, g, 1)):
        assert torch.equal(a, b)
    assert cached.packed_weight_bytes >= 2 * 4 * 96 * 80
    packs = list(cached._weight_cache._packs)
    _step(cached, x, g, 1)  # W unchanged: the same packs serve the next step (nothing repacked)
    assert all(a is b for a, b in zip(packs, cached._weight_cache._packs))
    with torch.no_grad():  # an in-place change through autograd bumps the version: repacked
        plain.base_layer.weight.mul_(-2.0)
        cached.base_layer.weight.mul_(-2.0)
    for a, b in zip(_step(plain, x, g, 2), _step(cached, x, g, 2)):
        assert torch.equal(a, b)
    # a new Parameter with the same shape (load_state_dict(assign=True), a user swapping W): repacked
    new_w = torch.randn_like(plain.base_layer.weight)
    plain.base_layer.weight = torch.nn.Parameter(new_w.clone(), requires_grad=False)
    cached.base_layer.weight = torch.nn.Parameter(new_w.clone(), requires_grad=False)
    for a, b in zip(_step(plain, x, g, 3), _step(cached, x, g, 3)):
        assert torch.equal(a, b)
    cached.set_packed_weight_cache(False)
    assert cached.packed_weight_bytes == 0


def test_layer_cache_cleared_by_merge_and_skips_trainable_weights():
    plain, cached = _layer_pair()
    x, g = torch.randn(5, 96), torch.randn(5, 80)
    _step(cached, x, g, 0)
    assert cached.packed_weight_bytes > 0
    cached.merge()  # PEFT writes W through .data, behind the version counter: the cache must be dropped
    assert cached.packed_weight_bytes == 0
    cached.unmerge()
    plain.merge()
    plain.unmerge()
    for a, b in zip(_step(plain, x, g, 3), _step(cached, x, g, 3)):
        assert torch.equal(a, b)
    cached.base_layer.weight.requires_grad_(True)  # full fine-tuning: W changes every step
    cached.set_packed_weight_cache(True)
    _step(cached, x, g, 4)
    assert cached.packed_weight_bytes == 0


def test_layer_cache_under_inference_mode():
    # a layer built under inference_mode has inference tensors (no version counter): not cached,
    # still computed right; a normal layer called under inference_mode is cached
    plain, cached = _layer_pair()
    plain.eval()
    cached.eval()
    x = torch.randn(20, 96)
    with torch.inference_mode():
        assert torch.equal(plain(x), cached(x))
        assert cached.packed_weight_bytes > 0
        base = torch.nn.Linear(96, 80)
        inf = _fused_layer(base)
        inf.set_packed_weight_cache(True)
        assert base.weight.is_inference()
        y = inf(x)
        assert inf.lorafuse_path == "c" and inf.packed_weight_bytes == 0
        ref = torch.nn.functional.linear(x, base.weight, base.bias)  # B = 0 at init: y is the base alone
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_cache_declines_what_it_cannot_watch():
    from lorafuse.weight_cache import PackedWeightCache

    cache = PackedWeightCache()
    for w in (torch.randn(8, 6).to_sparse(), torch.randn(8, 6, dtype=torch.float64),
              torch.randn(8, 6, requires_grad=True), torch.randn(8, 6, device="meta")):
        assert cache.get(w, False, False) is None and cache.nbytes == 0
    w = torch.randn(8, 6)
    assert cache.get(w, False, False) is cache.get(w, False, False)  # kept while unchanged
    assert cache.get(w, True, False) is not None  # another layout: repacked


def test_layer_cache_survives_deepcopy_and_pickle():
    _, cached = _layer_pair()
    x, g = torch.randn(4, 96), torch.randn(4, 80)
    _step(cached, x, g, 0)
    clone = copy.deepcopy(cached)
    buf = io.BytesIO()
    torch.save(cached, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (clone, loaded):
        assert other.packed_weight_bytes == 0
        for a, b in zip(_step(cached, x, g, 5), _step(other, x, g, 5)):
            assert torch.equal(a, b)
        assert other.packed_weight_bytes > 0


def test_cache_packed_weights_on_a_llama_model_trains_identically():
    transformers = pytest.importorskip("transformers")
    from lorafuse import LoraConfig, cache_packed_weights, get_peft_model

    def build():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)
        model = transformers.LlamaForCausalLM(cfg)
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                lora_dropout=0.05))

    ids = torch.randint(0, 97, (2, 12))
    losses = []
    for use_cache in (False, True):
        model = build()
        if use_cache:
            assert cache_packed_weights(model) == 6
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        run = []
        torch.manual_seed(1)
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
        held = sum(m.packed_weight_bytes for m in model.modules() if hasattr(m, "packed_weight_bytes"))
        assert (held > 0) == use_cache
    assert losses[0] == losses[1]
