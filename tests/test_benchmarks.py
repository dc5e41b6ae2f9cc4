"""The benchmark scripts still run: each one, at its smallest settings, in a subprocess, must exit 0
and print its closing line. (A script that drifted from a helper's signature — `bench_overhead.py`
unpacked three layers from `make_layers` after it had grown a fourth — fails here instead of at
the next person who wants its figures.) Figures are not checked: timed assertions do not belong
in tests. ~1.5–2 min (the compiled training run alone ~45 s)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")

TINY_TRAIN = ["--steps", "2", "--layers", "1", "--hidden", "64", "--intermediate", "128", "--vocab", "101", "--seq",
              "16", "--batch", "2"]
# script, arguments for its smallest run, a fragment of its last output
RUNS = [
    ("bench_overhead.py", ["--rounds", "1"], "torch x*2 forward+backward"),
    ("bench_layer.py", ["--quick", "--only", "decode"], "targets:"),
    ("bench_gemm.py", ["--quick", "--rounds", "1"], "share"),
    ("bench_ops.py", ["--quick", "--rounds", "1"], "ratio alternating"),
    ("bench_lora_cost.py", ["--rounds", "1"], "512   1024   1024  16"),
    ("bench_train.py", TINY_TRAIN, "ratio lorafuse/PEFT"),
    ("bench_train.py", TINY_TRAIN + ["--compile"], "ratio lorafuse/PEFT"),
]
IDS = [script + (" --compile" if "--compile" in args else "") for script, args, _ in RUNS]


@pytest.mark.parametrize("script,args,last", RUNS, ids=IDS)
def test_benchmark_script_runs(script: str, args: list, last: str) -> None:
    res = subprocess.run([sys.executable, script, *args, "--threads", "2"], cwd=BENCH_DIR, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, f"{script} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    assert last in res.stdout, f"{script}: {last!r} not in its output:\n{res.stdout[-2000:]}"
