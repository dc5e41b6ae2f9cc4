"""lorafuse in a fork()'s child (multiprocessing's default start method on Linux before Python 3.14, os.fork, the
servers and notebooks that fork workers): the child has one thread, so the parent's pool workers — lorafuse's own
pthreads, or torch's libgomp team — are not there, nor is any thread that held a pool lock at the fork. Before
lf_pool_after_fork a child's first kernel call waited for them forever, and so did a child's normal exit (the
module's teardown joined them). Each case runs in a subprocess with a timeout: a hang fails the test.

The script forks while a second thread of the parent is running kernels (so a pool lock is likely held at that
moment); the child computes the same fused forward as the parent did before the fork, reports its threads and
threading backend, changes its thread count, forks a grandchild that computes it again, and exits normally."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, sys, threading
import numpy as np
if sys.argv[1] == "torch":
    import torch
import lorafuse
from lorafuse import _C, ops

lorafuse.set_num_threads(2)
rng = np.random.default_rng(0)
x, W = rng.standard_normal((300, 200), dtype=np.float32), rng.standard_normal((260, 200), dtype=np.float32)
A, B = rng.standard_normal((8, 200), dtype=np.float32), rng.standard_normal((260, 8), dtype=np.float32)
want, _ = ops.lora_forward(x, W, A, B, 0.5)
parent_backend = _C.threading_backend()

def close(y):
    return bool(np.allclose(y, want, rtol=1e-5, atol=1e-4))

stop = threading.Event()
big = rng.standard_normal((256, 256), dtype=np.float32)
def busy():  # kernels on another thread across the fork
    while not stop.is_set():
        ops.sgemm(big, big)
worker = threading.Thread(target=busy)
worker.start()
for _ in range(20):  # let it run a while first
    ops.sgemm(big, big)

pid = os.fork()
if pid == 0:
    report = {"parent_backend": parent_backend}
    y, _ = ops.lora_forward(x, W, A, B, 0.5)
    report["child_close"] = close(y)
    report["child_threads"] = lorafuse.get_num_threads()
    report["child_backend"] = _C.threading_backend()
    lorafuse.set_num_threads(1)
    report["one_thread_close"] = close(ops.lora_forward(x, W, A, B, 0.5)[0])
    lorafuse.set_num_threads(2)
    grandchild = os.fork()
    if grandchild == 0:
        os._exit(0 if close(ops.lora_forward(x, W, A, B, 0.5)[0]) else 3)
    report["grandchild_status"] = os.waitstatus_to_exitcode(os.waitpid(grandchild, 0)[1])
    print(json.dumps(report), flush=True)
    sys.exit(0)  # a normal exit: the module's teardown runs in the child
stop.set()
worker.join()
status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps({"child_status": status, "parent_close_after": close(ops.lora_forward(x, W, A, B, 0.5)[0])}))
"""


@pytest.mark.parametrize("with_torch", [False, True], ids=["numpy-only", "torch"])
def test_kernels_work_in_a_forked_child_and_it_exits(with_torch: bool) -> None:
    if with_torch and importlib.util.find_spec("torch") is None:
        pytest.skip("torch not installed: its libgomp path is not there to test")
    env = dict(os.environ, PYTHONWARNINGS="ignore::DeprecationWarning")  # 3.12+: fork() of a threaded process
    try:
        res = subprocess.run([sys.executable, "-c", SCRIPT, "torch" if with_torch else "numpy"], capture_output=True,
                             text=True, env=env, timeout=120)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"a forked child hung (kernel call, thread change, grandchild or exit): {e.stdout!r} {e.stderr!r}")
    assert res.returncode == 0, res.stderr
    child, parent = (json.loads(line) for line in res.stdout.strip().splitlines())
    assert parent == {"child_status": 0, "parent_close_after": True}
    assert child["child_close"] and child["one_thread_close"] and child["grandchild_status"] == 0, child
    assert child["child_threads"] == 2
    # the parent's jobs ran on torch's libgomp (when torch is loaded); the child's never do: that team is the parent's
    assert child["parent_backend"].startswith("openmp" if with_torch else "pthreads"), child
    assert child["child_backend"].startswith("pthreads"), child
