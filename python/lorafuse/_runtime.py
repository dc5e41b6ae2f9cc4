"""Threads, instruction set and build facts of the C extension."""
from __future__ import annotations

import os
import sys

from . import _C

__all__ = ["set_num_threads", "get_num_threads", "show_config", "default_num_threads", "set_output_cache_limit",
           "output_cache_stats"]


def default_num_threads() -> int:
    """The thread count torch would use if it is imported, else the CPUs this process may run on
    (respecting OMP_NUM_THREADS): so that lorafuse and torch compare at equal thread counts."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return max(1, int(torch.get_num_threads()))
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def set_num_threads(n: int) -> None:
    """Threads used by every lorafuse CPU kernel (the caller's thread counts as one)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"set_num_threads: n must be an int, got {type(n).__name__}")
    _C.set_num_threads(n)


def get_num_threads() -> int:
    """Threads the CPU kernels use."""
    return _C.get_num_threads()


def set_output_cache_limit(max_bytes: int) -> int:
    """Most bytes of freed output memory the CPU kernels keep for reuse; returns the old limit.

    Large outputs (y, u, dx, dA, dB of ≥ 256 KiB) are 64-byte-aligned blocks that go back to
    lorafuse, not to the C library, when their array or tensor dies, and the next output of a
    similar size takes one: a training step then allocates no fresh pages for them (glibc
    shrinks and regrows the heap otherwise, faulting in every page each step). Default 64 MiB;
    0 keeps nothing (plain NumPy allocations). A non-int is a TypeError, a negative one a ValueError.
    """
    return _C.set_output_cache_limit(max_bytes)


def output_cache_stats() -> dict:
    """The output cache: ``limit``, ``held_bytes``/``held_blocks`` (kept, free),
    ``lent_bytes``/``lent_blocks`` (in live arrays), ``hits`` and ``misses`` (requests served
    from a kept block / by a new allocation)."""
    return _C.output_cache_stats()


def _cuda_line() -> str:
    try:
        from . import cuda
    except ImportError:
        return "not compiled in"
    info = getattr(cuda, "cuda_info", None)
    return str(info()) if info else "not compiled in"


# the kernels' instruction-set levels in lf_isa's order (kernels/include/lorafuse/kernels.h), each a superset
# of the one before
ISA_LEVELS = ("generic", "avx2", "avx512", "avx512_bf16", "amx_bf16")


def show_config() -> None:
    """Print version, the ISA chosen at run time (and the levels this CPU can be set to), threads, and
    CUDA support."""
    best = _C.cpu_isa()
    usable = "|".join(ISA_LEVELS[: ISA_LEVELS.index(best) + 1])
    print(f"lorafuse {_C.__version__}")
    print(f"  CPU ISA:  {_C.get_isa()} (best on this CPU: {best}; override with LORAFUSE_ISA={usable})")
    print(f"  threads:  {_C.get_num_threads()} (lorafuse.set_num_threads) on {_C.threading_backend()}")
    cache = _C.output_cache_stats()
    print(f"  outputs:  up to {cache['limit'] / 2**20:.0f} MiB of freed output blocks kept for reuse "
          f"(lorafuse.set_output_cache_limit), {cache['held_bytes'] / 2**20:.1f} MiB kept now")
    print(f"  CUDA:     {_cuda_line()}")


def _init_from_env() -> None:
    isa = os.environ.get("LORAFUSE_ISA", "").strip().lower()
    if isa:
        _C.set_isa(isa)  # ValueError names the ISA if this CPU lacks it
    _C.set_num_threads(default_num_threads())
