"""A size-1 dim's stride addresses no element: NumPy's contiguity flags ignore it and torch 2.6 and 2.7 export 1
there through DLPack (torch 2.13 the C-order value), so a one-token x (1, k) may arrive with any row stride,
and an (n, 1) operand with any column stride. Every such layout must give the contiguous layout's results
bit for bit — with dropout too, whose mask indexes x as a packed row (it refused them: LF_EINVAL)."""
from __future__ import annotations

import numpy as np
import pytest

from lorafuse import ops

SEED = 77


def _restrided(a: np.ndarray, size1_stride: int) -> np.ndarray:
    """A copy of the 2-D ``a`` whose size-1 dims have the element stride ``size1_stride`` (the others C order)."""
    rows, cols = a.shape
    base = np.zeros(rows * cols + abs(size1_stride) * 2 + 8, dtype=a.dtype)
    item = a.itemsize
    strides = (size1_stride * item if rows == 1 else cols * item, size1_stride * item if cols == 1 else item)
    view = np.lib.stride_tricks.as_strided(base[8:], shape=a.shape, strides=strides)
    view[...] = a
    return view


def _torch_restrided(t, size1_stride: int):
    """The torch twin of `_restrided` (any dtype; torch.empty_strided keeps the stride as given)."""
    import torch

    rows, cols = t.shape
    strides = (size1_stride if rows == 1 else cols, size1_stride if cols == 1 else 1)
    out = torch.empty_strided(t.shape, strides, dtype=t.dtype)
    out.copy_(t)
    assert out.stride() == strides
    return out


def _case(n: int, k: int, m: int, r: int):
    rng = np.random.default_rng(n * 1000 + k * 10 + m)
    f = np.float32
    return (rng.standard_normal((n, k)).astype(f), rng.standard_normal((m, k)).astype(f),
            rng.standard_normal((r, k)).astype(f), rng.standard_normal((m, r)).astype(f),
            rng.standard_normal(m).astype(f), rng.standard_normal((n, m)).astype(f))


def _run(x, W, A, B, bias, g, p: float):
    y, u = ops.lora_forward(x, W, A, B, 0.5, bias, dropout_p=p, seed=SEED)
    dx, dA, dB = ops.lora_backward(g, x, u, W, A, B, 0.5, dropout_p=p, seed=SEED)
    return [np.asarray(t) for t in (y, u, dx, dA, dB)]


SHAPES = [(1, 7, 33, 1), (1, 64, 33, 4), (5, 1, 9, 2), (1, 1, 3, 1)]


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("size1_stride", [1, 0, 100, -3])
@pytest.mark.parametrize("n, k, m, r", SHAPES)
def test_float32_arrays(n: int, k: int, m: int, r: int, size1_stride: int, p: float) -> None:
    x, W, A, B, bias, g = _case(n, k, m, r)
    want = _run(x, W, A, B, bias, g, p)
    got = _run(_restrided(x, size1_stride), W, A, _restrided(B, size1_stride), bias,
               _restrided(g, size1_stride), p)
    for name, a, b in zip(("y", "u", "dx", "dA", "dB"), want, got):
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("size1_stride", [1, 100])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("n, k, m, r", SHAPES)
def test_torch_tensors(n: int, k: int, m: int, r: int, dtype: str, size1_stride: int, p: float) -> None:
    """Half-precision x and W (fp32 adapters), as the torch layer hands them over through DLPack."""
    torch = pytest.importorskip("torch")
    dt = getattr(torch, dtype)
    x, W, A, B, bias, g = (torch.from_numpy(a) for a in _case(n, k, m, r))
    x, W, bias, g = x.to(dt), W.to(dt), bias.to(dt), g.to(dt)
    want = _run(x, W, A, B, bias, g, p)
    got = _run(_torch_restrided(x, size1_stride), W, A, _torch_restrided(B, size1_stride), bias,
               _torch_restrided(g, size1_stride), p)
    for name, a, b in zip(("y", "u", "dx", "dA", "dB"), want, got):
        np.testing.assert_array_equal(a, b, err_msg=name)
