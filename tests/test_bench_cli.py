"""`lorafuse bench --quick` runs end to end, and the timing harness it shares with benchmarks/ does what
the results page says: rotated order, contexts outside the clock, the output cache off, the passes'
grad and train modes, equal layers from both libraries, honest path labels (no timing assertions)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")


def test_bench_quick(tmp_path):
    from lorafuse.bench_cli import IMPLS, PASSES

    proc = subprocess.run([sys.executable, "-m", "lorafuse", "bench", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lorafuse/PEFT" in proc.stdout and "cache off/PEFT" in proc.stdout
    assert all(p in proc.stdout for p in PASSES)
    assert (tmp_path / "bench.png").stat().st_size > 1000
    data = json.loads((tmp_path / "bench.json").read_text())
    assert len(data["rows"]) == 2
    for row in data["rows"]:
        assert row["max_abs_diff_vs_peft"] < 1e-3
        assert sorted(row["median_s"]) == sorted(f"{i}|{p}" for i in IMPLS for p in PASSES)
        assert all(t > 0 for t in row["median_s"].values())
        # every row names the path it measured: the C kernels, a forward plan, and a backward one for fwd+bwd
        paths = row["lorafuse_path"]
        assert all(paths[p].startswith("c ") and paths[p].count("/") == 1 for p in PASSES[:2]), paths
        assert paths["fwd+bwd"].startswith("c ") and paths["fwd+bwd"].count(" + ") == 1, paths
        assert paths["fwd+bwd"] in proc.stdout


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


def test_interleaved_rotates_the_order_and_primes():
    from lorafuse.bench_cli import interleaved, rotated

    assert rotated("abc", 1) == ["b", "c", "a"] and rotated("abc", 5) == ["c", "a", "b"]
    calls: list[str] = []
    cands = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    medians = interleaved(cands, rounds=4, min_time=0.0, warmup=0, prime=True)
    assert sorted(medians) == ["a", "b", "c"]
    # one calibration call each, then each round: a primed call and one timed call, the start rotating
    rounds = [calls[3 + 6 * i: 9 + 6 * i] for i in range(4)]
    assert calls[:3] == ["a", "b", "c"] and len(calls) == 3 + 4 * 6
    assert [r[::2] for r in rounds] == [rotated("abc", i) for i in range(4)]
    assert all(r[0::2] == r[1::2] for r in rounds)


def test_candidate_contexts_and_the_output_cache_off():
    import lorafuse
    from lorafuse.bench_cli import Candidate, interleaved

    seen: list[tuple] = []
    probe = Candidate(lambda: seen.append((torch.is_grad_enabled(), lorafuse.output_cache_stats()["limit"])),
                      (torch.no_grad,))
    limit = lorafuse.output_cache_stats()["limit"]
    assert limit > 0
    probe()
    probe.cache_off()()
    assert seen == [(False, limit), (False, 0)] and torch.is_grad_enabled()
    assert lorafuse.output_cache_stats()["limit"] == limit  # restored
    interleaved({"on": probe, "off": probe.cache_off()}, rounds=2, min_time=0.0, warmup=0)
    assert {s[1] for s in seen[2:]} == {0, limit} and all(not grad for grad, _ in seen)


def test_passes_run_in_their_modes_and_restore_them():
    from lorafuse.bench_cli import PASSES, pass_candidates

    seen: list[tuple] = []

    class Probe(torch.nn.Linear):
        def forward(self, x):
            seen.append((self.training, torch.is_grad_enabled()))
            return super().forward(x)

    probe = Probe(4, 3)
    probe.train(False)
    passes = pass_candidates(probe, torch.randn(2, 4), torch.randn(2, 3))
    for p in PASSES:
        passes[p]()
    assert seen == [(False, False), (True, True), (True, True)]
    assert probe.training is False and probe.weight.grad is not None  # fwd+bwd reached the parameters


def test_layers_of_both_libraries_compute_the_same_function():
    from lorafuse import FusedLinear
    from lorafuse.bench_cli import lora_layer, make_base, make_inputs, max_abs_diff

    base = make_base(24, 16)
    fused, stock = lora_layer(base, 4), lora_layer(base, 4, "peft")
    assert isinstance(fused, FusedLinear) and not isinstance(stock, FusedLinear)
    assert fused.base_layer is base and stock.base_layer is base
    assert fused.lora_B["default"].weight.abs().max() > 0  # the adapter does real work
    x, _ = make_inputs(5, 24, 16)
    assert max_abs_diff(fused, stock, x) < 1e-5
    bf16 = make_base(24, 16, torch.bfloat16)
    for library in ("lorafuse", "peft"):  # PEFT's default for a bf16 base: fp32 adapters
        assert lora_layer(bf16, 4, library).lora_A["default"].weight.dtype == torch.float32


def test_path_label_names_the_path_each_layer_took():
    from lorafuse.bench_cli import lora_layer, make_base, make_inputs, path_label

    x, _ = make_inputs(6, 24, 16)
    fused = lora_layer(make_base(24, 16), 4)
    label = path_label(lambda: fused(x), [fused])
    assert fused.lorafuse_path == "c" and label.startswith("c ") and label.count("/") == 1, label
    # a bf16 layer: whichever path it takes (PEFT's forward, or fused bf16 kernels), the label is that path
    half = lora_layer(make_base(24, 16, torch.bfloat16), 4)
    label = path_label(lambda: half(x.bfloat16()), [half])
    assert label.split()[0] == half.lorafuse_path and (label == "peft") == (half.lorafuse_path == "peft"), label
    both = path_label(lambda: (fused(x), half(x.bfloat16())), [fused, half])
    if half.lorafuse_path == "c":
        assert both == label, both
    else:
        assert both.startswith("c×1 peft×1 "), both  # counted where the layers' paths differ
