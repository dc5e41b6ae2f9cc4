"""The float32 DoRA layer's pass over the upstream gradient (`ops.dora_grad_scale`: kernels/cpu/col_scale.c's
lf_dora_grad_f32) against NumPy:

    g' = g ⊙ c          one float32 product per element: equal, bit for bit, to NumPy's float32 g * c
    dc = Σ_i g ⊙ z      float32 sums over the n rows: within tests/tolerances.py's bound of the float64 sum

on every fp32 ISA (the `isa` fixture: the per-ISA cols_dot_scale), odd sizes (1, 7, 33, 257), zero sizes, lead
dims, strided and transposed g, a strided z, one and two threads, torch tensors, and bad input."""
from __future__ import annotations

import numpy as np
import pytest

from lorafuse import _C, ops
from tolerances import assert_within


def operands(n: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, m)).astype(np.float32)
    c = (rng.random(m) + 0.5).astype(np.float32)
    z = rng.standard_normal((n, m)).astype(np.float32)
    return g, c, z


def check(g: np.ndarray, c: np.ndarray, z: np.ndarray) -> None:
    """g' equal to g * c in float32, dc within the n-term bound of the float64 column sums of g ⊙ z."""
    gs, dc = ops.dora_grad_scale(g, c, z)
    assert gs.shape == g.shape and gs.dtype == np.float32 and gs.flags.c_contiguous
    assert np.array_equal(gs, g * c)
    m = g.shape[-1]
    g2, z2 = g.reshape(-1, m).astype(np.float64), z.reshape(-1, m).astype(np.float64)
    assert dc.shape == (m,) and dc.dtype == np.float32
    assert_within(dc, (g2 * z2).sum(0), np.abs(g2 * z2).sum(0), g2.shape[0], "dc")
    gs_only, none = ops.dora_grad_scale(g, c)
    assert none is None and np.array_equal(gs_only, gs)


@pytest.mark.parametrize("n,m", [(1, 1), (1, 257), (7, 33), (33, 7), (257, 33), (300, 1000)])
def test_matches_numpy(isa, n, m):
    check(*operands(n, m, n * 1000 + m))


def test_lead_dims_and_strides(isa):
    g, c, z = operands(2 * 5 * 7, 2 * 33, 3)
    check(g.reshape(2, 5, 7, 66), c, z.reshape(2, 5, 7, 66))
    gs, cs, zs = g[::2, ::2], c[::2], z[::2, ::2]  # every other row and column of g and z, a strided c
    assert not gs.flags.c_contiguous and not cs.flags.c_contiguous
    check(gs, cs, zs)
    gt = np.ascontiguousarray(g[:, :35].T).T  # column-major g (35 columns), read down its columns
    check(gt, c[:35], z[:, :35])


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_give_the_sums_in_bound(threads):
    before = _C.get_num_threads()
    _C.set_num_threads(threads)
    try:
        check(*operands(1031, 129, 7))
    finally:
        _C.set_num_threads(before)


@pytest.mark.parametrize("n,m", [(0, 5), (5, 0), (0, 0)])
def test_zero_sizes(n, m):
    g, c, z = operands(n, m, 11)
    gs, dc = ops.dora_grad_scale(g, c, z)
    assert gs.shape == (n, m) and dc.shape == (m,) and not dc.any()


def test_torch_tensors_and_nan():
    torch = pytest.importorskip("torch")
    g, c, z = (torch.from_numpy(a) for a in operands(9, 17, 5))
    g[4, 3] = float("nan")
    gs, dc = ops.dora_grad_scale(g, c, z)
    assert np.array_equal(gs, (g * c).numpy(), equal_nan=True)
    assert np.isnan(dc[3]) and np.isfinite(np.delete(dc, 3)).all()


def test_bad_input_named():
    g, c, z = operands(4, 6, 1)
    with pytest.raises(TypeError, match="dora_grad_scale: g"):
        ops.dora_grad_scale(g.astype(np.float64), c, z)
    with pytest.raises(ValueError, match="col_scale"):
        ops.dora_grad_scale(g, c[:-1], z)
    with pytest.raises(ValueError, match="col_scale"):
        ops.dora_grad_scale(g, c.reshape(2, 3), z)
    with pytest.raises(ValueError, match="z must have g's shape"):
        ops.dora_grad_scale(g, c, z[:-1])
    with pytest.raises(ValueError, match="z must have g's shape"):
        ops.dora_grad_scale(g, c, z.reshape(4, 2, 3))
    with pytest.raises(TypeError, match="dora_grad_scale: z"):
        ops.dora_grad_scale(g, c, z.astype(np.float16))
    with pytest.raises(ValueError, match="g"):
        ops.dora_grad_scale(np.array(1.0, dtype=np.float32), c, None)  # 0-d: no m axis
