"""CI smoke run of the atheris harnesses in fuzz/ (a few seconds each), plus regression tests
for what the fuzzers found.

The long runs (minutes per harness, figures for RESULTS.md) are marked ``slow`` and run with
``pytest -m slow tests/test_fuzz_smoke.py`` or directly, e.g.
``python fuzz/fuzz_loader.py -max_total_time=300 -print_final_stats=1 corpus/``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

atheris = pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris; it is in the "
                                                "test extras) — the fuzz harnesses cannot run")

ROOT = Path(__file__).resolve().parents[1]
HARNESSES = ["fuzz_ops.py", "fuzz_loader.py"]
SMOKE_SECONDS = int(os.environ.get("LORAFUSE_FUZZ_SMOKE_S", "6"))


def run_harness(name: str, seconds: int, corpus: Path, artifacts: Path) -> dict:
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "fuzz" / name), f"-max_total_time={seconds}", "-timeout=30",
           "-print_final_stats=1", f"-artifact_prefix={artifacts}/", "-rss_limit_mb=4096", str(corpus)]
    env = dict(os.environ, LORAFUSE_FUZZ_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 240, env=env, cwd=ROOT)
    out = proc.stdout + proc.stderr
    stats = {k: int(v) for k, v in re.findall(r"stat::(\w+):\s+(\d+)", out)}
    stats["returncode"] = proc.returncode
    stats["corpus"] = len(list(corpus.iterdir()))
    stats["crashes"] = len([p for p in artifacts.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))])
    stats["log_tail"] = out[-3000:]
    return stats


@pytest.mark.parametrize("name", HARNESSES)
def test_fuzz_smoke(name: str, tmp_path: Path) -> None:
    stats = run_harness(name, SMOKE_SECONDS, tmp_path / "corpus", tmp_path / "artifacts")
    assert stats["returncode"] == 0 and stats["crashes"] == 0, stats["log_tail"]
    assert stats.get("number_of_executed_units", 0) > 20, stats["log_tail"]
    print(f"{name}: {stats['number_of_executed_units']} executions in {SMOKE_SECONDS} s, 0 crashes, "
          f"corpus {stats['corpus']}")


@pytest.mark.slow
@pytest.mark.skipif("LORAFUSE_FUZZ_LONG_S" not in os.environ,
                    reason="long fuzz run (minutes): set LORAFUSE_FUZZ_LONG_S=300 [LORAFUSE_FUZZ_CORPUS=dir]")
@pytest.mark.parametrize("name", HARNESSES)
def test_fuzz_long(name: str, tmp_path: Path) -> None:
    seconds = int(os.environ["LORAFUSE_FUZZ_LONG_S"])
    corpus_root = Path(os.environ.get("LORAFUSE_FUZZ_CORPUS", tmp_path))
    stats = run_harness(name, seconds, corpus_root / name.replace(".py", ""), tmp_path / "artifacts")
    print(f"{name}: {stats.get('number_of_executed_units')} executions in {seconds} s, {stats['crashes']} crashes, "
          f"corpus {stats['corpus']}, peak RSS {stats.get('peak_rss_mb')} MB")
    assert stats["returncode"] == 0 and stats["crashes"] == 0, stats["log_tail"]


# --------------------------------------------------------------------------- regressions from fuzzing


def test_dlpack_conversion_failures_are_type_errors() -> None:
    torch = pytest.importorskip("torch")
    from lorafuse import ops

    W, B = np.zeros((4, 3), np.float32), np.zeros((4, 2), np.float32)
    for bad in (torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3).to_sparse(),
                torch.zeros(2, 3, device="meta")):
        with pytest.raises(TypeError, match="A"):
            ops.lora_forward(np.zeros((5, 3), np.float32), W, bad, B, 1.0)
    # a tensor that requires grad is only read as an input, and refused as an output
    A = torch.ones(2, 3, requires_grad=True)
    y, _ = ops.lora_forward(np.ones((5, 3), np.float32), W, A, np.ones((4, 2), np.float32), 1.0)
    np.testing.assert_array_equal(y, np.full((5, 4), 6.0, np.float32))
    with pytest.raises(TypeError, match="out requires grad"):
        ops.lora_forward(np.zeros((5, 3), np.float32), W, A.detach(), B, 1.0, out=torch.zeros(5, 4, requires_grad=True))


@pytest.mark.parametrize("value", [1, {"a": 1}])
def test_non_string_layers_pattern_is_an_adapter_file_error(tmp_path: Path, value: object) -> None:
    torch = pytest.importorskip("torch")
    from lorafuse import LoraConfig, get_peft_model
    from lorafuse.io_validate import AdapterFileError, read_adapter_dir

    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg.update(layers_pattern=value, layers_to_transform=1)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError):
        read_adapter_dir(str(tmp_path))


@pytest.mark.parametrize("rows2d", [(3, 64), (2, 32), (4, 0)])
def test_q4_handle_of_a_shape_its_arrays_cover_is_that_w(rows2d: tuple) -> None:
    """A 4-bit handle given a shape its stored arrays still cover (fewer rows, narrower, no columns) stands for
    the W of that shape the arrays hold — what `_C.dequant_4bit` of the same arguments gives — and the LoRA kernels
    on it compute what they compute on that W dense. (fuzz_ops.py once compared such a handle against the
    dequantized W of the unperturbed shape: a harness error, `fuzz_q4` now takes the handle's own values.)"""
    torch = pytest.importorskip("torch")
    from lorafuse import _C, ops, quant

    data, state = quant.quantize_weight(torch.randn(4, 64, generator=torch.Generator().manual_seed(3)), "nf4")
    d, absmax, _, kw, _ = quant._stored(data, state, "test")
    handle = _C.q4_weight(d, absmax, rows2d, 64, "nf4", dtype="bfloat16", **kw)
    W = torch.empty(rows2d, dtype=torch.bfloat16)
    _C.dequant_4bit(d, absmax, rows2d, 64, "nf4", "bfloat16", out=W, **kw)
    x = torch.randn(5, rows2d[1], generator=torch.Generator().manual_seed(4)).bfloat16()
    A, B = torch.randn(2, rows2d[1]) * 0.1, torch.randn(rows2d[0], 2) * 0.1
    y_q, _ = ops.lora_forward(x, handle, A, B, 0.5)
    y_d, _ = ops.lora_forward(x, W, A, B, 0.5)
    assert np.array_equal(y_q, y_d)
