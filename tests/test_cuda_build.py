"""The CUDA backend, checked on machines WITHOUT a GPU (CI included).

1. The GEMM plan (kernels/cuda/lora_plan.h) — every transpose and leading dimension the cuBLASLt
   backend passes — runs on a naive host backend (kernels/cuda/plan_reference.cpp, built here with
   g++) and is compared with a float64 NumPy reference of docs/CONTRACTS.md. Needs only g++.
2. The dropout hash (kernels/include/lorafuse/dropout_hash.h) compiled by g++, its NumPy copy in
   lorafuse.cuda, and the CPU kernels' lorafuse.ops.dropout_mask give the same mask.
3. Whenever nvcc (CUDA >= 12) is on the machine — GPU or not — the CUDA extension is built through
   setup_cuda.py's own hook (nvcc for sm_80 + sm_90 + PTX, then the C compiler and the linker) into a
   temporary folder. Without cuBLASLt headers (the toolkit on CI's machine has none: they ship in
   the 400+ MB nvidia-cublas wheel, which .ci/run installs where nvcc 13 is found), the .cu is
   compiled against kernels/cuda/cublaslt_decls.h and the link leaves the cuBLASLt symbols
   undefined; with them, the real header is used, the module is imported in a subprocess and its
   error path is exercised, and cublaslt_decls.h is proven equal to the real header
   (static_asserts in kernels/cuda/check_cublaslt_decls.cu).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import setup_cuda  # noqa: E402  (repository root)

GXX = shutil.which("g++") or shutil.which("c++")
F32, BF16 = 0, 2  # lf_cuda_dtype codes (kernels/include/lorafuse/cuda_kernels.h)
LF_EINVAL = -1  # kernels/include/lorafuse/status.h


# ------------------------------------------------------------------------------------ reference lib

@pytest.fixture(scope="module")
def ref_lib(tmp_path_factory):
    if not GXX:
        pytest.skip("no C++ compiler (g++) to build the host reference backend")
    out = tmp_path_factory.mktemp("plan") / "libplanref.so"
    cmd = [GXX, "-O2", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
           f"-I{ROOT / 'kernels' / 'include'}", f"-I{ROOT / 'kernels' / 'cuda'}",
           str(ROOT / "kernels" / "cuda" / "plan_reference.cpp"), "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(str(out))
    i64, f32, f64, u64, i32 = ctypes.c_int64, ctypes.c_float, ctypes.c_double, ctypes.c_uint64, ctypes.c_int
    vp = ctypes.c_void_p
    lib.lf_ref_forward.argtypes = [i32, i32, i64, i64, i64, i64, i32, f32, f64, u64] + [vp] * 9
    lib.lf_ref_backward.argtypes = [i32, i32, i64, i64, i64, i64, i32, f32, f64, u64] + [vp] * 12
    lib.lf_ref_mixed_ws_bytes.argtypes = [i32, i32, i64, i64, i64, i64, i32]
    lib.lf_ref_mixed_ws_bytes.restype = ctypes.c_size_t
    lib.lf_ref_dropout_mask.argtypes = [i64, i64, f64, u64, vp]
    lib.lf_ref_forward.restype = lib.lf_ref_backward.restype = i32
    lib.lf_ref_last_error.restype = ctypes.c_char_p
    return lib


def _p(a):
    return None if a is None else a.ctypes.data_as(ctypes.c_void_p)


def _np_mask(n, k, p, seed):
    """float64 mask via the NumPy copy of the hash (lorafuse.cuda.reference_dropout_mask)."""
    from lorafuse.cuda import reference_dropout_mask

    return reference_dropout_mask(n, k, p, seed).astype(np.float64)


def _reference(x, W, bias, A, B, s, p, seed, g):
    """float64 LoRA forward/backward (DESIGN.md §1)."""
    n, k = x.shape
    mask = _np_mask(n, k, p, seed) if p > 0 else np.ones((n, k))
    xd = x * mask
    u = xd @ A.T
    y = x @ W.T + s * u @ B.T + (0 if bias is None else bias)
    v = g @ B
    dB = s * g.T @ u
    dA = s * v.T @ xd
    dx = g @ W + s * (v @ A) * mask
    return y, u, dx, dA, dB


SHAPES = [  # n, k, m, r
    (6, 16, 12, 4),
    (1, 13, 7, 1),     # n = 1, r = 1, k not a multiple of 8
    (9, 21, 5, 3),     # m < r·2, odd everything
    (17, 8, 33, 8),
]


@pytest.mark.parametrize("n,k,m,r", SHAPES)
@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_plan_matches_float64_reference(ref_lib, n, k, m, r, fifo, with_bias, p):
    rng = np.random.default_rng(n * 1000 + k * 10 + m + r)
    f = np.float32
    x, W, A, B = (rng.standard_normal(s).astype(f) for s in ((n, k), (m, k), (r, k), (m, r)))
    bias = rng.standard_normal(m).astype(f) if with_bias else None
    g = rng.standard_normal((n, m)).astype(f)
    s, seed = 0.75, 1234567
    Wst = np.ascontiguousarray(W.T) if fifo else W
    y, u = np.full((n, m), np.nan, f), np.full((n, r), np.nan, f)
    xd = np.empty((n, k), f)
    st = ref_lib.lf_ref_forward(F32, F32, n, k, m, r, int(fifo), s, p, seed, _p(x), _p(Wst), _p(bias), _p(A), _p(B),
                                _p(y), _p(u), _p(xd), None)
    assert st == 0, ref_lib.lf_ref_last_error()
    dx, dA, dB = np.full((n, k), np.nan, f), np.full((r, k), np.nan, f), np.full((m, r), np.nan, f)
    v = np.empty((n, r), f)
    st = ref_lib.lf_ref_backward(F32, F32, n, k, m, r, int(fifo), s, p, seed, _p(g), _p(x), _p(u), _p(Wst), _p(A),
                                 _p(B), _p(dx), _p(dA), _p(dB), _p(xd), _p(v), None)
    assert st == 0, ref_lib.lf_ref_last_error()
    d = lambda a: a.astype(np.float64)  # noqa: E731
    ry, ru, rdx, rdA, rdB = _reference(d(x), d(W), None if bias is None else d(bias), d(A), d(B), s, p, seed, d(g))
    # The host backend accumulates in double and rounds each GEMM's output to float32 (as cuBLASLt rounds
    # to the output dtype), so every result is within a few float32 ulps of the float64 reference.
    for name, got, ref in (("y", y, ry), ("u", u, ru), ("dx", dx, rdx), ("dA", dA, rdA), ("dB", dB, rdB)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(ref).max()), err_msg=name)


def test_plan_n_zero_zeroes_grads(ref_lib):
    k, m, r = 5, 4, 2
    f = np.float32
    W, A, B = np.ones((m, k), f), np.ones((r, k), f), np.ones((m, r), f)
    x, g, u = np.empty((0, k), f), np.empty((0, m), f), np.empty((0, r), f)
    dA, dB = np.full((r, k), 7, f), np.full((m, r), 7, f)
    st = ref_lib.lf_ref_backward(F32, F32, 0, k, m, r, 0, 1.0, 0.0, 0, _p(g), _p(x), _p(u), _p(W), _p(A), _p(B),
                                 None, _p(dA), _p(dB), None, None, None)
    assert st == 0, ref_lib.lf_ref_last_error()
    assert not dA.any() and not dB.any()


def test_plan_rejects_bad_arguments(ref_lib):
    f = np.float32
    a = np.ones((4, 4), f)
    st = ref_lib.lf_ref_forward(F32, F32, 2, 4, 4, 2, 0, 1.0, 1.0, 0, *[_p(a)] * 9)
    assert st == LF_EINVAL and b"dropout_p" in ref_lib.lf_ref_last_error()
    st = ref_lib.lf_ref_forward(F32, F32, 2, 4, 4, 0, 0, 1.0, 0.0, 0, *[_p(a)] * 9)
    assert st == LF_EINVAL and b"r must be" in ref_lib.lf_ref_last_error()
    st = ref_lib.lf_ref_forward(F32, BF16, 2, 4, 4, 2, 0, 1.0, 0.0, 0, *[_p(a)] * 9)  # bf16 adapters on fp32
    assert st == LF_EINVAL and b"float32 adapters on a bfloat16 base" in ref_lib.lf_ref_last_error()
    st = ref_lib.lf_ref_forward(BF16, F32, 2, 4, 4, 2, 0, 1.0, 0.0, 0, *[_p(a)] * 8, None)  # no workspace
    assert st == LF_EINVAL and b"mixed_ws is NULL" in ref_lib.lf_ref_last_error()
    # the operand checks (lorafuse/validate.h) run in the plan, so this backend refuses what the GPU one does
    st = ref_lib.lf_ref_forward(F32, F32, 2, 4, 4, 2, 0, 1.0, 0.0, 0, *[_p(a)] * 9)  # y written over x
    assert st == LF_EINVAL and b"output y overlaps input x" in ref_lib.lf_ref_last_error()
    x, W, A, B, y, u = (np.ones(s, f) for s in ((2, 4), (4, 4), (2, 4), (4, 2), (2, 4), (2, 2)))
    st = ref_lib.lf_ref_forward(F32, F32, 2, 4, 4, 2, 0, 1.0, 0.0, 0, None, _p(W), None, _p(A), _p(B), _p(y), _p(u),
                                None, None)
    assert st == LF_EINVAL and ref_lib.lf_ref_last_error() == b"x is NULL"
    dA, dB = np.empty((2, 4), f), np.empty((4, 2), f)
    st = ref_lib.lf_ref_backward(F32, F32, 2, 4, 4, 2, 0, 1.0, 0.0, 0, _p(y), _p(x), _p(u), None, _p(A), _p(B),
                                 _p(np.empty((2, 4), f)), _p(dA), _p(dB), None, _p(np.empty((2, 2), f)), None)
    assert st == LF_EINVAL and ref_lib.lf_ref_last_error() == b"W is NULL (dx needs W)"


# ------------------------------------------------------------------------------------ dropout hash

@pytest.mark.parametrize("n,k,p,seed", [(7, 13, 0.1, 0), (5, 33, 0.5, 12345), (3, 8, 0.0, 7),
                                        (64, 65, 0.3, 2**63 + 5), (10, 100, 0.9, 42)])
def test_dropout_hash_same_everywhere(ref_lib, n, k, p, seed):
    from lorafuse.cuda import reference_dropout_mask

    c_mask = np.empty((n, k), np.float32)
    ref_lib.lf_ref_dropout_mask(n, k, p, seed, _p(c_mask))
    np_mask = reference_dropout_mask(n, k, p, seed)
    np.testing.assert_array_equal(c_mask, np_mask)
    assert abs((np_mask == 0).mean() - p) < 0.08 or n * k < 100
    try:
        from lorafuse import ops
    except ImportError:  # pragma: no cover - the CPU extension always builds
        return
    if seed < 2**63:  # the CPU binding's seed range
        np.testing.assert_array_equal(ops.dropout_mask(n, k, p, seed) != 0, np_mask != 0)


# ------------------------------------------------------------------------------------ setup_cuda

def test_setup_cuda_modes(monkeypatch):
    monkeypatch.setenv("LORAFUSE_CUDA", "0")
    assert setup_cuda.cuda_extensions(verbose=False) == []
    monkeypatch.setattr(setup_cuda, "find_nvcc", lambda: None)
    monkeypatch.setenv("LORAFUSE_CUDA", "1")
    with pytest.raises(RuntimeError, match="nvcc not found"):
        setup_cuda.cuda_extensions(verbose=False)
    monkeypatch.delenv("LORAFUSE_CUDA")
    assert setup_cuda.cuda_extensions(verbose=False) == []
    cfg = setup_cuda.CudaConfig(mode="auto", enabled=True, nvcc="/x/bin/nvcc", version=(13, 0), cuda_home="/x",
                                cudart_lib_dir="/x/lib64", cublaslt_include="/y/include",
                                cublaslt_lib_file="/y/lib/libcublasLt.so.13", archs=["80", "90"])
    (ext,) = setup_cuda.cuda_extensions(verbose=False, cfg=cfg)
    assert ext.name == "lorafuse._C_cuda" and ext.optional
    assert "kernels/cuda/lora_cublaslt.cu" in ext.sources and "/y/lib/libcublasLt.so.13" in ext.extra_link_args
    cmd = setup_cuda.nvcc_command(cfg, "a.cu", "a.o")
    for flag in ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                 "-gencode=arch=compute_90,code=compute_90", "-fPIC", "-I/y/include"):
        assert flag in cmd
    assert cfg.arch_string() == "sm_80,sm_90,compute_90"


NVCC_CFG = setup_cuda.cuda_config(compile_check=True)
needs_nvcc = pytest.mark.skipif(not NVCC_CFG.enabled,
                                reason=f"no usable nvcc for the compile check: {NVCC_CFG.reason}")


@needs_nvcc
def test_cuda_extension_builds_with_the_setup_hook(tmp_path):
    """Compile + link lorafuse._C_cuda exactly as `pip install .` would, into tmp_path."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from setuptools import setup
        from setuptools.command.build_ext import build_ext
        import setup_cuda
        cfg = setup_cuda.cuda_config(compile_check=True)
        cfg.mode = "required"  # a failed nvcc must fail this test, not be skipped as optional
        setup(name="lorafuse_cuda_check", ext_modules=setup_cuda.cuda_extensions(cfg=cfg),
              cmdclass={{"build_ext": setup_cuda.wrap_build_ext(build_ext)}},
              script_args=["-q", "build_ext", "--build-lib", {str(tmp_path / 'lib')!r},
                           "--build-temp", {str(tmp_path / 'tmp')!r}])
    """)
    env = dict(os.environ)
    env.pop("LORAFUSE_CUDA", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    built = list((tmp_path / "lib" / "lorafuse").glob("_C_cuda*" + sysconfig.get_config_var("EXT_SUFFIX")))
    assert len(built) == 1, list(tmp_path.rglob("*"))
    so = built[0]
    nm = shutil.which("nm")
    if nm:
        syms = subprocess.run([nm, "-D", str(so)], capture_output=True, text=True).stdout
        assert "PyInit__C_cuda" in syms
        assert "cublasLtMatmul" in syms and "cudaMemsetAsync" in syms
    # the CPU extension must never link CUDA: it is the other module
    if NVCC_CFG.cublaslt_lib_file is None:
        return  # cuBLASLt symbols are undefined: this object links but cannot load (by design)
    check = textwrap.dedent(f"""
        import importlib.util, sys
        try:
            import torch  # noqa: F401  (as lorafuse.cuda does: loads the same cuBLASLt first)
        except ImportError:
            pass
        spec = importlib.util.spec_from_file_location("lorafuse._C_cuda", {str(so)!r})
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        v = m.versions()
        assert v["archs"] == "sm_80,sm_90,compute_90", v
        assert v["cublaslt_runtime"] > 0, v
        try:
            m.lora_forward(0, 0, 2, 2, 0, 4, 8, 8, 2, 0, 1.0, 1.5, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0)
        except ValueError as e:
            assert "dropout_p" in str(e), e
        else:
            raise AssertionError("bad dropout_p accepted")
        assert m.mixed_ws_bytes(2, 2, 4, 8, 8, 2, False) == 0  # same-dtype adapters need none
        assert m.mixed_ws_bytes(2, 0, 4, 8, 8, 2, True) > m.mixed_ws_bytes(2, 0, 4, 8, 8, 2, False) > 0
        if v["device_count"] < 1:  # no GPU: device calls must raise CudaError, not crash
            ptrs = [i << 16 for i in (1, 2, 0, 3, 4, 5, 6)]  # distinct, aligned: valid, never dereferenced
            try:
                m.lora_forward(0, 0, 2, 2, 0, 4, 8, 8, 2, 0, 1.0, 0.0, 0, *ptrs, 0, 0)
            except m.CudaError as e:
                assert "failed" in str(e), e
            else:
                raise AssertionError("no error without a GPU")
        print("ok", v)
    """)
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


@needs_nvcc
def test_cublaslt_declarations_match_real_header(tmp_path):
    if NVCC_CFG.cublaslt_include is None:
        pytest.skip("the real <cublasLt.h> is not on this machine (nothing to compare the declarations with)")
    cmd = [NVCC_CFG.nvcc, "-std=c++17", f"-I{ROOT / 'kernels' / 'cuda'}", f"-I{NVCC_CFG.cublaslt_include}",
           "-c", str(ROOT / "kernels" / "cuda" / "check_cublaslt_decls.cu"), "-o", str(tmp_path / "check.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_cpu_extension_does_not_link_cuda():
    """`import lorafuse` must work without any CUDA runtime: the CPU module links no CUDA library."""
    try:
        from lorafuse import _C
    except ImportError:  # pragma: no cover
        pytest.skip("lorafuse._C not built")
    ldd = shutil.which("ldd")
    if not ldd or not getattr(_C, "__file__", None):
        pytest.skip("ldd not available")
    out = subprocess.run([ldd, _C.__file__], capture_output=True, text=True).stdout
    assert "libcuda" not in out and "cublas" not in out, out


def test_cuda_module_imports_without_extension():
    import lorafuse.cuda as lc

    info = lc.cuda_info()
    assert isinstance(info, dict) and "compiled" in info
    assert str(info)
    if not info["compiled"]:
        assert not hasattr(lc, "lora_forward")
        with pytest.raises(lc.CudaUnavailableError, match="LORAFUSE_CUDA=1"):
            lc.cuda_lora_forward(None, None, None, None, 1.0)


# ------------------------------------------------------------------------------------ lorafuse.cuda plumbing

class _HostC:
    """Stand-in for lorafuse._C_cuda that runs the plan's host reference backend on the raw addresses
    lorafuse.cuda passes (CPU float32 tensors), so the wrapper's argument order, sizes, layouts and
    workspaces are checked end to end without a GPU."""

    DTYPE_F32, DTYPE_F16, DTYPE_BF16 = 0, 1, 2

    def __init__(self, lib):
        self.lib, self.calls = lib, []

    def mixed_ws_bytes(self, dtype, adtype, n, k, m, r, backward):
        return self.lib.lf_ref_mixed_ws_bytes(dtype, adtype, n, k, m, r, int(backward))

    def _guarded(self, dtype, adtype, n, k, m, r, backward, ws_ptr, run):
        """Runs ``run(ws)`` on a canaried copy of the mixed workspace: its bytes must be exactly
        what the plan uses (nothing written past the size mixed_ws_bytes reports)."""
        size = self.mixed_ws_bytes(dtype, adtype, n, k, m, r, backward)
        assert bool(ws_ptr) == (size > 0)  # the wrapper passes a workspace exactly when one is needed
        if not size:
            return run(None)
        buf = np.full(size + 4096, 0xAB, np.uint8)
        st = run(buf.ctypes.data_as(ctypes.c_void_p))
        assert (buf[size:] == 0xAB).all(), "the mixed plan wrote past its workspace"
        return st

    def lora_forward(self, device, stream, dtype, adtype, tf32, n, k, m, r, w_kxm, scale, p, seed, *ptrs):
        self.calls.append(("forward", n, k, m, r, w_kxm, p, seed, ptrs))
        assert dtype in (F32, BF16) and stream == 0 and device == 0
        st = self._guarded(dtype, adtype, n, k, m, r, False, ptrs[-1], lambda ws: self.lib.lf_ref_forward(
            dtype, adtype, n, k, m, r, w_kxm, scale, p, seed, *[c or None for c in ptrs[:-1]], ws))
        if st:
            raise ValueError(self.lib.lf_ref_last_error().decode())

    def lora_backward(self, device, stream, dtype, adtype, tf32, n, k, m, r, w_kxm, scale, p, seed, *ptrs):
        self.calls.append(("backward", n, k, m, r, w_kxm, p, seed, ptrs))
        assert dtype in (F32, BF16) and bool(ptrs[-2]) == (dtype == adtype)  # v workspace: same-dtype plan only
        st = self._guarded(dtype, adtype, n, k, m, r, True, ptrs[-1], lambda ws: self.lib.lf_ref_backward(
            dtype, adtype, n, k, m, r, w_kxm, scale, p, seed, *[c or None for c in ptrs[:-1]], ws))
        if st:
            raise ValueError(self.lib.lf_ref_last_error().decode())


@pytest.fixture
def host_cuda(ref_lib, monkeypatch):
    torch = pytest.importorskip("torch")
    import lorafuse.cuda as lc

    fake = _HostC(ref_lib)
    monkeypatch.setattr(lc, "_C", fake)
    monkeypatch.setattr(lc, "_DEVICE_TYPE", "cpu")
    return torch, lc, fake


@pytest.mark.parametrize("lead,k,m,r", [((6,), 16, 12, 4), ((1,), 13, 7, 1), ((2, 3), 9, 5, 2), ((0,), 4, 3, 2)])
@pytest.mark.parametrize("layout", ["mk", "fifo", "view"])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_wrapper_plumbing_on_host(host_cuda, lead, k, m, r, layout, p):
    torch, lc, fake = host_cuda
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(lead + (k,), generator=gen)
    W = torch.randn(m, k, generator=gen)
    A, B = torch.randn(r, k, generator=gen), torch.randn(m, r, generator=gen)
    bias, g = torch.randn(m, generator=gen), torch.randn(lead + (m,), generator=gen)
    s, seed = 1.25, 99
    Wt = W.t().contiguous()
    Warg = {"mk": W, "fifo": Wt, "view": Wt.t()}[layout]
    y, u = lc.cuda_lora_forward(x, Warg, A, B, s, bias, dropout_p=p, seed=seed, fan_in_fan_out=layout == "fifo")
    dx, dA, dB = lc.cuda_lora_backward(g, x, u, Warg, A, B, s, dropout_p=p, seed=seed,
                                       fan_in_fan_out=layout == "fifo")
    assert fake.calls[0][5] == (0 if layout == "mk" else 1)  # w_kxm: fifo and transposed views read in place
    assert Warg.data_ptr() in fake.calls[0][8]  # the base weight itself, never a copy
    assert y.shape == lead + (m,) and u.shape == lead + (r,) and dx.shape == x.shape
    n = int(np.prod(lead))
    d = lambda t: t.double().numpy().reshape(-1, t.shape[-1])  # noqa: E731
    ry, ru, rdx, rdA, rdB = _reference(d(x), W.double().numpy(), bias.double().numpy(), d(A), d(B), s, p, seed,
                                       d(g) if n else np.zeros((0, m)))
    for name, got, ref in (("y", y, ry), ("u", u, ru), ("dx", dx, rdx), ("dA", dA, rdA), ("dB", dB, rdB)):
        got = got.double().numpy().reshape(ref.shape)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(ref).max(initial=0)),
                                   err_msg=name)


def test_wrapper_outputs_and_errors_on_host(host_cuda):
    torch, lc, fake = host_cuda
    x, W, A, B = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    out, u_out = torch.empty(4, 6), torch.empty(4, 2)
    y, u = lc.cuda_lora_forward(x, W, A, B, 1.0, out=out, u_out=u_out)
    assert y is out and u is u_out
    g = torch.randn(4, 6)
    dx, dA, dB = lc.cuda_lora_backward(g, x, u, W, A, B, 1.0, need_dx=False)
    assert dx is None and fake.calls[-1][8][6] == 0  # dx pointer NULL
    with pytest.raises(ValueError, match="output y overlaps input x"):  # the C side's names: out is y
        lc.cuda_lora_forward(x, W, A, B, 1.0, out=x.view(-1)[:24].view(4, 6))
    with pytest.raises(ValueError, match="never copied"):
        lc.cuda_lora_forward(x[:, :4], W[:, ::2], A[:, :4], B, 1.0)
    with pytest.raises(ValueError, match=r"B must have shape \(6, 2\)"):
        lc.cuda_lora_forward(x, W, A, B.t(), 1.0)
    with pytest.raises(TypeError, match="dtype"):
        lc.cuda_lora_forward(x, W.double(), A, B, 1.0)
    with pytest.raises(ValueError, match="seed"):
        lc.cuda_lora_forward(x, W, A, B, 1.0, seed=-1)
    with pytest.raises(ValueError, match="g must be"):
        lc.cuda_lora_backward(g[:, :5], x, u, W, A, B, 1.0)
    buf = torch.empty(2 * 8 + 6 * 2)
    with pytest.raises(ValueError, match="output dA overlaps output dB"):  # two given outputs sharing memory
        lc.cuda_lora_backward(g, x, u, W, A, B, 1.0, need_dx=False, dA_out=buf[:16].view(2, 8),
                              dB_out=buf[4:16].view(6, 2))
    with pytest.raises(ValueError, match="output u overlaps input A"):
        lc.cuda_lora_forward(x, W, A, B, 1.0, u_out=A.view(-1)[:8].view(4, 2))


# ------------------------------------------------------------------------------------ fp32 adapters on bf16

def _mags(x, W, bias, A, B, s, mask, g):
    """float64 magnitude bounds |·| of each result's terms (error bounds scale with these, not with the
    results, which may cancel): y, u, dx, dA, dB."""
    ax, aW, aA, aB, ag = (np.abs(t) for t in (x, W, A, B, g))
    axd = ax * mask
    mu = axd @ aA.T
    my = ax @ aW.T + s * mu @ aB.T + (0 if bias is None else np.abs(bias))
    mv = ag @ aB
    return my, mu, ag @ aW + s * (mv @ aA) * mask, s * mv.T @ axd, s * ag.T @ mu


@pytest.mark.parametrize("lead,k,m,r", [((6,), 16, 12, 4), ((1,), 13, 7, 1), ((2, 5), 33, 9, 3), ((17,), 40, 65, 8)])
@pytest.mark.parametrize("layout", ["mk", "fifo"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_mixed_plan_fp32_adapters_on_bf16(host_cuda, lead, k, m, r, layout, p):
    """bf16 x, W, bias, g with float32 A, B (PEFT's default): y and dx (bf16) within bf16 rounding of the
    float64 result of the same inputs; u, dA, dB (float32) within 2^-14 of their terms' magnitude —
    rounding A or B (or u, v) to bf16 instead of splitting them into hi + lo parts would miss that by ~30×."""
    torch, lc, fake = host_cuda
    gen = torch.Generator().manual_seed(k * 100 + m + r)
    bf = torch.bfloat16
    x = torch.randn(lead + (k,), generator=gen).to(bf)
    W = torch.randn(m, k, generator=gen).to(bf)
    A, B = torch.randn(r, k, generator=gen) * 0.3, torch.randn(m, r, generator=gen) * 0.3
    bias, g = torch.randn(m, generator=gen).to(bf), torch.randn(lead + (m,), generator=gen).to(bf)
    s, seed = 1.5, 4242
    Warg = W.t().contiguous() if layout == "fifo" else W
    y, u = lc.cuda_lora_forward(x, Warg, A, B, s, bias, dropout_p=p, seed=seed, fan_in_fan_out=layout == "fifo")
    dx, dA, dB = lc.cuda_lora_backward(g, x, u, Warg, A, B, s, dropout_p=p, seed=seed,
                                       fan_in_fan_out=layout == "fifo")
    assert (y.dtype, dx.dtype, u.dtype, dA.dtype, dB.dtype) == (bf, bf, torch.float32, torch.float32, torch.float32)
    assert fake.calls[0][0] == "forward" and fake.calls[0][8][-1] != 0  # the mixed workspace was passed
    d = lambda t: t.double().numpy().reshape(-1, t.shape[-1])  # noqa: E731
    n = int(np.prod(lead))
    xs, gs = d(x), d(g)
    ref = _reference(xs, W.double().numpy(), bias.double().numpy(), A.double().numpy(), B.double().numpy(), s, p,
                     seed, gs)
    mask = _np_mask(n, k, p, seed) if p > 0 else np.ones((n, k))
    mags = _mags(xs, W.double().numpy(), bias.double().numpy(), A.double().numpy(), B.double().numpy(), s, mask, gs)
    for name, got, want, mag, rel in (("y", y, ref[0], mags[0], 2.0**-7), ("u", u, ref[1], mags[1], 2.0**-14),
                                      ("dx", dx, ref[2], mags[2], 2.0**-7), ("dA", dA, ref[3], mags[3], 2.0**-14),
                                      ("dB", dB, ref[4], mags[4], 2.0**-14)):
        err = np.abs(got.double().numpy().reshape(want.shape) - want)
        worst = (err - rel * mag).max()
        assert worst <= 1e-30, (name, float(err.max()), float((err / (mag + 1e-300)).max()))


def test_mixed_plan_refuses_other_dtype_pairs(host_cuda):
    torch, lc, _ = host_cuda
    x, W = torch.randn(4, 8).half(), torch.randn(6, 8).half()
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(TypeError, match="float32 on a bfloat16 x"):
        lc.cuda_lora_forward(x, W, A, B, 1.0)  # fp16 base: only same-dtype adapters
    with pytest.raises(TypeError, match="B has dtype"):
        lc.cuda_lora_forward(x.bfloat16(), W.bfloat16(), A, B.bfloat16(), 1.0)
    assert lc.adapter_dtypes_fuse(torch.bfloat16, torch.float32)
    assert not lc.adapter_dtypes_fuse(torch.float16, torch.float32)
    assert not lc.adapter_dtypes_fuse(torch.float32, torch.bfloat16)
