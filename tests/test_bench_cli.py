"""`lorafuse bench --quick` runs end to end (no timing assertions)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")


def test_bench_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lorafuse", "bench", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lorafuse/PEFT" in proc.stdout and "fwd+bwd" in proc.stdout
    assert (tmp_path / "bench.png").stat().st_size > 1000
    data = json.loads((tmp_path / "bench.json").read_text())
    assert len(data["rows"]) == 2
    for row in data["rows"]:
        assert row["max_abs_diff_vs_peft"] < 1e-3
        assert len(row["median_s"]) == 6 and all(t > 0 for t in row["median_s"].values())
        # every row names the fused paths it measured: a forward plan, and a backward one for fwd+bwd
        fwd, train = row["lorafuse_plan"]["fwd"], row["lorafuse_plan"]["fwd+bwd"]
        assert fwd.count("/") == 1 and train.count(" + ") == 1, row["lorafuse_plan"]
        assert train in proc.stdout


def test_bench_custom_shape_in_process(tmp_path, capsys):
    from lorafuse.cli import main

    assert main(["bench", "--shapes", "8,16,24,2", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert "8×16×24, r=2" in capsys.readouterr().out


def test_parse_shapes():
    from lorafuse.bench_cli import parse_shapes

    assert parse_shapes("1,2,3,4;5,6,7,8") == [(1, 2, 3, 4), (5, 6, 7, 8)]
    for bad in ("1,2,3", "0,2,3,4", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_shapes(bad)
