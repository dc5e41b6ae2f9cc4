"""The CUDA binding's own argument checks, on machines with or without a GPU.

lorafuse._C_cuda takes raw addresses and sizes; its C side (the plan's check_forward / check_backward
in kernels/cuda/lora_plan.h, on lorafuse/validate.h) refuses what those show before anything touches a
device, and csrc/status_py.h turns LF_EINVAL into a ValueError naming the argument. The calls below
pass made-up addresses that are never dereferenced: each one is refused first. Needs the compiled
extension (built here whenever nvcc is found); no GPU.
"""
from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("lorafuse._C_cuda") is None:
    pytest.skip("lorafuse._C_cuda is not built (no nvcc / cuBLASLt at build time)", allow_module_level=True)
try:
    import lorafuse.cuda as lc

    C = lc._load()
except Exception as exc:  # built but cannot load (e.g. no cuBLASLt library on this machine)
    pytest.skip(f"lorafuse._C_cuda is built but does not load: {exc}", allow_module_level=True)

F32, F16, BF16 = C.DTYPE_F32, C.DTYPE_F16, C.DTYPE_BF16
N, K, M, R = 4, 8, 8, 2
# distinct, 64 KiB-apart, aligned made-up device addresses: valid but for the one argument a case spoils
FWD = dict(device=0, stream=0, dtype=F32, adtype=F32, tf32=0, n=N, k=K, m=M, r=R, w_kxm=0, scale=1.0, p=0.0,
           seed=0, x=1 << 16, W=2 << 16, bias=0, A=3 << 16, B=4 << 16, y=5 << 16, u=6 << 16, xdrop=0, mixed=0)
BWD = dict(device=0, stream=0, dtype=F32, adtype=F32, tf32=0, n=N, k=K, m=M, r=R, w_kxm=0, scale=1.0, p=0.0,
           seed=0, g=1 << 16, x=2 << 16, u=3 << 16, W=4 << 16, A=5 << 16, B=6 << 16, dx=7 << 16, dA=8 << 16,
           dB=9 << 16, xdrop=0, vws=10 << 16, mixed=0)


def _refused(fn, args, match):
    with pytest.raises(ValueError, match=match) as info:
        fn(*args.values())
    assert not isinstance(info.value, C.CudaError)
    return str(info.value)


@pytest.mark.parametrize("change,match", [
    (dict(x=0), r"x is NULL$"),
    (dict(y=(1 << 16) + 64), r"output y overlaps input x"),                   # y inside x's n*k*4 bytes
    (dict(u=(3 << 16) + 32), r"output u overlaps input A"),
    (dict(n=2**40, k=2**40), r"n\*k = 1099511627776\*1099511627776 elements overflow int64"),
    (dict(m=2**62), r"m\*k = .* overflow int64"),
    (dict(A=(3 << 16) + 2), r"A \(address 0x30002\) is not aligned to 4 bytes"),
    (dict(dtype=F16, adtype=F16, B=(4 << 16) + 1), r"B \(address 0x40001\) is not aligned to 2 bytes"),
    (dict(dtype=7), r"dtype: unknown dtype code 7"),
    (dict(adtype=-1), r"adapter_dtype: unknown dtype code -1"),
    (dict(p=1.0), r"dropout_p must be in \[0, 1\), got 1"),
    (dict(p=0.99999999), r"dropout_p must be in \[0, 1\)"),                  # 1.0 as a float32
    (dict(p=float("nan")), r"dropout_p"),
    (dict(p=0.3), r"xdrop_ws is NULL \(dropout_p > 0 needs the n\*k workspace\)"),
    (dict(dtype=BF16, adtype=F32), r"mixed_ws is NULL"),
    (dict(dtype=F16, adtype=F32), r"adapter_dtype 0 with dtype 1: .* float32 adapters on a bfloat16 base"),
    (dict(n=-1), r"n must be >= 0, got -1"),
    (dict(r=0), r"r must be >= 1, got 0"),
    (dict(device=-1), r"device must be >= 0"),
    (dict(W=2**64 - 4), r"W \(address 0xfffffffffffffffc, 256 bytes\) runs past the end"),
])
def test_forward_refuses_before_the_device(change, match):
    _refused(C.lora_forward, {**FWD, **change}, "lorafuse CUDA lora_forward: " + match)


@pytest.mark.parametrize("change,match", [
    (dict(dA=0), r"dA is NULL"),
    (dict(n=0, dB=0), r"dB is NULL"),                          # written even with no rows (zeroed)
    (dict(W=0), r"W is NULL \(dx needs W\)"),
    (dict(vws=0), r"v_ws is NULL"),
    (dict(dx=(1 << 16) + 4), r"output dx overlaps input g"),
    (dict(dB=(8 << 16) + 16), r"output dA overlaps output dB"),
    (dict(vws=(2 << 16) + 8), r"output v_ws overlaps input x"),
    (dict(p=0.5, xdrop=9 << 16), r"output dB overlaps output xdrop_ws"),
    (dict(g=(1 << 16) + 2), r"g \(address 0x10002\) is not aligned"),
    (dict(dtype=BF16, adtype=F32, vws=0, mixed=(11 << 16) + 2), r"mixed_ws \(address 0xb0002\) is not aligned"),
])
def test_backward_refuses_before_the_device(change, match):
    _refused(C.lora_backward, {**BWD, **change}, "lorafuse CUDA lora_backward: " + match)


def test_backward_needs_neither_w_nor_workspaces_it_does_not_use():
    # no dx: W may be NULL; mixed adapters: no v_ws; n = 0: no row operand at all. Only the device is then
    # missing (CudaError without a GPU); with a GPU these addresses would be used, so stop here.
    if lc.cuda_info().get("device_count", 0) > 0:
        pytest.skip("a GPU is present: valid arguments would launch on the made-up addresses")
    for change in (dict(dx=0, W=0), dict(n=0, g=0, x=0, u=0, dx=0, vws=0)):
        with pytest.raises(C.CudaError):
            C.lora_backward(*{**BWD, **change}.values())


def test_dropout_and_mixed_ws_bytes_refuse_bad_arguments():
    def drop(**change):
        a = dict(device=0, stream=0, dtype=F32, rows=4, cols=8, p=0.5, seed=0, extra=1.0, src=1 << 16, dst=2 << 16)
        return {**a, **change}

    _refused(C.dropout, drop(dst=(1 << 16) + 4), r"lorafuse CUDA dropout: output dst overlaps input src")
    _refused(C.dropout, drop(dst=0), r"dst is NULL")
    _refused(C.dropout, drop(p=1.0), r"p must be in \[0, 1\)")
    _refused(C.dropout, drop(rows=2**40, cols=2**40), r"rows\*cols .* overflow int64")
    _refused(C.dropout, drop(dtype=3), r"dtype: unknown dtype code 3")
    with pytest.raises(ValueError, match=r"mixed_ws_bytes: adapter_dtype: unknown dtype code 9"):
        C.mixed_ws_bytes(BF16, 9, N, K, M, R, False)
    with pytest.raises(ValueError, match=r"mixed_ws_bytes: k must be >= 1"):
        C.mixed_ws_bytes(BF16, F32, N, 0, M, R, False)
    assert C.mixed_ws_bytes(BF16, F32, N, K, M, R, True) > C.mixed_ws_bytes(BF16, BF16, N, K, M, R, True) == 0
