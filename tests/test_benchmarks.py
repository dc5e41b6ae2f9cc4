"""The benchmark scripts still run: each one, at its smallest settings, run as `python SCRIPT ARGS` runs it
(as ``__main__``, its folder first on sys.path) but in this process — in a subprocess each paid ~9 s importing
peft again, most of this file's time — must exit 0 and print its closing line and the rows and labels the
results page relies on (the three passes, the output-cache-off column, the path each lorafuse row took). (A
script that drifted from a helper's signature — `bench_overhead.py` unpacked three layers from `make_layers`
after it had grown a fourth — fails here instead of at the next person who wants its figures.) Figures are not
checked: timed assertions do not belong in tests. ~1 min (bench_train.py's children are processes still); its
compiled, bf16, autocast and 4-bit runs (~1 min each, all four candidates) are marked ``slow`` (CI's second
stage)."""
from __future__ import annotations

import importlib.util
import os
import re
import runpy
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")

TINY_TRAIN = ["--steps", "2", "--layers", "1", "--hidden", "64", "--intermediate", "128", "--vocab", "101", "--seq",
              "16", "--batch", "2", "--repeats", "1"]
PASS_ROWS = [r"forward \(no_grad\)", r"forward \(grad\)", r"fwd\+bwd"]
C_PATH = r"c \w+/\w+"  # a lorafuse row that ran the C kernels, with their plan (e.g. 'c none/merged')
TRAIN_ROWS = [r"# method: one fresh process per candidate", r"lorafuse-nocache +peak RSS",
              r"peft +peak RSS .* path peft", re.escape("ratio lorafuse/PEFT")]
TRAIN_C = TRAIN_ROWS + [rf"lorafuse +peak RSS .* path {C_PATH}"]
# the suite's run: two of the four candidates (a process each, ~9 s of imports apiece); the slow runs take all four
TRAIN_TWO = [r"# method: one fresh process per candidate", rf"lorafuse +peak RSS .* path {C_PATH}",
             r"peft +peak RSS .* path peft", re.escape("ratio lorafuse/PEFT")]


THIS_BUILD = importlib.util.find_spec("lorafuse._C").origin  # bench_builds.py compares it with itself


NO_BNB = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                            reason="bitsandbytes not installed: the QLoRA benchmarks compare against it")


def run(script: str, args: list, patterns: list, slow: bool = False, bnb: bool = False) -> object:
    """One smoke run: the script, its arguments, regular expressions its output must match."""
    name = " ".join([script, *(a for a in args if a in ("--compile", "bf16", "nf4", "--kbit"))])
    marks = ([pytest.mark.slow] if slow else []) + ([NO_BNB] if bnb else [])
    return pytest.param(script, args, patterns, id=name, marks=marks)


RUNS = [
    run("bench_overhead.py", ["--rounds", "1"],
        [r"FusedLinear module, forward \(grad\)", r"PEFT lora.Linear module, forward \(no_grad\)",
         re.escape("torch x*2 forward+backward")]),
    run("bench_layer.py", ["--quick", "--only", "decode"],
        [rf"decode .* \| {row} .*\| {C_PATH}" for row in PASS_ROWS] + ["cache off/peft", "targets:"]),
    run("bench_layer.py", ["--quick", "--only", "decode", "--dtype", "bf16", "--rounds", "1"],
        [rf"decode .* \| {row} .*\| {C_PATH}" for row in PASS_ROWS] + [r"\(bf16\)", "targets:"]),
    run("bench_gemm.py", ["--quick", "--rounds", "1"], ["share"]),
    run("bench_plans.py", ["--quick", "--rounds", "1"], ["plans measured"]),
    run("bench_dora.py", ["--quick", "--rounds", "1"],
        [rf"{row} .*lorafuse DoRA path: {C_PATH}" for row in PASS_ROWS] + ["cache off", "DoRA ratios measured"]),
    run("bench_dora.py", ["--quick", "--rounds", "1", "--dtype", "bf16"],
        [rf"{row} .*lorafuse DoRA path: {C_PATH}" for row in PASS_ROWS] + ["bf16 base", "DoRA ratios measured"]),
    run("bench_builds.py", ["--quick", "--rounds", "1", THIS_BUILD, THIS_BUILD],
        [rf"{row} +#0 .*\(1\.000\) +#1 " for row in ("sgemm", r"LoRA f\+b", r"DoRA f\+b")]
        + [r"plans +#0 [^:]+: \w+/\w+ \+ \w+/\w+/\w+ +#1 [^:]+: \w+/\w+ \+ \w+/\w+/\w+", "builds measured"]),
    run("bench_ops.py", ["--quick", "--rounds", "1"],
        [rf"  {row} +[0-9.]+ +[0-9.]+ +[0-9.]+ \|" for row in PASS_ROWS]
        + [re.escape("preallocated out=/u_out="), "ratio alternating"]),
    run("bench_lora_cost.py", ["--rounds", "1"], ["cache off", "512   1024   1024  16"]),
    run("bench_q4gemm.py", ["--quick", "--rounds", "1"],
        [r"\| +(amx_bf16|bf16_pairs|widened) \|", "q4 fused: one GEMM"]),
    run("bench_qlora.py", ["--quick", "--rounds", "1"],
        [rf" 64 +256 +256 +8 \| {row} .*\| {C_PATH}" for row in PASS_ROWS] + [r"W bytes/fp32", "targets:"], bnb=True),
    run("bench_decode.py", ["--quick", "--rounds", "1"],
        [rf"  {n} {rows} +\| .*\| c skinny/decode; c skinny/decode" for n in (1, 8) for rows in ("stack", "one ")]
        + ["2 layers of 1024×1024", "targets:"], bnb=True),
    run("bench_qlora.py", ["--quick", "--rounds", "1", "--quant", "int8"],
        [rf" 64 +256 +256 +8 \| {row} .*\| {C_PATH}" for row in PASS_ROWS[1:]] + [r"q8/peft\+bnb", "Linear8bitLt"],
        bnb=True),
    run("bench_train.py", TINY_TRAIN + ["--candidates", "lorafuse,peft"], TRAIN_TWO),
    run("bench_train.py", TINY_TRAIN + ["--quant", "nf4", "--kbit"],
        [r"base nf4 .*prepare_model_for_kbit_training", rf"lorafuse +peak RSS .* path {C_PATH}",
         r"peft +peak RSS .* path peft", re.escape("ratio lorafuse/PEFT")], slow=True, bnb=True),
    run("bench_train.py", TINY_TRAIN + ["--compile"], TRAIN_C, slow=True),
    run("bench_train.py", TINY_TRAIN + ["--dtype", "bf16"],
        TRAIN_ROWS + [r"bf16, batch", rf"lorafuse +peak RSS .* path {C_PATH}"], slow=True),
    run("bench_train.py", TINY_TRAIN + ["--dtype", "autocast"],
        TRAIN_ROWS + [r"autocast, batch", rf"lorafuse +peak RSS .* path {C_PATH}"], slow=True),
]


@pytest.fixture
def run_script(monkeypatch, capsys):
    """``run_script(script, args)`` → (exit status, stdout, stderr) of ``python SCRIPT ARGS`` in benchmarks/, run
    in this process; what a script may set process-wide — torch's and lorafuse's threads, the forced ISA, the
    output cache's limit — is put back after."""
    import torch

    import lorafuse
    from lorafuse import _C

    threads, isa = (torch.get_num_threads(), lorafuse.get_num_threads()), _C.get_isa()
    cache_limit = lorafuse.output_cache_stats()["limit"]
    monkeypatch.syspath_prepend(BENCH_DIR)
    monkeypatch.chdir(BENCH_DIR)

    def run(script: str, args: list) -> tuple:
        monkeypatch.setattr(sys, "argv", [script, *args])
        status = 0
        try:
            runpy.run_path(os.path.join(BENCH_DIR, script), run_name="__main__")
        except SystemExit as exc:  # sys.exit(code): None 0, an int itself, a message 1 (printed, as Python does)
            status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            if status and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        out, err = capsys.readouterr()
        return status, out, err

    yield run
    torch.set_num_threads(threads[0])
    lorafuse.set_num_threads(threads[1])
    _C.set_isa(isa)
    lorafuse.set_output_cache_limit(cache_limit)


@pytest.mark.parametrize("script,args,patterns", RUNS)
def test_benchmark_script_runs(script: str, args: list, patterns: list, run_script) -> None:
    status, out, err = run_script(script, [*args, "--threads", "2"])
    assert status == 0, f"{script} failed:\n{out[-2000:]}\n{err[-4000:]}"
    for pattern in patterns:
        assert re.search(pattern, out), f"{script}: {pattern!r} not in its output:\n{out[-3000:]}"


@pytest.mark.parametrize("candidates", ["lorafuse", "lorafuse,peftx"])
def test_bench_train_refuses_candidates_without_peft_or_unknown(candidates: str, run_script) -> None:
    status, out, err = run_script("bench_train.py", TINY_TRAIN + ["--candidates", candidates])
    assert status == 2 and "--candidates" in err and "peft among them" in err and not out, (status, out, err)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bench_gemm_without_avx2_leaves_the_peak_unmeasured(dtype, monkeypatch, capsys) -> None:
    """Where lorafuse's ISA is 'generic' (not x86-64, or no AVX2) fma_peak.c cannot be built or run: bench_gemm
    must still measure the GEMMs and print '—' for the share of the peak (tiny shapes, in this process)."""
    from lorafuse import _C

    monkeypatch.syspath_prepend(BENCH_DIR)
    import bench_gemm

    monkeypatch.setattr(_C, "cpu_isa", lambda: "generic")
    monkeypatch.setattr(bench_gemm, "fma_peak", lambda *a: pytest.fail("fma_peak.c run on a 'generic' CPU"))
    monkeypatch.setattr(bench_gemm, "SHAPES", [(8, 16, 24)] * 3)
    monkeypatch.setattr(bench_gemm, "packing_share", lambda rounds: None)
    monkeypatch.setattr(sys, "argv", ["bench_gemm.py", "--quick", "--rounds", "1", "--threads", "1", "--dtype", dtype])
    isa = _C.get_isa()
    try:
        bench_gemm.main()
    finally:
        _C.set_isa(isa)
    out = capsys.readouterr().out
    assert "not measured" in out and re.search(r"     8     16     24 \|.*\| +— *$", out, re.M), out


def test_bench_train_repeats_at_least_three_by_default() -> None:
    spec = importlib.util.spec_from_file_location("bench_train", os.path.join(BENCH_DIR, "bench_train.py"))
    bench_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_train)
    assert bench_train.build_parser().parse_args([]).repeats >= 3


# The GPU scripts in their CPU smoke mode (tiny shapes, wall-clock timing: they check the plumbing, module
# construction and JSON output, not the CUDA kernels); profile_gpu.py needs a GPU and must say so.
GPU_RUNS = [
    ("bench_gpu.py", ["--device", "cpu", "--rounds", "1", "--iters", "1", "--warmup", "1"], 0, "kernel path measured"),
    ("bench_gpu_train.py", ["--device", "cpu", "--rounds", "1", "--steps", "1", "--warmup", "1"], 0,
     "ours / peft training step"),
    ("profile_gpu.py", [], 2, "no CUDA GPU"),
]


@pytest.mark.parametrize("script,args,rc,text", GPU_RUNS, ids=[r[0] for r in GPU_RUNS])
def test_gpu_benchmark_script_smoke(script: str, args: list, rc: int, text: str, tmp_path, run_script) -> None:
    torch = pytest.importorskip("torch")
    if script == "profile_gpu.py" and torch.cuda.is_available():
        pytest.skip("a GPU is present: profile_gpu.py runs for real in benchmarks/gpu_check.sh")
    json_args = ["--json", str(tmp_path / "out.json")] if rc == 0 else []
    status, out, err = run_script(script, [*args, *json_args])
    assert status == rc, f"{script} exited {status}:\n{out[-2000:]}\n{err[-4000:]}"
    assert text in out + err, f"{script}: {text!r} not in its output:\n{out[-2000:]}"
    if rc == 0:
        import json

        assert json.loads((tmp_path / "out.json").read_text())["device_type"] == "cpu"
