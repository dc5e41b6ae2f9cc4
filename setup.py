"""Build lorafuse: the C extension `lorafuse._C` (always) and `lorafuse._C_cuda` (when nvcc is found).

CPU code is compiled for baseline x86-64: the AVX2 and AVX-512 micro-kernels carry their own
target attributes and are chosen at run time by cpuid, so one wheel runs on any x86-64.
Environment:
    LORAFUSE_SANITIZE=1   build with AddressSanitizer + UndefinedBehaviorSanitizer
    LORAFUSE_CUDA=0|1     force the CUDA extension off / on (on: a missing nvcc is an error)
"""
import glob
import os
import re

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    with open(os.path.join(HERE, "pyproject.toml"), encoding="utf-8") as f:
        return re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)


VERSION = read_version()
SANITIZE = os.environ.get("LORAFUSE_SANITIZE", "") == "1"

c_flags = ["-std=c11", "-Wall", "-Wextra", "-fvisibility=hidden", "-pthread"]
link_flags = ["-pthread"]
if SANITIZE:
    c_flags += ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                "-fno-sanitize-recover=undefined"]
    link_flags += ["-fsanitize=address,undefined"]
else:
    c_flags += ["-O3"]

cpu_extension = Extension(
    "lorafuse._C",
    sources=["csrc/module.c", "csrc/args.c", "csrc/runtime.c", "csrc/plans.c", "csrc/dlpack_in.c", "csrc/out_cache.c"]
    + sorted(glob.glob("kernels/cpu/*.c")),
    include_dirs=["kernels/include", numpy.get_include()],
    define_macros=[("LORAFUSE_VERSION", f'"{VERSION}"')],
    extra_compile_args=c_flags,
    extra_link_args=link_flags,
)

extensions = [cpu_extension]
cmdclass = {"build_ext": build_ext}

# --- CUDA build (owned by the CUDA backend; see setup_cuda.py) ---
if os.path.exists(os.path.join(HERE, "setup_cuda.py")):
    import sys

    sys.path.insert(0, HERE)
    from setup_cuda import CudaBuildExt, cuda_extensions  # noqa: E402

    extensions += cuda_extensions()
    cmdclass["build_ext"] = CudaBuildExt
# --- end CUDA build ---

setup(version=VERSION, ext_modules=extensions, cmdclass=cmdclass)
