"""Build lorafuse: the C extension `lorafuse._C` (always) and `lorafuse._C_cuda` (when nvcc is found).

CPU code is compiled for baseline x86-64: the AVX2 and AVX-512 micro-kernels carry their own
target attributes, the rank-r kernels (one file per ISA) get their ISA's flags per file
(SOURCE_FLAGS), and all are chosen at run time by cpuid, so one wheel runs on any x86-64.
Environment:
    LORAFUSE_SANITIZE=1   build with AddressSanitizer + UndefinedBehaviorSanitizer
    LORAFUSE_CUDA=0|1     force the CUDA extension off / on (on: a missing nvcc is an error)
"""
import glob
import os
import platform
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
    sources=["csrc/module.c", "csrc/args.c", "csrc/runtime.c", "csrc/plans.c", "csrc/dlpack_in.c", "csrc/out_cache.c",
               "csrc/hgemm.c", "csrc/quant.c", "csrc/qweight.c", "csrc/half.c", "csrc/dora.c"]
    + sorted(glob.glob("kernels/cpu/*.c")),
    include_dirs=["kernels/include", numpy.get_include()],
    # the headers too: an edit to one (skinny_body.h, kernels.h …) rebuilds the extension
    depends=sorted(glob.glob("kernels/cpu/*.h") + glob.glob("kernels/include/lorafuse/*.h") + glob.glob("csrc/*.h")),
    define_macros=[("LORAFUSE_VERSION", f'"{VERSION}"')],
    extra_compile_args=c_flags,
    extra_link_args=link_flags,
)

# Flags for single sources, after c_flags. The rank-r kernels (skinny_body.h, compiled once per ISA)
# want FMA contraction, which GCC turns off under -std=c11, and their file's instruction set; the ISA
# flags only when building for x86-64 (elsewhere those files compile to zero tables).
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
SOURCE_FLAGS = {
    "kernels/cpu/skinny_generic.c": ["-ffp-contract=fast"],
    "kernels/cpu/skinny_avx2.c": ["-ffp-contract=fast"] + (["-mavx2", "-mfma", "-mf16c"] if X86_64 else []),
    "kernels/cpu/skinny_avx512.c": ["-ffp-contract=fast"] + (["-mavx512f", "-mavx512dq", "-mf16c"] if X86_64 else []),
    # the AMX tile intrinsics need the ISA flags (GCC 12 has no target attribute for them)
    "kernels/cpu/ukernel_amx_bf16.c": ["-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512bf16"] if X86_64 else [],
}


class SourceFlagsBuildExt(build_ext):
    """build_ext that adds SOURCE_FLAGS[source] to that source's compile command (setuptools has
    per-extension flags only): the compiler's per-file step, _compile, is wrapped."""

    def build_extensions(self):
        compile_file = self.compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            key = os.path.relpath(os.path.abspath(src), HERE).replace(os.sep, "/")
            compile_file(obj, src, ext, cc_args, list(extra_postargs or []) + SOURCE_FLAGS.get(key, []), pp_opts)

        self.compiler._compile = _compile
        super().build_extensions()


extensions = [cpu_extension]
cmdclass = {"build_ext": SourceFlagsBuildExt}

# --- CUDA build (owned by the CUDA backend; see setup_cuda.py) ---
if os.path.exists(os.path.join(HERE, "setup_cuda.py")):
    import sys

    sys.path.insert(0, HERE)
    from setup_cuda import cuda_extensions, wrap_build_ext  # noqa: E402

    extensions += cuda_extensions()
    cmdclass["build_ext"] = wrap_build_ext(SourceFlagsBuildExt)
# --- end CUDA build ---

setup(version=VERSION, ext_modules=extensions, cmdclass=cmdclass)
