"""Threads, instruction set and build facts of the C extension."""
from __future__ import annotations

import os
import sys
from typing import Optional

from . import _C

__all__ = ["set_num_threads", "get_num_threads", "show_config", "default_num_threads", "set_output_cache_limit",
           "output_cache_stats"]


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> Optional[int]:
    """The CPUs this process's cgroup (v2) grants it — its CPU quota over its period, rounded up, the smallest
    along the path from its own cgroup up to ``root`` (a container's `--cpus`, a Kubernetes CPU limit) — or
    None where no quota applies or the files cannot be read. The affinity mask does not show such a limit: a
    container limited to 2 CPUs on a 64-core host sees 64."""
    try:
        with open(proc_cgroup, encoding="ascii") as f:
            path = next((line[3:].strip() for line in f if line.startswith("0::")), "/")
    except (OSError, UnicodeDecodeError):
        path = "/"
    limits = []
    while True:
        try:
            with open(os.path.join(root, path.lstrip("/"), "cpu.max"), encoding="ascii") as f:
                quota, period = f.read().split()[:2]
            if quota != "max" and int(period) > 0:
                limits.append(max(1, -(-int(quota) // int(period))))
        except (OSError, ValueError, UnicodeDecodeError):  # no such file (or level), or not "QUOTA PERIOD"
            pass
        if path in ("", "/"):
            break
        path = os.path.dirname(path.rstrip("/"))
    return min(limits) if limits else None


def default_num_threads() -> int:
    """The thread count torch would use if it is imported (so that lorafuse and torch compare at equal
    thread counts), else OMP_NUM_THREADS, else the CPUs this process may run on: its affinity mask, capped
    by its cgroup's CPU quota (`cgroup_cpu_limit`)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return max(1, int(torch.get_num_threads()))
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cpus, limit) if limit else cpus)


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
