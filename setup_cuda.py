"""Build support for lorafuse's optional CUDA extension, ``lorafuse._C_cuda``.

Integration in setup.py (the CPU extension stays as it is and never links CUDA)::

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # PEP 517 builds don't add it
    from setup_cuda import CudaBuildExt, cuda_extensions
    setup(..., ext_modules=[cpu_ext, *cuda_extensions()], cmdclass={"build_ext": CudaBuildExt})

``CudaBuildExt`` is setuptools' build_ext with the nvcc step; with a build_ext of your own, use
``wrap_build_ext(YourBuildExt)`` or ``class B(CudaBuildExtMixin, YourBuildExt)``.

What it does:

* ``LORAFUSE_CUDA=0``: no CUDA extension, nothing probed.
* unset / ``auto`` (default): the CUDA extension is built when nvcc (CUDA >= 12) and cuBLASLt
  (headers + library) are found; otherwise the build is CPU-only and prints why. In this mode the
  extension is ``optional``: if nvcc fails, setuptools warns and the CPU build still installs.
* ``LORAFUSE_CUDA=1``: the CUDA extension is required; a missing nvcc / cuBLASLt or a failed compile
  is an error.

Where things are looked for:

* nvcc: ``$CUDA_HOME``/``$CUDA_PATH``/bin, then ``PATH``, then /usr/local/cuda/bin.
* cudart: the toolkit's lib64 (or the ``nvidia-cuda-runtime`` wheel).
* cuBLASLt: ``$LORAFUSE_CUBLASLT_HOME`` ({include,lib}), the toolkit, then the ``nvidia-cublas``
  wheel in site-packages (``nvidia/cu13/{include,lib}`` for CUDA 13, ``nvidia/cublas/...`` for 12),
  which is what a CUDA build of PyTorch installs. ``pip install nvidia-cublas`` (CUDA 13) or
  ``nvidia-cublas-cu12`` provides it. The library is linked by full path with an rpath to its
  folder and to ``$ORIGIN/../nvidia/cu<major>/lib``; ``lorafuse.cuda`` imports torch first, which
  loads the same cuBLASLt, so both share one copy.
* targets: ``LORAFUSE_CUDA_ARCHS`` (default ``80;90``): SASS for each, plus PTX for the newest.

``python setup_cuda.py`` prints what was found (for debugging a build).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

__all__ = [
    "CudaConfig",
    "CudaBuildExt",
    "CudaBuildExtMixin",
    "cuda_config",
    "cuda_extensions",
    "nvcc_command",
    "wrap_build_ext",
]

ROOT = os.path.dirname(os.path.abspath(__file__))
MIN_CUDA = (12, 0)
DEFAULT_ARCHS = "80;90"

# sources, relative to the repository root (setuptools wants relative paths)
CUDA_SOURCES = ["csrc/cuda_module.c", "kernels/cuda/lora_cublaslt.cu"]
CUDA_DEPENDS = [
    "kernels/include/lorafuse/cuda_kernels.h",
    "kernels/include/lorafuse/status.h",
    "kernels/include/lorafuse/validate.h",
    "csrc/status_py.h",
    "kernels/include/lorafuse/dropout_hash.h",
    "kernels/cuda/lora_plan.h",
    "kernels/cuda/small_kernels.h",
    "kernels/cuda/cublaslt_decls.h",
]
INCLUDE_DIRS = ["kernels/include", "kernels/cuda"]


@dataclass
class CudaConfig:
    mode: str  # "off" | "auto" | "required"
    enabled: bool = False
    reason: str = ""
    nvcc: Optional[str] = None
    version: Optional[tuple] = None
    cuda_home: Optional[str] = None
    cudart_lib_dir: Optional[str] = None
    cudart_lib_file: Optional[str] = None  # set when only a versioned libcudart.so.N exists
    cublaslt_include: Optional[str] = None
    cublaslt_lib_file: Optional[str] = None
    cublaslt_source: str = ""
    archs: List[str] = field(default_factory=list)
    extra_defines: List[str] = field(default_factory=list)  # e.g. LORAFUSE_USE_CUBLASLT_DECLS (compile checks)

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.version)) if self.version else "none"

    def gencode_flags(self) -> List[str]:
        flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in self.archs]
        if self.archs:
            top = max(self.archs, key=lambda a: int(re.sub(r"\D", "", a) or 0))
            flags.append(f"-gencode=arch=compute_{top},code=compute_{top}")
        return flags

    def arch_string(self) -> str:
        out = [f"sm_{a}" for a in self.archs]
        if self.archs:
            top = max(self.archs, key=lambda a: int(re.sub(r"\D", "", a) or 0))
            out.append(f"compute_{top}")
        return ",".join(out)


def _mode() -> str:
    v = os.environ.get("LORAFUSE_CUDA", "").strip().lower()
    if v in ("0", "off", "false", "no"):
        return "off"
    if v in ("1", "on", "true", "yes", "required"):
        return "required"
    return "auto"


def find_nvcc() -> Optional[str]:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return os.path.realpath(found)
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc"
    return None


def find_cuda_home(nvcc: str) -> Optional[str]:
    """The toolkit folder (with include/cuda_runtime.h) that nvcc belongs to; nvcc may be a wrapper."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:  # nvcc --dryrun names its own TOP folder, whatever wrapper or link was called
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull], capture_output=True, text=True,
                             timeout=60).stderr
        m = re.search(r"^#\$ TOP=(.+)$", out, re.M)
        if m:
            cands.append(os.path.realpath(m.group(1).strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    cands.append("/usr/local/cuda")
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None


def nvcc_version(nvcc: str) -> Optional[tuple]:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _site_dirs() -> List[str]:
    dirs = []
    for p in list(sys.path) + [sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib")]:
        if p and os.path.isdir(p) and p not in dirs:
            dirs.append(p)
    try:
        import site

        for p in site.getsitepackages() + [site.getusersitepackages()]:
            if p and os.path.isdir(p) and p not in dirs:
                dirs.append(p)
    except Exception:  # pragma: no cover - virtualenv quirks
        pass
    return dirs


def _lib_in(folder: str, name: str, major: int) -> Optional[str]:
    for cand in (f"lib{name}.so", f"lib{name}.so.{major}"):
        path = os.path.join(folder, cand)
        if os.path.exists(path):
            return path
    hits = sorted(glob.glob(os.path.join(folder, f"lib{name}.so.*")))
    return hits[0] if hits else None


def find_cublaslt(cuda_home: Optional[str], major: int):
    """Returns (include_dir, library_file, description) or (None, None, why_not)."""
    cands = []
    env = os.environ.get("LORAFUSE_CUBLASLT_HOME")
    if env:
        cands.append((os.path.join(env, "include"), [os.path.join(env, "lib"), os.path.join(env, "lib64")],
                      f"$LORAFUSE_CUBLASLT_HOME={env}"))
    if cuda_home:
        cands.append((os.path.join(cuda_home, "include"),
                      [os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "targets", "x86_64-linux", "lib"),
                       os.path.join(cuda_home, "lib")], f"toolkit {cuda_home}"))
    for site_dir in _site_dirs():
        for sub in (f"cu{major}", "cublas"):
            base = os.path.join(site_dir, "nvidia", sub)
            cands.append((os.path.join(base, "include"), [os.path.join(base, "lib")], f"wheel {base}"))
    for inc, libdirs, desc in cands:
        if not os.path.isfile(os.path.join(inc, "cublasLt.h")):
            continue
        for d in libdirs:
            lib = _lib_in(d, "cublasLt", major)
            if lib:
                return inc, lib, desc
    return None, None, (
        f"cuBLASLt (cublasLt.h + libcublasLt.so.{major}) not found in $LORAFUSE_CUBLASLT_HOME, the CUDA toolkit "
        f"or site-packages; `pip install nvidia-cublas` (CUDA 13) / `nvidia-cublas-cu12` (CUDA 12) provides it")


def find_cudart(cuda_home: Optional[str], major: int):
    dirs = []
    if cuda_home:
        dirs += [os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "targets", "x86_64-linux", "lib"),
                 os.path.join(cuda_home, "lib")]
    for site_dir in _site_dirs():
        dirs += [os.path.join(site_dir, "nvidia", f"cu{major}", "lib"),
                 os.path.join(site_dir, "nvidia", "cuda_runtime", "lib")]
    for d in dirs:
        if os.path.exists(os.path.join(d, "libcudart.so")):
            return d, None
        lib = _lib_in(d, "cudart", major)
        if lib:
            return d, lib
    return None, None


def cuda_config(compile_check: bool = False) -> CudaConfig:
    """Probe the machine. Never raises; cfg.enabled says whether to build, cfg.reason why not.

    compile_check=True (tests only): when nvcc and cudart are there but cuBLASLt is not, compile against
    kernels/cuda/cublaslt_decls.h instead; the result links (cuBLASLt symbols left undefined) but cannot load."""
    cfg = CudaConfig(mode=_mode())
    if cfg.mode == "off":
        cfg.reason = "LORAFUSE_CUDA=0"
        return cfg
    cfg.archs = [a.strip() for a in os.environ.get("LORAFUSE_CUDA_ARCHS", DEFAULT_ARCHS).replace(",", ";").split(";")
                 if a.strip()]
    cfg.nvcc = find_nvcc()
    if not cfg.nvcc:
        cfg.reason = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
        return cfg
    cfg.version = nvcc_version(cfg.nvcc)
    if not cfg.version or cfg.version < MIN_CUDA:
        cfg.reason = f"{cfg.nvcc} is CUDA {cfg.version_str}; lorafuse needs CUDA >= {MIN_CUDA[0]}.{MIN_CUDA[1]}"
        return cfg
    cfg.cuda_home = find_cuda_home(cfg.nvcc)
    major = cfg.version[0]
    cfg.cudart_lib_dir, cfg.cudart_lib_file = find_cudart(cfg.cuda_home, major)
    if not cfg.cudart_lib_dir:
        cfg.reason = f"libcudart not found next to {cfg.nvcc}"
        return cfg
    inc, lib, desc = find_cublaslt(cfg.cuda_home, major)
    if not inc and compile_check:
        cfg.extra_defines.append("LORAFUSE_USE_CUBLASLT_DECLS")
        cfg.cublaslt_source = "kernels/cuda/cublaslt_decls.h (compile check only: " + desc + ")"
        cfg.enabled = True
        return cfg
    if not inc:
        cfg.reason = desc
        return cfg
    cfg.cublaslt_include, cfg.cublaslt_lib_file, cfg.cublaslt_source = inc, lib, desc
    cfg.enabled = True
    return cfg


def nvcc_command(cfg: CudaConfig, src: str, obj: str, *, include_dirs: Sequence[str] = (),
                 defines: Sequence[str] = (), gencode: Optional[Sequence[str]] = None) -> List[str]:
    """The nvcc command line used for every .cu file (also used by tests/test_cuda_build.py)."""
    cmd = [cfg.nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
           "--threads", "0"]
    cmd += list(cfg.gencode_flags() if gencode is None else gencode)
    for d in list(include_dirs) + [os.path.join(ROOT, p) for p in INCLUDE_DIRS]:
        cmd.append(f"-I{d}")
    if cfg.cublaslt_include:
        cmd.append(f"-I{cfg.cublaslt_include}")
    cmd += [f"-D{d}" for d in list(cfg.extra_defines) + list(defines)]
    cmd += ["-c", src, "-o", obj]
    return cmd


def _link_args(cfg: CudaConfig) -> List[str]:
    args = []
    rpaths = []
    if cfg.cudart_lib_file:
        args.append(cfg.cudart_lib_file)
    rpaths.append(cfg.cudart_lib_dir)
    if cfg.cublaslt_lib_file:  # always set in real builds; absent only in compile checks
        args.append(cfg.cublaslt_lib_file)
        rpaths.append(os.path.dirname(cfg.cublaslt_lib_file))
    rpaths.append(f"$ORIGIN/../nvidia/cu{cfg.version[0]}/lib")
    rpaths.append("$ORIGIN/../nvidia/cublas/lib")
    seen = []
    for r in rpaths:
        if r and r not in seen:
            seen.append(r)
    args += [f"-Wl,-rpath,{r}" for r in seen]
    return args


def cuda_extensions(verbose: bool = True, cfg: Optional[CudaConfig] = None) -> list:
    """[Extension('lorafuse._C_cuda', ...)] when CUDA can be built here, else [] (and says why).

    Raises RuntimeError when LORAFUSE_CUDA=1 and CUDA cannot be built. ``cfg`` overrides the probe
    (tests)."""
    from setuptools import Extension

    cfg = cuda_config() if cfg is None else cfg
    if not cfg.enabled:
        if cfg.mode == "required":
            raise RuntimeError(f"LORAFUSE_CUDA=1 but the CUDA extension cannot be built: {cfg.reason}")
        if verbose:
            print(f"lorafuse: building WITHOUT CUDA support ({cfg.reason})", file=sys.stderr)
        return []
    if verbose:
        print(f"lorafuse: building the CUDA extension with {cfg.nvcc} (CUDA {cfg.version_str}), archs "
              f"{cfg.arch_string()}, cuBLASLt from {cfg.cublaslt_source}", file=sys.stderr)
    ext = Extension(
        "lorafuse._C_cuda",
        sources=list(CUDA_SOURCES),
        depends=list(CUDA_DEPENDS),
        include_dirs=list(INCLUDE_DIRS),
        define_macros=[
            ("LORAFUSE_CUDA_ARCHS", f'"{cfg.arch_string()}"'),
            ("LORAFUSE_NVCC_VERSION", f'"{cfg.version_str}"'),
            ("LORAFUSE_CUBLASLT_SOURCE", '"' + cfg.cublaslt_source.replace('"', "'").replace("\\", "/") + '"'),
        ],
        library_dirs=[cfg.cudart_lib_dir] if not cfg.cudart_lib_file else [],
        libraries=(["cudart"] if not cfg.cudart_lib_file else []) + ["stdc++"],
        extra_link_args=_link_args(cfg),
        optional=(cfg.mode != "required"),
    )
    ext._lorafuse_cuda = cfg  # read by CudaBuildExtMixin
    return [ext]


def _newer(sources: Sequence[str], target: str) -> bool:
    if not os.path.exists(target):
        return True
    t = os.path.getmtime(target)
    return any(os.path.exists(s) and os.path.getmtime(s) > t for s in sources)


class CudaBuildExtMixin:
    """Mix into a setuptools build_ext: compiles an extension's .cu sources with nvcc into objects,
    then lets the normal C compiler build and link the rest (with those objects)."""

    def build_extension(self, ext):  # noqa: D401 - setuptools hook
        cfg = getattr(ext, "_lorafuse_cuda", None)
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        if cfg is not None and cu_sources:
            try:
                from setuptools.errors import CompileError
            except ImportError:  # pragma: no cover - old setuptools
                from distutils.errors import CompileError

            objects = []
            for src in cu_sources:
                obj = os.path.join(self.build_temp, "lorafuse_cuda", os.path.splitext(src)[0] + ".o")
                os.makedirs(os.path.dirname(obj), exist_ok=True)
                if self.force or _newer([src] + list(ext.depends), obj):
                    cmd = nvcc_command(cfg, src, obj)
                    print("lorafuse: " + " ".join(cmd), file=sys.stderr)
                    try:
                        subprocess.run(cmd, check=True)
                    except (OSError, subprocess.CalledProcessError) as exc:
                        raise CompileError(f"nvcc failed on {src}: {exc}") from exc
                objects.append(obj)
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            ext.extra_objects = objects + list(ext.extra_objects or [])
        return super().build_extension(ext)


def wrap_build_ext(base):
    """A subclass of ``base`` (a setuptools build_ext) that also builds the CUDA extension."""
    return type("build_ext", (CudaBuildExtMixin, base), {})


def _default_build_ext():
    from setuptools.command.build_ext import build_ext

    return wrap_build_ext(build_ext)


# Ready-made command for setup.py: ``cmdclass={"build_ext": CudaBuildExt}``.
CudaBuildExt = _default_build_ext()


if __name__ == "__main__":
    c = cuda_config()
    for k, v in c.__dict__.items():
        print(f"{k:18s} {v}")
