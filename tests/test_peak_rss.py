"""`lorafuse.peak_rss.peak_rss_mib`: a process's own peak, not its parent's. getrusage's ru_maxrss (what the demo
and bench_train.py read before) carries the parent's peak into a child across fork and exec, so a side started
from a large process reported that process's memory."""
from __future__ import annotations

import subprocess
import sys

from lorafuse.peak_rss import peak_rss_mib

CHILD = "from lorafuse.peak_rss import peak_rss_mib; print(peak_rss_mib())"


def test_a_child_reports_its_own_peak_not_its_parents() -> None:
    ballast = bytearray(768 << 20)
    ballast[::4096] = b"\x01" * len(range(0, len(ballast), 4096))  # every page touched: resident here
    parent = peak_rss_mib()
    child = float(subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout)
    assert parent >= 768, parent
    assert 0 < child < 256, (child, parent)  # an interpreter and lorafuse's extension, none of the parent's 768 MiB
    del ballast


GROWTH = """
from lorafuse.peak_rss import peak_rss_mib
before = peak_rss_mib()
ballast = bytearray(256 << 20)
ballast[::4096] = b"\\x01" * len(range(0, len(ballast), 4096))
during = peak_rss_mib()
del ballast
print(before, during, peak_rss_mib())
"""


def test_the_peak_grows_with_what_a_process_touches_and_stays_after_it_is_freed() -> None:
    # in a fresh process, whose peak so far is small: 256 MiB touched must raise it by as much
    out = subprocess.run([sys.executable, "-c", GROWTH], capture_output=True, text=True, check=True).stdout
    before, during, after = map(float, out.split())
    assert during >= before + 256, (before, during)
    # the kernel's RSS counters are per-CPU caches, exact to 64 pages a thread: the freed 256 MiB stay counted
    assert after >= during - 4, (during, after)
