"""Shared fixtures: every ISA the CPU supports, and per-test seeding."""
from __future__ import annotations

import random

import numpy as np
import pytest

ISAS = ["generic", "avx2", "avx512", "avx512_bf16"]


def supported_isas() -> list:
    from lorafuse import _C

    best = ISAS.index(_C.cpu_isa())
    return ISAS[: best + 1]


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test once per micro-kernel ISA, forcing it; skip ISAs this CPU lacks."""
    from lorafuse import _C

    if request.param not in supported_isas():
        pytest.skip(f"CPU lacks {request.param} (best: {_C.cpu_isa()})")
    before = _C.get_isa()
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa(before)


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
