"""lorafuse.cuda — fused LoRA forward / adapter-only backward for CUDA tensors (cuBLASLt).

The same contract as :mod:`lorafuse.ops` (docs/CONTRACTS.md), on torch CUDA tensors (or any
``__dlpack__`` object on a CUDA device, e.g. CuPy), float32, float16 or bfloat16 with float32
accumulation (float32 uses TF32 tensor cores only when torch allows it:
``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision``).
The adapters A, B (and so u, dA, dB) have x's dtype, or are float32 on a bfloat16 x and W — PEFT's
default for half-precision models; those fp32 operands enter bf16 tensor-core GEMMs as hi + lo
bf16 parts (kernels/cuda/lora_plan.h), so the rank-r math is fp32-accurate to ~2^-16.
Every kernel runs on torch's *current stream* of the tensors' device; nothing synchronises the host.

    y, u        = lora_forward(x, W, A, B, scale, bias=None, *, out=None, u_out=None,
                               dropout_p=0.0, seed=0, fan_in_fan_out=False)
    dx, dA, dB  = lora_backward(g, x, u, W, A, B, scale, *, need_dx=True, dropout_p=0.0, seed=0,
                                fan_in_fan_out=False, dx_out=None, dA_out=None, dB_out=None)
    mask        = dropout_mask(n, k, p, seed, device=...)      # exactly what the kernels apply

``lorafuse.autograd`` dispatches CUDA tensors here. The compiled part, ``lorafuse._C_cuda``, is
loaded lazily on first use, so ``import lorafuse`` (and this module) work on machines with no CUDA.
On a CPU-only build, ``lora_forward``/``lora_backward`` are absent (``hasattr`` is False, so the
autograd layer falls back to torch) and touching them raises an error that says how to get CUDA
support; ``cuda_info()`` says what was compiled in.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Tuple

import numpy as np

__all__ = [
    "CudaUnavailableError",
    "is_compiled",
    "is_available",
    "cuda_info",
    "cuda_lora_forward",
    "cuda_lora_backward",
    "dropout_mask",
    "reference_dropout_mask",
    "adapter_dtypes_fuse",
]

_HOW_TO = (
    "lorafuse was built without CUDA support{why}. To get it: install a CUDA toolkit >= 12 (nvcc) and "
    "cuBLASLt (`pip install nvidia-cublas` for CUDA 13, `nvidia-cublas-cu12` for CUDA 12 — a CUDA build of "
    "torch already has it), then rebuild lorafuse with `LORAFUSE_CUDA=1 pip install --no-build-isolation "
    "--force-reinstall --no-deps lorafuse` (from a source checkout: `LORAFUSE_CUDA=1 pip install "
    "--no-build-isolation .`). `python setup_cuda.py` in the source tree prints what the build finds."
)


class CudaUnavailableError(RuntimeError):
    """Raised when CUDA kernels are asked for but lorafuse._C_cuda cannot be used."""


_C: Any = None
_load_error: Optional[BaseException] = None
# Test seam: tests/test_cuda_build.py sets "cpu" together with a host stand-in for _C (built on the
# plan's reference backend) to check this module's pointer and size plumbing on machines with no GPU.
_DEVICE_TYPE = "cuda"


def _load() -> Any:
    """Import lorafuse._C_cuda once (after torch, whose CUDA build loads the same cuBLASLt)."""
    global _C, _load_error
    if _C is not None:
        return _C
    if _load_error is None:
        import importlib.util

        if importlib.util.find_spec(f"{__package__}._C_cuda") is None:
            _load_error = ModuleNotFoundError("lorafuse._C_cuda is not built")
        else:
            try:
                try:
                    import torch  # noqa: F401  (loads libcudart / libcublasLt from its nvidia-* wheels)
                except ImportError:
                    pass
                from . import _C_cuda  # type: ignore[attr-defined]
            except ImportError as exc:
                _load_error = exc
            else:
                _C = _C_cuda
                return _C
    missing = isinstance(_load_error, ModuleNotFoundError)
    why = "" if missing else f" (lorafuse._C_cuda is there but failed to load: {_load_error})"
    raise CudaUnavailableError(_HOW_TO.format(why=why))


def is_compiled() -> bool:
    """True when the CUDA extension is built and loads (a GPU is not needed for this)."""
    try:
        _load()
        return True
    except CudaUnavailableError:
        return False


def is_available() -> bool:
    """True when the CUDA extension loads and torch sees a CUDA device."""
    if not is_compiled():
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class CudaInfo(dict):
    """``cuda_info()``'s result: a dict, printed as one line by ``lorafuse.show_config()``."""

    def __str__(self) -> str:
        if not self.get("compiled"):
            return f"not compiled in ({self.get('reason', '')})"
        def ver(v: int) -> str:
            return f"{v // 1000}.{(v % 1000) // 10}" if v and v > 0 else "n/a"
        cl = self.get("cublaslt_runtime") or 0
        devs = self.get("device_count")
        dev = f"{devs} device(s)" if devs is not None and devs >= 0 else "no usable device"
        return (f"compiled in (archs {self['archs']}; nvcc {self['nvcc']}; CUDA runtime {ver(self['cudart_runtime'])}"
                f" (built {ver(self['cudart_compiled'])}); cuBLASLt {cl // 10000}.{(cl // 100) % 100}.{cl % 100}; "
                f"driver {ver(self['driver'])}; {dev}"
                + (f"; {self['fallback_gemms']} GEMM shape(s) on the fallback kernel"
                   if self.get("fallback_gemms") else "")
                + ")")


def cuda_info() -> CudaInfo:
    """What CUDA support this build has: compiled in?, arch list, CUDA runtime/driver and cuBLASLt versions,
    device count. Never raises."""
    try:
        C = _load()
    except CudaUnavailableError as exc:
        msg = str(exc)
        return CudaInfo(compiled=False, reason=msg.split(". To get it")[0].replace("lorafuse was ", ""),
                        how_to=msg)
    info = CudaInfo(compiled=True)
    info.update(C.versions())
    return info


# ---------------------------------------------------------------------------------------------- checks

def _torch():
    import torch

    return torch


_CODES: dict = {}  # torch dtype -> the kernels' dtype code, filled on first use


def _dtype_code(t: Any) -> int:
    if not _CODES:
        torch, C = _torch(), _load()
        _CODES.update({torch.float32: C.DTYPE_F32, torch.float16: C.DTYPE_F16, torch.bfloat16: C.DTYPE_BF16})
    code = _CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"lorafuse.cuda: x must be float32, float16 or bfloat16, got {t.dtype}")
    return code


def _as_tensor(name: str, obj: Any, optional: bool = False) -> Any:
    torch = _torch()
    if obj is None:
        if optional:
            return None
        raise TypeError(f"lorafuse.cuda: {name} is required, got None")
    if isinstance(obj, torch.Tensor):
        return obj
    if hasattr(obj, "__dlpack__"):
        return torch.from_dlpack(obj)
    raise TypeError(f"lorafuse.cuda: {name} must be a CUDA torch tensor or a __dlpack__ object, "
                    f"got {type(obj).__name__}")


def _check_same(name: str, t: Any, ref: Any, dtype: Any = None, what: str = "the dtype of x") -> None:
    """t on ref's device with dtype ``dtype`` (default: ref's)."""
    if t.device != ref.device:
        raise ValueError(f"lorafuse.cuda: {name} is on {t.device}, expected {ref.device} (the device of x)")
    want = ref.dtype if dtype is None else dtype
    if t.dtype != want:
        raise TypeError(f"lorafuse.cuda: {name} has dtype {t.dtype}, expected {want} ({what})")


def _check_shape(name: str, t: Any, shape: Tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"lorafuse.cuda: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _dense(name: str, t: Any) -> Any:
    """Contiguous version of a small or activation tensor (copies only when needed, never wrong)."""
    return t if t.is_contiguous() else t.contiguous()


def _output(name: str, given: Any, shape: Tuple[int, ...], ref: Any, dtype: Any = None) -> Any:
    """A contiguous output of ``shape`` on ref's device, dtype ``dtype`` (default ref's): ``given`` checked, or new."""
    torch = _torch()
    dtype = ref.dtype if dtype is None else dtype
    if given is None:
        return torch.empty(shape, dtype=dtype, device=ref.device)
    t = _as_tensor(name, given)
    _check_same(name, t, ref, dtype, "the dtype it is computed in")
    if t.numel() != int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"lorafuse.cuda: {name} must have {int(np.prod(shape))} elements (shape {tuple(shape)}), "
                         f"got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"lorafuse.cuda: {name} must be C-contiguous")
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"lorafuse.cuda: {name} requires grad; pass a plain buffer")
    return t


def _scalars(scale: Any, dropout_p: Any, seed: Any) -> Tuple[float, float, int]:
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"lorafuse.cuda: scale must be a float, got {type(scale).__name__}")
    p = float(dropout_p)
    p32 = float(np.float32(p))  # the kernels' threshold is computed from the float32 value (dropout_hash.h)
    if not (0.0 <= p < 1.0) or p32 >= 1.0:
        raise ValueError(f"lorafuse.cuda: dropout_p must be in [0, 1), got {dropout_p}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise ValueError(f"lorafuse.cuda: seed must be an int in [0, 2**64), got {seed!r}")
    return float(scale), p, int(seed)


def _allow_tf32(dtype: Any) -> int:
    torch = _torch()
    if dtype != torch.float32:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prec = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
        if prec == "tf32":
            return 1
        if prec == "ieee":
            return 0
        try:
            return int(torch.get_float32_matmul_precision() != "highest")
        except Exception:  # pragma: no cover - very old torch
            return int(bool(torch.backends.cuda.matmul.allow_tf32))


def _weight(W: Any, fan_in_fan_out: bool, x: Any) -> Tuple[Any, int, int]:
    """Returns (W as used, w_kxm flag, m). W is never copied: a transposed view of a contiguous matrix
    is read in place by flipping the GEMM's transpose."""
    _check_same("W", W, x)
    if W.dim() != 2:
        raise ValueError(f"lorafuse.cuda: W must be 2-D, got shape {tuple(W.shape)}")
    k = x.shape[-1]
    if fan_in_fan_out:
        if W.shape[0] != k:
            raise ValueError(f"lorafuse.cuda: W must be (k={k}, m) with fan_in_fan_out=True, got {tuple(W.shape)}")
        m = W.shape[1]
    else:
        if W.shape[1] != k:
            raise ValueError(f"lorafuse.cuda: W must be (m, k={k}), got {tuple(W.shape)}")
        m = W.shape[0]
    kxm = bool(fan_in_fan_out)
    if not W.is_contiguous():
        if W.t().is_contiguous():
            W, kxm = W.t(), not kxm  # same memory, the other layout
        else:
            raise ValueError("lorafuse.cuda: W must be contiguous (or the transpose of a contiguous matrix); "
                             "the frozen base weight is never copied")
    return W, int(kxm), m


def _stream(device: Any) -> int:
    """torch's current stream on ``device`` as a raw cudaStream_t (the private getter skips building a
    Stream object: a few µs per call, and the layer calls this twice per training step)."""
    if device.type != "cuda":
        return 0
    torch = _torch()
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return int(raw(device.index if device.index is not None else torch.cuda.current_device()))
    return int(torch.cuda.current_stream(device).cuda_stream)


# ---------------------------------------------------------------------------------------------- API

_PAIRS: set = set()  # (base dtype, adapter dtype) pairs the kernels take, filled on first use


def adapter_dtypes_fuse(dtype: Any, adapter_dtype: Any) -> bool:
    """True when these kernels take adapters of ``adapter_dtype`` on a base of ``dtype``: the same
    float dtype, or float32 adapters on bfloat16 (PEFT's default for a bf16 model). The one rule:
    `lorafuse.backend.kernels_for` and the layers ask it too."""
    if not _PAIRS:
        torch = _torch()
        _PAIRS.update({(t, t) for t in (torch.float32, torch.float16, torch.bfloat16)})
        _PAIRS.add((torch.bfloat16, torch.float32))
    return (dtype, adapter_dtype) in _PAIRS


def _layer_inputs(x: Any, W: Any, A: Any, B: Any, fan_in_fan_out: bool) -> tuple:
    """Checked (x, dtype code, adapter dtype code, k, W, w_kxm, m, A, B, r) shared by forward and
    backward: x (..., k) CUDA; W (m, k) or (k, m) of x's dtype; A (r, k) and B (m, r) of one dtype,
    x's or (bf16 x) float32; one device."""
    x = _as_tensor("x", x)
    if x.device.type != _DEVICE_TYPE:
        raise ValueError(f"lorafuse.cuda: x must be a CUDA tensor, got device {x.device}")
    code = _dtype_code(x)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"lorafuse.cuda: x must be (..., k) with k >= 1, got shape {tuple(x.shape)}")
    k = x.shape[-1]
    W, w_kxm, m = _weight(_as_tensor("W", W), fan_in_fan_out, x)
    A, B = _as_tensor("A", A), _as_tensor("B", B)
    _check_same("A", A, x, A.dtype)  # its device
    if not adapter_dtypes_fuse(x.dtype, A.dtype):
        raise TypeError(f"lorafuse.cuda: A has dtype {A.dtype}; the adapters must have x's dtype ({x.dtype}), "
                        "or be float32 on a bfloat16 x")
    _check_same("B", B, x, A.dtype, "the dtype of A")
    if A.dim() != 2 or A.shape[1] != k or A.shape[0] < 1:
        raise ValueError(f"lorafuse.cuda: A must be (r, k={k}) with r >= 1, got {tuple(A.shape)}")
    r = A.shape[0]
    _check_shape("B", B, (m, r))
    return x, code, _dtype_code(A), k, W, w_kxm, m, A, B, r


def _mixed_ws(C: Any, code: int, acode: int, n: int, k: int, m: int, r: int, backward: bool, x: Any) -> Any:
    """The mixed-dtype plan's workspace (bytes on x's device; None when A has x's dtype)."""
    if code == acode or n == 0:
        return None
    torch = _torch()
    return torch.empty(C.mixed_ws_bytes(code, acode, n, k, m, r, backward), dtype=torch.uint8, device=x.device)


def cuda_lora_forward(x: Any, W: Any, A: Any, B: Any, scale: float, bias: Any = None, *, out: Any = None,
                      u_out: Any = None, dropout_p: float = 0.0, seed: int = 0,
                      fan_in_fan_out: bool = False, need_u: bool = True) -> Tuple[Any, Any]:
    """u = drop(x)·Aᵀ (..., r); y = x·Wᵀ + bias + scale·u·Bᵀ (..., m). Returns (y, u), or (y, None)
    with ``need_u=False`` (u is still formed: the low-rank term is accumulated from it).

    x (..., k); W (m, k) — (k, m) with fan_in_fan_out —; A (r, k); B (m, r); bias (m,) or None; all CUDA
    tensors on one device with one dtype, except that A and B may be float32 on a bfloat16 x (u is then
    float32). out / u_out: optional preallocated contiguous outputs with n·m / n·r elements (returned as
    given); one that overlaps an input or the other is a ValueError from the C side, which calls them y and u."""
    C = _load()
    scale, p, seed = _scalars(scale, dropout_p, seed)
    x, code, acode, k, W, w_kxm, m, A, B, r = _layer_inputs(x, W, A, B, fan_in_fan_out)
    bias = _as_tensor("bias", bias, optional=True)
    if bias is not None:
        _check_same("bias", bias, x)
        _check_shape("bias", bias, (m,))
        bias = _dense("bias", bias)
    x2 = _dense("x", x).reshape(-1, k)
    n = x2.shape[0]
    A, B = _dense("A", A), _dense("B", B)
    lead = tuple(x.shape[:-1])
    y = _output("out", out, lead + (m,), x)
    u = _output("u_out", u_out, lead + (r,), x, A.dtype)
    # overlapping outputs (out = y, u_out = u) and inputs are refused by the C side (lorafuse/validate.h)
    xd = _torch().empty_like(x2) if p > 0.0 and n > 0 else None
    ws = _mixed_ws(C, code, acode, n, k, m, r, False, x)
    C.lora_forward(x.device.index or 0, _stream(x.device), code, acode, _allow_tf32(x.dtype), n, k, m, r, w_kxm,
                   scale, p, seed, x2.data_ptr(), W.data_ptr(), 0 if bias is None else bias.data_ptr(), A.data_ptr(),
                   B.data_ptr(), y.data_ptr(), u.data_ptr(), 0 if xd is None else xd.data_ptr(),
                   0 if ws is None else ws.data_ptr())
    return y, (u if need_u else None)


def cuda_lora_backward(g: Any, x: Any, u: Any, W: Any, A: Any, B: Any, scale: float, *, need_dx: bool = True,
                       dropout_p: float = 0.0, seed: int = 0, fan_in_fan_out: bool = False, dx_out: Any = None,
                       dA_out: Any = None, dB_out: Any = None) -> Tuple[Any, Any, Any]:
    """v = g·B; dB = scale·gᵀ·u (m, r); dA = scale·vᵀ·drop(x) (r, k); dx = g·W + scale·drop'(v·A) (..., k).

    g (..., m) = dL/dy; x (..., k) and u (..., r) as saved by forward; the same dropout_p and seed as forward.
    Returns (dx or None, dA, dB): dx in x's dtype, dA and dB in the adapters'. dW is never formed.
    dx_out / dA_out / dB_out: optional preallocated outputs; overlapping an input or each other is a
    ValueError from the C side (which calls them dx, dA, dB)."""
    C = _load()
    scale, p, seed = _scalars(scale, dropout_p, seed)
    x, code, acode, k, W, w_kxm, m, A, B, r = _layer_inputs(x, W, A, B, fan_in_fan_out)
    x2 = _dense("x", x).reshape(-1, k)
    n = x2.shape[0]
    g, u = _as_tensor("g", g), _as_tensor("u", u)
    _check_same("g", g, x)
    _check_same("u", u, x, A.dtype, "the dtype of A")
    if g.numel() != n * m or (g.dim() >= 1 and g.shape[-1] != m):
        raise ValueError(f"lorafuse.cuda: g must be (..., m={m}) with {n} rows like x, got {tuple(g.shape)}")
    if u.numel() != n * r or (u.dim() >= 1 and u.shape[-1] != r):
        raise ValueError(f"lorafuse.cuda: u must be (..., r={r}) with {n} rows like x, got {tuple(u.shape)}")
    g2 = _dense("g", g).reshape(n, m)
    u2 = _dense("u", u).reshape(n, r)
    A, B = _dense("A", A), _dense("B", B)
    torch = _torch()
    dx = _output("dx_out", dx_out, tuple(x.shape), x) if need_dx else None
    dA = _output("dA_out", dA_out, (r, k), x, A.dtype)
    dB = _output("dB_out", dB_out, (m, r), x, A.dtype)
    # overlapping outputs (dx_out = dx, dA_out = dA, dB_out = dB) and inputs are refused by the C side
    v_ws = torch.empty((max(n, 1), r), dtype=x.dtype, device=x.device) if code == acode else None
    xd = torch.empty_like(x2) if p > 0.0 and n > 0 else None
    ws = _mixed_ws(C, code, acode, n, k, m, r, True, x)
    C.lora_backward(x.device.index or 0, _stream(x.device), code, acode, _allow_tf32(x.dtype), n, k, m, r, w_kxm,
                    scale, p, seed, g2.data_ptr(), x2.data_ptr(), u2.data_ptr(), W.data_ptr(), A.data_ptr(),
                    B.data_ptr(), 0 if dx is None else dx.data_ptr(), dA.data_ptr(), dB.data_ptr(),
                    0 if xd is None else xd.data_ptr(), 0 if v_ws is None else v_ws.data_ptr(),
                    0 if ws is None else ws.data_ptr())
    return dx, dA, dB


def dropout_mask(n: int, k: int, p: float, seed: int, *, device: Any = "cuda", dtype: Any = None) -> Any:
    """(n, k) tensor of 0 or 1/(1-p) on a CUDA device: exactly the mask the CUDA kernels apply
    (and the CPU kernels: lorafuse/dropout_hash.h)."""
    C = _load()
    torch = _torch()
    _, p, seed = _scalars(1.0, p, seed)
    dtype = torch.float32 if dtype is None else dtype
    out = torch.ones((int(n), int(k)), dtype=dtype, device=device)
    if out.device.type != "cuda":
        raise ValueError(f"lorafuse.cuda.dropout_mask: device must be a CUDA device, got {out.device}")
    C.dropout(out.device.index, _stream(out.device), _dtype_code(out), int(n), int(k), p, seed, 1.0,
              out.data_ptr(), out.data_ptr())
    return out


def reference_dropout_mask(n: int, k: int, p: float, seed: int) -> np.ndarray:
    """Pure-NumPy copy of lorafuse/dropout_hash.h: (n, k) float32 mask of 0 or 1/(1-p). For tests."""
    p32 = np.float32(p)
    threshold = np.uint64(int(np.ceil(float(p32) * 16777216.0)))
    keep = np.float32(1.0) / (np.float32(1.0) - p32)
    with np.errstate(over="ignore"):
        idx = np.arange(int(n) * int(k), dtype=np.uint64)
        z = (np.uint64(seed) ^ idx) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    mask = np.where((z >> np.uint64(40)) >= threshold, keep, np.float32(0.0)).astype(np.float32)
    return mask.reshape(int(n), int(k))


# `lorafuse.backend.kernels_for` looks for `lora_forward` / `lora_backward` (the `lorafuse.ops` names).
# They resolve only when the extension loads, so that `hasattr` is False on CPU-only builds and the
# autograd layer falls back to torch there; touching them on such a build explains how to get CUDA.
_KERNELS = {"lora_forward": cuda_lora_forward, "lora_backward": cuda_lora_backward}


def __getattr__(name: str) -> Any:
    if name in _KERNELS:
        try:
            _load()
        except CudaUnavailableError as exc:
            raise AttributeError(f"lorafuse.cuda.{name} is unavailable: {exc}") from None
        fn = _KERNELS[name]
        globals()[name] = fn  # later lookups skip __getattr__
        return fn
    raise AttributeError(f"module 'lorafuse.cuda' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_KERNELS))
