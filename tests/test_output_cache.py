"""The kept output blocks (csrc/out_cache.c): large kernel outputs reuse freed memory, never
memory still in use, and the results are the same as with plain allocations."""
from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

import lorafuse
from lorafuse import ops

import reference

BIG = (256, 512)  # 512 KiB of float32: above the 256 KiB threshold
SMALL = (16, 64)  # 4 KiB: below it


@pytest.fixture
def cache_limit():
    """An empty cache (blocks kept by earlier tests dropped) with a 64 MiB limit; the
    process-wide limit is restored after the test."""
    old = lorafuse.set_output_cache_limit(0)
    lorafuse.set_output_cache_limit(64 << 20)
    yield
    lorafuse.set_output_cache_limit(old)


def _product(shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, a @ b in float64) for an output of `shape`."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((shape[0], 32), dtype=np.float32)
    b = rng.standard_normal((32, shape[1]), dtype=np.float32)
    return a, b, a.astype(np.float64) @ b


def test_a_freed_block_is_reused_and_overwritten(cache_limit):
    a, b, want = _product(BIG, 0)
    first = ops.sgemm(a, b)
    ptr = first.ctypes.data
    first.fill(np.nan)  # what the next user of the block must not see
    del first
    before = lorafuse.output_cache_stats()
    second = ops.sgemm(a, b)
    after = lorafuse.output_cache_stats()
    assert second.ctypes.data == ptr
    assert after["hits"] == before["hits"] + 1
    np.testing.assert_allclose(second, want, rtol=1e-5, atol=1e-4)
    assert second.ctypes.data % 64 == 0 and second.flags.c_contiguous and second.flags.writeable


def test_live_outputs_never_share_memory(cache_limit):
    a, b, want = _product(BIG, 1)
    outs = [ops.sgemm(a, b) for _ in range(4)]
    starts = sorted(o.ctypes.data for o in outs)
    assert all(hi - lo >= outs[0].nbytes for lo, hi in zip(starts, starts[1:]))
    for o in outs:
        np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-4)


def test_every_output_of_forward_and_backward_is_correct_after_reuse(cache_limit):
    rng = np.random.default_rng(2)
    n, k, m, r = 300, 256, 384, 8
    x, W, A = reference.rand(rng, n, k), reference.rand(rng, m, k), reference.rand(rng, r, k)
    B, g = reference.rand(rng, m, r), reference.rand(rng, n, m)
    y_want, u_want, _, _ = reference.forward(x, W, A, B, 0.5)
    grads_want, _ = reference.backward(g, x, W, A, B, 0.5)
    for _ in range(3):  # later rounds run on blocks the earlier ones freed (and poisoned)
        y, u = ops.lora_forward(x, W, A, B, 0.5)
        grads = ops.lora_backward(g, x, u, W, A, B, 0.5)
        for got, want in zip((y, u, *grads), (y_want, u_want, *grads_want)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * np.abs(want).max())
        for out in (y, *grads):
            out.fill(np.nan)
        del y, u, grads
    assert lorafuse.output_cache_stats()["hits"] > 0


def _poison_blocks() -> None:
    """Leaves NaN-filled blocks of many sizes in the cache (fresh pages would be zeros)."""
    outs = [ops.sgemm(np.ones((rows, 4), np.float32), np.ones((4, cols), np.float32))
            for rows, cols in [(64, 4096), (128, 4096), (256, 512), (512, 512), (300, 1024), (1024, 1024),
                               (300, 4096)]]
    for o in outs:
        o.fill(np.nan)


def test_empty_sums_are_written_as_zeros_into_reused_blocks(cache_limit):
    rng = np.random.default_rng(9)
    r, k, m = 64, 4096, 2048
    W, A, B = reference.rand(rng, m, k), reference.rand(rng, r, k), reference.rand(rng, m, r)
    _poison_blocks()
    _, dA, dB = ops.lora_backward(np.zeros((0, m), np.float32), np.zeros((0, k), np.float32),
                                  np.zeros((0, r), np.float32), W, A, B, 0.5)  # n = 0: sums over no token
    assert dA.nbytes >= 256 << 10 and not dA.any() and not dB.any()
    _poison_blocks()
    bias = reference.rand(rng, m)
    y, u = ops.lora_forward(np.zeros((300, 0), np.float32), np.zeros((m, 0), np.float32),
                            np.zeros((r, 0), np.float32), B, 0.5, bias)  # k = 0
    np.testing.assert_array_equal(y, np.broadcast_to(bias, y.shape))
    assert not u.any()
    _poison_blocks()
    x = reference.rand(rng, 300, k)
    y2, u2 = ops.lora_forward(x, np.zeros((0, k), np.float32), A, np.zeros((0, r), np.float32), 0.5)  # m = 0
    dx, _, _ = ops.lora_backward(np.zeros((300, 0), np.float32), x, u2, np.zeros((0, k), np.float32), A,
                                 np.zeros((0, r), np.float32), 0.5)
    assert y2.shape == (300, 0) and dx.nbytes >= 256 << 10 and not dx.any()
    assert lorafuse.output_cache_stats()["hits"] >= 3


def test_small_outputs_bypass_the_cache(cache_limit):
    a, b, _ = _product(SMALL, 3)
    before = lorafuse.output_cache_stats()
    out = ops.sgemm(a, b)
    after = lorafuse.output_cache_stats()
    assert (after["hits"], after["misses"], after["lent_blocks"]) == (
        before["hits"], before["misses"], before["lent_blocks"])
    assert out.shape == SMALL


def test_a_block_is_not_taken_by_a_much_smaller_request(cache_limit):
    a, b, _ = _product((1024, 1024), 4)  # 4 MiB block, then kept
    del_ptr = ops.sgemm(a, b).ctypes.data
    a2, b2, want = _product((512, 512), 5)  # 1 MiB: a quarter of it
    before = lorafuse.output_cache_stats()
    small = ops.sgemm(a2, b2)
    assert small.ctypes.data != del_ptr
    assert lorafuse.output_cache_stats()["misses"] == before["misses"] + 1
    np.testing.assert_allclose(small, want, rtol=1e-5, atol=1e-4)


def test_the_limit_bounds_what_is_kept(cache_limit):
    a, b, _ = _product(BIG, 6)
    outs = [ops.sgemm(a, b) for _ in range(6)]
    block = lorafuse.output_cache_stats()["lent_bytes"] // 6
    lorafuse.set_output_cache_limit(2 * block)
    del outs
    stats = lorafuse.output_cache_stats()
    assert stats["held_bytes"] <= 2 * block and stats["held_blocks"] <= 2
    assert lorafuse.set_output_cache_limit(0) == 2 * block
    assert lorafuse.output_cache_stats()["held_bytes"] == 0
    before = lorafuse.output_cache_stats()
    out = ops.sgemm(a, b)  # limit 0: a plain NumPy allocation
    assert lorafuse.output_cache_stats()["lent_blocks"] == before["lent_blocks"]
    assert out.flags.owndata


def test_torch_tensors_keep_their_block_alive(cache_limit):
    torch = pytest.importorskip("torch")
    a, b, want = _product(BIG, 7)
    t = torch.from_numpy(ops.sgemm(a, b))
    lent = lorafuse.output_cache_stats()["lent_blocks"]
    other = ops.sgemm(a, b)  # must not take t's block
    assert other.ctypes.data != t.data_ptr()
    np.testing.assert_allclose(t.numpy(), want, rtol=1e-5, atol=1e-4)
    del t, other
    assert lorafuse.output_cache_stats()["lent_blocks"] == lent - 1


def test_threads_calling_at_once_get_their_own_blocks(cache_limit):
    a, b, want = _product(BIG, 8)
    lent = lorafuse.output_cache_stats()["lent_blocks"]
    errors = []

    def work() -> None:
        for _ in range(30):
            out = ops.sgemm(a, b)  # kernels run with the GIL released, other threads allocate meanwhile
            if not np.allclose(out, want, rtol=1e-5, atol=1e-4):
                errors.append("wrong result")
            out.fill(np.nan)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert lorafuse.output_cache_stats()["lent_blocks"] == lent


@pytest.mark.parametrize("bad, err", [(-1, ValueError), (2**70, ValueError), (1.5, TypeError), (True, TypeError),
                                      ("8", TypeError)])
def test_bad_limits_are_refused(bad, err):
    with pytest.raises(err, match="set_output_cache_limit"):
        lorafuse.set_output_cache_limit(bad)


def test_outputs_may_outlive_the_interpreter_teardown():
    code = ("import numpy as np, lorafuse\nfrom lorafuse import ops\n"
            "keep = [ops.sgemm(np.ones((256, 8), np.float32), np.ones((8, 512), np.float32)) for _ in range(3)]\n"
            "del keep[0]\nprint(lorafuse.output_cache_stats()['held_blocks'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
