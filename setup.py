"""Build lorafuse: the C extension `lorafuse._C` (always) and `lorafuse._C_cuda` (when nvcc is found).

CPU code is compiled for baseline x86-64: the AVX2 and AVX-512 micro-kernels carry their own
target attributes, the rank-r kernels (one file per ISA) get their ISA's flags per file
(SOURCE_FLAGS), and all are chosen at run time by cpuid, so one wheel runs on any x86-64.
Environment:
    LORAFUSE_SANITIZE=1   build with AddressSanitizer + UndefinedBehaviorSanitizer
    LORAFUSE_CUDA=0|1     force the CUDA extension off / on (on: a missing nvcc is an error)
    LORAFUSE_BUILD_JOBS=N compile N C sources at a time (default: the CPUs this process may run on)
"""
import glob
import os
import platform
import re
from concurrent.futures import ThreadPoolExecutor

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


def build_jobs() -> int:
    """How many C sources to compile at once: LORAFUSE_BUILD_JOBS, else the CPUs this process may run on."""
    jobs = os.environ.get("LORAFUSE_BUILD_JOBS", "")
    if jobs:
        if not jobs.isdigit() or int(jobs) < 1:
            raise ValueError(f"LORAFUSE_BUILD_JOBS must be a positive integer, got {jobs!r}")
        return int(jobs)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


BUILD_JOBS = build_jobs()  # read here: a bad value stops every command, not only one with sources to compile


class SourceFlagsBuildExt(build_ext):
    """build_ext that adds SOURCE_FLAGS[source] to that source's compile command (setuptools has
    per-extension flags only: the compiler's per-file step, _compile, is wrapped) and compiles an
    extension's sources build_jobs() at a time (setuptools compiles them one by one: its `--parallel`
    runs whole extensions side by side)."""

    def build_extensions(self):
        compiler = self.compiler
        compile_file = compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            key = os.path.relpath(os.path.abspath(src), HERE).replace(os.sep, "/")
            compile_file(obj, src, ext, cc_args, list(extra_postargs or []) + SOURCE_FLAGS.get(key, []), pp_opts)

        def compile_sources(sources, output_dir=None, macros=None, include_dirs=None, debug=False,
                            extra_preargs=None, extra_postargs=None, depends=None):
            # CCompiler.compile's steps, with its loop over the out-of-date objects run on a thread pool
            # (each _compile is one compiler process; a failure raises out of the map)
            macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
                output_dir, macros, include_dirs, sources, depends, extra_postargs)
            cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)
            todo = [(obj, *build[obj]) for obj in objects if obj in build]
            with ThreadPoolExecutor(max_workers=BUILD_JOBS) as pool:
                list(pool.map(lambda job: _compile(job[0], job[1], job[2], cc_args, extra_postargs, pp_opts), todo))
            return objects

        compiler._compile = _compile
        compiler.compile = compile_sources
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
