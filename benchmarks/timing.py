"""Shared timing for the benchmarks: candidates run interleaved, round-robin in rotated order, so drift in the
machine (turbo, a noisy neighbour) hits every candidate alike; each gets the median of its
rounds. Thread counts are set equal for torch and lorafuse before anything is timed."""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict

from lorafuse.bench_cli import plan_label  # noqa: F401  (the benchmarks label rows with it)


def set_threads(n: int) -> None:
    """Same thread count for torch (if imported) and lorafuse."""
    import lorafuse

    lorafuse.set_num_threads(n)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass


def start(description: str, title: str, rounds: int = 9) -> argparse.Namespace:
    """The common start of a benchmark script: --threads (default 2) and --rounds parsed, the
    thread counts set for both sides, the header printed. Returns the parsed arguments."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=rounds)
    args = ap.parse_args()
    set_threads(args.threads)
    header(title, args.threads)
    return args


def interleaved(cands: Dict[str, Callable[[], object]], rounds: int = 9, min_time: float = 0.02,
                warmup: int = 2) -> Dict[str, float]:
    """Median seconds per call for each candidate, timed round-robin over `rounds` rounds in rotated
    order; each round calls a candidate enough times to last ~min_time."""
    iters: Dict[str, int] = {}
    for name, fn in cands.items():
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()
        dt = max(time.perf_counter() - t0, 1e-7)
        iters[name] = max(1, int(min_time / dt))
    samples: Dict[str, list] = {name: [] for name in cands}
    order = list(cands.items())
    for i in range(rounds):
        # rotated: round i starts at candidate i, so no candidate always runs right after the same one
        # (caches it leaves warm or cold, frequency it leaves high)
        for name, fn in order[i % len(order):] + order[:i % len(order)]:
            n = iters[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
    return {name: statistics.median(s) for name, s in samples.items()}


def cpu_line() -> str:
    """Model name, cores and threads per core, from lscpu (falls back to platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    get = lambda k: fields.get(k, "?").strip()  # noqa: E731
    return (f"{get('Model name')}, {get('CPU(s)')} CPUs ({get('Core(s) per socket')} cores/socket, "
            f"{get('Thread(s) per core')} thread/core), L2 {get('L2 cache')}")


def header(title: str, threads: int) -> None:
    import lorafuse

    print(f"# {title}")
    print(f"# date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | CPU {cpu_line()}")
    print(f"# lorafuse {lorafuse.__version__} ISA {lorafuse._C.get_isa()} | threads {threads} for every side")
