"""This process's peak resident memory: the memory figures of `lorafuse demo` and benchmarks/bench_train.py."""
from __future__ import annotations

import sys


def peak_rss_mib() -> float:
    """Peak resident set size of this process image, in MiB.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of the process's own memory map, which starts
    afresh at exec. getrusage's ``ru_maxrss`` does not: a child inherits its parent's peak at fork and keeps it
    across exec, so a side started from a 650 MiB process (a notebook, a test run) reported at least 650 MiB
    whatever it used. Elsewhere ``ru_maxrss`` (bytes on macOS, kB on the other Unixes).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # "VmHWM:   123456 kB"
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2.0**20 if sys.platform == "darwin" else peak / 1024.0
