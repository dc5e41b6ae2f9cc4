"""Run-time dispatch, threads and show_config: the ISA comes from cpuid (or LORAFUSE_ISA),
never from the build machine."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import lorafuse
from lorafuse import _C
from conftest import supported_isas


def run_py(code: str, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


@pytest.mark.parametrize("name", ["generic", "avx2", "avx512", "avx512_bf16", "amx_bf16"])
def test_env_var_forces_isa(name):
    res = run_py("import lorafuse; from lorafuse import _C; print(_C.get_isa())", LORAFUSE_ISA=name)
    if name in supported_isas():
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == name
    else:
        assert res.returncode != 0 and "does not support" in res.stderr


def test_env_var_rejects_unknown_isa():
    res = run_py("import lorafuse", LORAFUSE_ISA="sse9")
    assert res.returncode != 0 and "expected 'generic', 'avx2', 'avx512', 'avx512_bf16' or 'amx_bf16'" in res.stderr


def test_every_isa_gives_the_same_result_within_rounding():
    rng = np.random.default_rng(0)
    x, W = rng.standard_normal((50, 70), dtype=np.float32), rng.standard_normal((40, 70), dtype=np.float32)
    A, B = rng.standard_normal((4, 70), dtype=np.float32), rng.standard_normal((40, 4), dtype=np.float32)
    before = _C.get_isa()
    outs = []
    try:
        for name in supported_isas():
            _C.set_isa(name)
            outs.append(lorafuse.ops.lora_forward(x, W, A, B, 1.0)[0])
    finally:
        _C.set_isa(before)
    for y in outs[1:]:
        np.testing.assert_allclose(y, outs[0], rtol=1e-5, atol=1e-4)


def test_show_config_reports_version_isa_threads_cuda(capsys):
    lorafuse.show_config()
    text = capsys.readouterr().out
    assert f"lorafuse {lorafuse.__version__}" in text
    assert f"CPU ISA:  {_C.get_isa()}" in text
    # only the levels this CPU runs are offered (an x86 one on another CPU would be refused)
    assert f"override with LORAFUSE_ISA={'|'.join(supported_isas())})" in text
    assert f"threads:  {lorafuse.get_num_threads()}" in text
    assert "CUDA:" in text


def test_threads_follow_omp_num_threads_without_torch():
    res = run_py("import lorafuse; print(lorafuse.get_num_threads())", OMP_NUM_THREADS="1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "1"


def _cgroup_tree(tmp_path, own: str, cpu_max: dict) -> tuple:
    """A cgroup v2 mount under tmp_path with cpu.max files ({cgroup path: content}), and a /proc/self/cgroup
    file naming `own` as this process's cgroup (with v1 lines before it, as on a hybrid host)."""
    root = tmp_path / "cgroup"
    for path, text in cpu_max.items():
        (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/") / "cpu.max").write_text(text)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(f"4:memory:/x\n1:cpu:/\n0::{own}\n")
    return str(root), str(proc)


@pytest.mark.parametrize("own,cpu_max,want", [
    ("/", {"/": "max 100000\n"}, None),                                     # no quota
    ("/", {"/": "200000 100000\n"}, 2),                                     # docker --cpus 2
    ("/", {"/": "150000 100000\n"}, 2),                                     # 1.5 CPUs: rounded up
    ("/", {"/": "50000 100000\n"}, 1),                                      # half a CPU: one thread
    ("/kubepods/pod1/c1", {"/kubepods/pod1": "300000 100000", "/kubepods/pod1/c1": "max 100000"}, 3),
    ("/a/b", {"/": "800000 100000", "/a": "400000 100000", "/a/b": "600000 100000"}, 4),  # the smallest on the path
    ("/a", {}, None),                                                        # no cpu.max anywhere (cgroup v1 host)
    ("/", {"/": "garbage"}, None),                                           # unreadable: ignored
    ("/", {"/": "100000 0"}, None),                                          # a zero period: ignored
])
def test_cgroup_cpu_limit_reads_the_quota_on_the_process_path(tmp_path, own, cpu_max, want):
    from lorafuse._runtime import cgroup_cpu_limit

    root, proc = _cgroup_tree(tmp_path, own, cpu_max)
    assert cgroup_cpu_limit(root, proc) == want


def test_cgroup_cpu_limit_without_proc_file_reads_the_root(tmp_path):
    from lorafuse._runtime import cgroup_cpu_limit

    root, _ = _cgroup_tree(tmp_path, "/", {"/": "300000 100000"})
    assert cgroup_cpu_limit(root, str(tmp_path / "missing")) == 3


def test_default_threads_without_torch_are_capped_by_the_cgroup_quota(monkeypatch):
    from lorafuse import _runtime

    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(_runtime.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(_runtime, "cgroup_cpu_limit", lambda: 3)
    assert _runtime.default_num_threads() == 3
    monkeypatch.setattr(_runtime, "cgroup_cpu_limit", lambda: None)
    assert _runtime.default_num_threads() == 64
    monkeypatch.setattr(_runtime, "cgroup_cpu_limit", lambda: 128)  # a quota above the mask: the mask
    assert _runtime.default_num_threads() == 64
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # the user's setting wins
    assert _runtime.default_num_threads() == 5


def test_numpy_api_works_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np, lorafuse\n"
            "y, u = lorafuse.ops.lora_forward(np.ones((2, 3), np.float32), np.ones((4, 3), np.float32),"
            " np.ones((1, 3), np.float32), np.ones((4, 1), np.float32), 0.5)\n"
            "print(float(y[0, 0]))")
    res = run_py(code)
    assert res.returncode == 0, res.stderr
    assert float(res.stdout) == pytest.approx(3.0 + 0.5 * 3.0)


def test_threading_backend_follows_torch():
    """Without torch the pthread workers run the jobs; once torch (and its libgomp) is loaded,
    the same jobs run on torch's OpenMP threads — one pool in the process, not two."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np, lorafuse\n"
            "from lorafuse import _C, ops\n"
            "lorafuse.set_num_threads(2)\n"
            "print(_C.threading_backend().split()[0])\n"
            "a = np.random.default_rng(0).standard_normal((300, 400), dtype=np.float32)\n"
            "print(float(np.abs(ops.sgemm(a, a.T) - a.astype(np.float64) @ a.T).max()))")
    res = run_py(code)
    assert res.returncode == 0, res.stderr
    backend, err = res.stdout.split()
    assert backend == "pthreads" and float(err) < 1e-3
    pytest.importorskip("torch")  # loads libgomp with global symbols

    assert _C.threading_backend().startswith("openmp")
