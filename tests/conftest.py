"""Shared fixtures: every ISA the CPU supports, and per-test seeding."""
from __future__ import annotations

import random

import numpy as np
import pytest

ISAS = ["generic", "avx2", "avx512", "avx512_bf16", "amx_bf16"]


def supported_isas() -> list:
    from lorafuse import _C

    best = ISAS.index(_C.cpu_isa())
    return ISAS[: best + 1]


def _forced_isa(name: str):
    """Force ISA `name` for one test (skipped where the CPU lacks it), restoring the ISA after."""
    from lorafuse import _C

    if name not in supported_isas():
        pytest.skip(f"CPU lacks {name} (best: {_C.cpu_isa()})")
    before = _C.get_isa()
    _C.set_isa(name)
    yield name
    _C.set_isa(before)


# the fp32 kernels: avx512_bf16 and amx_bf16 run AVX-512's fp32 tables and kernels, so fp32 tests stop at
# avx512 (tests/test_runtime.py still checks every level, those two included, gives the same results)
@pytest.fixture(params=ISAS[:3])
def isa(request):
    """Run the test once per fp32 micro-kernel ISA, forcing it; skip ISAs this CPU lacks."""
    yield from _forced_isa(request.param)


@pytest.fixture(params=ISAS)
def half_isa(request):
    """Every ISA level, avx512_bf16 (the vdpbf16ps tile) and amx_bf16 (AMX tiles) included: for the
    half-precision kernels."""
    yield from _forced_isa(request.param)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    try:
        import torch
    except ImportError:
        yield
        return
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A tiny Llama checkpoint (random weights, fp32, vocabulary tests/test_qlora.py's VOCAB = 61) on disk, for
    transformers to load quantized (tests/test_qlora.py, tests/test_qlora_int8.py). Every in_features a multiple
    of the 4-bit block (64): where a block straddles rows bitsandbytes' CPU dequantization reads the wrong
    block's scale (tests/test_quant4.py), which lorafuse does not copy."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path
