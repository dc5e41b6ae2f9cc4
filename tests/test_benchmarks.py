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
              "16", "--batch", "2", "--repeats", "1"]
# script, arguments for its smallest run, a fragment of its last output
RUNS = [
    ("bench_overhead.py", ["--rounds", "1"], "torch x*2 forward+backward"),
    ("bench_layer.py", ["--quick", "--only", "decode"], "targets:"),
    ("bench_gemm.py", ["--quick", "--rounds", "1"], "share"),
    ("bench_plans.py", ["--quick", "--rounds", "1"], "plans measured"),
    ("bench_dora.py", ["--quick", "--rounds", "1"], "DoRA ratios measured"),
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


# The GPU scripts in their CPU smoke mode (tiny shapes, wall-clock timing: they check the plumbing, module
# construction and JSON output, not the CUDA kernels); profile_gpu.py needs a GPU and must say so.
GPU_RUNS = [
    ("bench_gpu.py", ["--device", "cpu", "--rounds", "1", "--iters", "1", "--warmup", "1"], 0, "kernel path measured"),
    ("bench_gpu_train.py", ["--device", "cpu", "--rounds", "1", "--steps", "1", "--warmup", "1"], 0,
     "ours / peft training step"),
    ("profile_gpu.py", [], 2, "no CUDA GPU"),
]


@pytest.mark.parametrize("script,args,rc,text", GPU_RUNS, ids=[r[0] for r in GPU_RUNS])
def test_gpu_benchmark_script_smoke(script: str, args: list, rc: int, text: str, tmp_path) -> None:
    torch = pytest.importorskip("torch")
    if script == "profile_gpu.py" and torch.cuda.is_available():
        pytest.skip("a GPU is present: profile_gpu.py runs for real in benchmarks/gpu_check.sh")
    json_args = ["--json", str(tmp_path / "out.json")] if rc == 0 else []
    res = subprocess.run([sys.executable, script, *args, *json_args], cwd=BENCH_DIR, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == rc, f"{script} exited {res.returncode}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    assert text in res.stdout + res.stderr, f"{script}: {text!r} not in its output:\n{res.stdout[-2000:]}"
    if rc == 0:
        import json

        assert json.loads((tmp_path / "out.json").read_text())["device_type"] == "cpu"
