"""What every CPU benchmark script here shares. The timing itself is lorafuse's own harness
(`lorafuse.bench_cli`, which `lorafuse bench` runs on): candidates run interleaved, round-robin in
rotated order, so drift in the machine (turbo, a noisy neighbour) hits every candidate alike; each
gets the median of its rounds; a `Candidate` carries the contexts it runs in (grad mode, train/eval,
the output cache off). This module adds the scripts' common command line (--threads, --rounds,
--quick) and their header. Thread counts are set equal for torch and lorafuse before anything is timed."""
from __future__ import annotations

import argparse
import platform
import subprocess
import time

from lorafuse.bench_cli import (PASSES, Candidate, interleaved, lora_layer, make_base,  # noqa: F401  (re-exported)
                                make_inputs, max_abs_diff, mode, pass_candidates, pass_grid, path_label, plan_label,
                                rotated, set_threads)


def arguments(description: str, rounds: int = 9, quick: str | None = None) -> argparse.ArgumentParser:
    """The common command line: --threads (default 2), --rounds (default ``rounds``), and --quick
    (3 rounds and what ``quick`` says) where the script has a quick mode. Scripts add their own flags."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=rounds)
    if quick:
        ap.add_argument("--quick", action="store_true", help=f"{quick}, 3 rounds")
    return ap


def begin(args: argparse.Namespace, title: str) -> int:
    """Thread counts set for both sides and the header printed; returns the rounds to run (3 under --quick)."""
    set_threads(args.threads)
    header(title, args.threads)
    return 3 if getattr(args, "quick", False) else args.rounds


def start(description: str, title: str, rounds: int = 9) -> argparse.Namespace:
    """`arguments` parsed and `begin` done, for a script with no flags of its own. Returns the arguments."""
    args = arguments(description, rounds).parse_args()
    begin(args, title)
    return args


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
    """The first lines of a script's output: title, date, CPU, lorafuse version and ISA, threads."""
    import lorafuse

    print(f"# {title}")
    print(f"# date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | CPU {cpu_line()}")
    print(f"# lorafuse {lorafuse.__version__} ISA {lorafuse._C.get_isa()} | threads {threads} for every side")
