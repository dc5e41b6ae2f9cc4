"""Every entry point rejects bad input with TypeError/ValueError naming the argument — and
never reads or writes the wrong memory. Each case names the message fragment it expects."""
from __future__ import annotations

import numpy as np
import pytest

import lorafuse
from lorafuse import ops

n, k, m, r = 6, 5, 4, 2


def good():
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    return dict(x=f(n, k), W=f(m, k), A=f(r, k), B=f(m, r), bias=f(m), g=f(n, m), u=f(n, r))


def fwd(**over):
    a = good()
    a.update(over)
    return ops.lora_forward(a["x"], a["W"], a["A"], a["B"], a.pop("scale", 1.0), a["bias"],
                            **{key: a[key] for key in ("out", "u_out", "dropout_p", "seed") if key in a})


def bwd(**over):
    a = good()
    a.update(over)
    return ops.lora_backward(a["g"], a["x"], a["u"], a["W"], a["A"], a["B"], a.pop("scale", 1.0),
                             **{key: a[key] for key in ("dx_out", "dA_out", "dB_out", "dropout_p", "seed") if key in a})


def mrg(**over):
    a = good()
    a.update(over)
    return ops.merge(a["W"], a["A"], a["B"], a.pop("scale", 1.0))


def readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


G = good()
CASES = [
    # (entry, overrides, exception, message fragment)
    ("fwd", dict(x=G["x"].astype(np.float64)), TypeError, "x must be float32"),
    ("fwd", dict(W=G["W"].astype(np.int32)), TypeError, "W must be float32"),
    ("fwd", dict(A=np.array([[object()]])), TypeError, "A must be float32"),
    ("fwd", dict(B=[[1.0, 2.0]]), TypeError, "B must be a float32 numpy array"),
    ("fwd", dict(x=G["x"].astype(">f4")), TypeError, "native byte order"),
    ("fwd", dict(W=G["W"][None]), ValueError, "W must have shape (m, k)"),
    ("fwd", dict(x=np.array(3.0, dtype=np.float32)), ValueError, "x must have shape"),
    ("fwd", dict(A=np.ones((r, k + 1), np.float32)), ValueError, "A must have shape"),
    ("fwd", dict(B=np.ones((m + 1, r), np.float32)), ValueError, "B must have shape"),
    ("fwd", dict(B=np.ones((m, r + 1), np.float32)), ValueError, "B must have shape"),
    ("fwd", dict(bias=np.ones(m + 1, np.float32)), ValueError, "bias must have shape"),
    ("fwd", dict(scale="2"), TypeError, "scale must be a real number"),
    ("fwd", dict(scale=1j), TypeError, "scale must be a real number"),
    ("fwd", dict(dropout_p=1.0), ValueError, "dropout_p must be in [0, 1)"),
    ("fwd", dict(dropout_p=-0.1), ValueError, "dropout_p must be in [0, 1)"),
    ("fwd", dict(seed=-1), ValueError, "seed must be in [0, 2**64)"),
    ("fwd", dict(seed=1.5), TypeError, "seed must be an int"),
    ("fwd", dict(out=readonly(np.zeros((n, m), np.float32))), ValueError, "out is read-only"),
    ("fwd", dict(out=np.zeros((m, n), np.float32).T), ValueError, "out must be C-contiguous"),
    ("fwd", dict(out=np.zeros((n, m + 1), np.float32)), ValueError, "out must have shape"),
    ("fwd", dict(out=np.zeros((n, m), np.float64)), TypeError, "out must be float32"),
    ("fwd", dict(u_out=np.zeros((n, r + 1), np.float32)), ValueError, "u_out must have shape"),
    ("bwd", dict(g=G["g"].astype(np.float64)), TypeError, "g must be float32"),
    ("bwd", dict(u=G["u"].astype(np.float16)), TypeError, "u must be float32"),
    ("bwd", dict(g=np.ones((n, m + 1), np.float32)), ValueError, "g must have shape"),
    ("bwd", dict(g=np.ones((n + 1, m), np.float32)), ValueError, "g must have shape"),
    ("bwd", dict(u=np.ones((n, r + 1), np.float32)), ValueError, "u (..., r=2)"),
    ("bwd", dict(W=np.ones((m, k + 2), np.float32)), ValueError, "W must have shape"),
    ("bwd", dict(A=np.ones((r, k), np.float32)[None]), ValueError, "A must have shape (r, k)"),
    ("bwd", dict(scale=None), TypeError, "scale must be a real number"),
    ("bwd", dict(dropout_p=2.0), ValueError, "dropout_p must be in [0, 1)"),
    ("bwd", dict(dA_out=readonly(np.zeros((r, k), np.float32))), ValueError, "dA_out is read-only"),
    ("bwd", dict(dB_out=np.zeros((r, m), np.float32)), ValueError, "dB_out must have shape"),
    ("bwd", dict(dx_out=np.zeros((n, k), np.int64)), TypeError, "dx_out must be float32"),
    ("mrg", dict(W=readonly(G["W"])), ValueError, "W is read-only"),
    ("mrg", dict(W=np.asfortranarray(G["W"])), ValueError, "W must be C-contiguous"),
    ("mrg", dict(W=np.zeros((m, k + 1), np.float32)), ValueError, "W must have shape"),
    ("mrg", dict(W=G["W"].astype(np.float64)), TypeError, "W must be float32"),
    ("mrg", dict(A=G["A"].astype(np.float64)), TypeError, "A must be float32"),
    ("mrg", dict(A=np.ones(k, np.float32)), ValueError, "A must have shape (r, k)"),
    ("mrg", dict(B=np.ones((m, r + 1), np.float32)), ValueError, "B must have shape"),
    ("mrg", dict(B=np.ones((m + 1, r), np.float32)), ValueError, "W must have shape"),
    ("mrg", dict(scale=[1.0]), TypeError, "scale must be a real number"),
    ("mrg", dict(scale=True), TypeError, "scale must be a real number"),
    ("mrg", dict(W="weights"), TypeError, "W must be a float32 numpy array"),
]


@pytest.mark.parametrize("entry,over,exc,msg", CASES, ids=[f"{c[0]}-{c[3][:30]}" for c in CASES])
def test_bad_input_raises_clearly(entry, over, exc, msg):
    fn = {"fwd": fwd, "bwd": bwd, "mrg": mrg}[entry]
    with pytest.raises(exc) as info:
        fn(**over)
    assert msg in str(info.value), str(info.value)


def test_out_aliasing_an_input_is_rejected():
    a = good()
    buf = np.zeros((n, k + m), np.float32)
    x = buf[:, :k]
    x[...] = a["x"]
    with pytest.raises(ValueError, match="output out overlaps input x"):
        ops.lora_forward(x, a["W"], a["A"], a["B"], 1.0, out=buf.reshape(-1)[: n * m].reshape(n, m))


def test_backward_outputs_must_not_overlap_each_other():
    a = good()
    shared = np.zeros(r * k + m * r, np.float32)
    with pytest.raises(ValueError, match="overlap"):
        ops.lora_backward(a["g"], a["x"], a["u"], a["W"], a["A"], a["B"], 1.0,
                          dA_out=shared[: r * k].reshape(r, k), dB_out=shared[: m * r].reshape(m, r))


def test_merge_W_aliasing_A_is_rejected():
    W = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="overlaps input A"):
        ops.merge(W, W[:2], np.zeros((4, 2), np.float32), 1.0)


def test_misaligned_input_is_copied_not_misread():
    a = good()
    raw = np.zeros(n * k * 4 + 1, np.uint8)
    x = raw[1:].view(np.float32).reshape(n, k)   # 1-byte offset: unaligned float32
    x[...] = a["x"]
    assert not x.flags.aligned
    y, _ = ops.lora_forward(x, a["W"], a["A"], a["B"], 1.0)
    y2, _ = ops.lora_forward(a["x"], a["W"], a["A"], a["B"], 1.0)
    np.testing.assert_array_equal(y, y2)


def test_dropout_mask_bad_arguments():
    with pytest.raises(ValueError, match="dropout_p"):
        ops.dropout_mask(2, 2, 1.5, 0)
    with pytest.raises(TypeError, match="seed"):
        ops.dropout_mask(2, 2, 0.1, "s")
    with pytest.raises(ValueError):
        ops.dropout_mask(-1, 2, 0.1, 0)


def test_sgemm_bad_arguments():
    a = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="b must have shape"):
        ops.sgemm(a, np.ones((5, 2), np.float32))
    with pytest.raises(TypeError, match="a must be float32"):
        ops.sgemm(a.astype(np.float64), np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match="overlaps input a"):
        ops.sgemm(a[:, :3], np.ones((3, 3), np.float32), out=a.reshape(-1)[:9].reshape(3, 3))


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-3, ValueError), (2.0, TypeError), ("2", TypeError),
                                     (True, TypeError)])
def test_set_num_threads_validates(bad, exc):
    with pytest.raises(exc):
        lorafuse.set_num_threads(bad)


def test_torch_tensor_inputs_via_dlpack():
    torch = pytest.importorskip("torch")
    a = good()
    t = {key: torch.from_numpy(v.copy()) for key, v in a.items()}
    y, u = ops.lora_forward(t["x"], t["W"], t["A"], t["B"], 1.0, t["bias"])
    y2, u2 = ops.lora_forward(a["x"], a["W"], a["A"], a["B"], 1.0, a["bias"])
    np.testing.assert_array_equal(y, y2)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.lora_forward(t["x"].double(), t["W"], t["A"], t["B"], 1.0)
