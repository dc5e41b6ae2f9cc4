"""atheris harness for the `lorafuse._C` entry points (through `lorafuse.ops`).

Each input picks an entry point (lora_forward, lora_backward, merge/unmerge, sgemm, dropout_mask, the
4-bit W's handle `_C.q4_weight`, an 8-bit one's `_C.q8_weight`, with lora_forward / lora_backward on them,
DoRA's dora_forward / dora_backward on a half base)
and builds its arguments from the fuzz bytes: consistent shapes most of the time (so that calls
succeed and their results are checked against a float64 NumPy reference), perturbed shapes
otherwise; dtypes (float32 mostly, float64, float16, int32, bool, complex64, big-endian >f4,
object); layouts (contiguous, transposed, negative-stride, step-sliced, misaligned by one byte,
read-only, 0-stride broadcast, zero-memory huge ``as_strided`` views, CPU torch tensors through
DLPack when torch is importable); ``out``/``u_out``/``d*_out`` arguments that are fresh, wrong, or
alias / overlap an input; ``packed_w`` that is None, W's own ``pack_weight`` (made from the fuzzed
W), a pack for the other layout or direction, or not a pack. The contract checked:

* a call either succeeds with the reference result, or raises TypeError / ValueError /
  OverflowError / MemoryError (never anything else, never a crash); it succeeds with non-float32
  operands only as a call on a bf16 / fp16 base (`half_call`), checked against the reference with
  one rounding to the output's dtype;
* inputs are never written (snapshots compared after the call); a failed call writes no output.

Run:  python fuzz/fuzz_ops.py [libFuzzer flags, e.g. -max_total_time=60 -print_final_stats=1 corpus_dir]
Under ASan (scripts/sanitize.sh builds the library) set LORAFUSE_FUZZ_NO_LIBFUZZER=1 to import
``atheris_no_libfuzzer``.
"""
from __future__ import annotations

import os
import sys

if os.environ.get("LORAFUSE_FUZZ_NO_LIBFUZZER") == "1":
    import atheris_no_libfuzzer as atheris  # type: ignore
else:
    import atheris

import numpy as np

with atheris.instrument_imports(include=["lorafuse"]):
    import lorafuse
    from lorafuse import ops

try:  # torch tensors reach the binding through DLPack; optional
    if os.environ.get("LORAFUSE_FUZZ_TORCH", "1") == "1":
        import torch
    else:
        torch = None
except ImportError:  # pragma: no cover
    torch = None

ALLOWED = (TypeError, ValueError, OverflowError, MemoryError)
BAD_DTYPES = [np.float64, np.float16, np.int32, np.bool_, np.complex64, np.dtype(">f4"), object]
lorafuse.set_num_threads(int(os.environ.get("LORAFUSE_FUZZ_THREADS", "2")))


class Gen:
    """Argument builder driven by a FuzzedDataProvider."""

    def __init__(self, data: bytes) -> None:
        self.fdp = atheris.FuzzedDataProvider(data)
        self.rng = np.random.default_rng(self.fdp.ConsumeIntInRange(0, 2**16))
        self.huge_used = False  # one huge dim per input: two consistent ones would be a valid 10^12-flop call

    def pick(self, n: int) -> int:
        return self.fdp.ConsumeIntInRange(0, n - 1)

    def chance(self, one_in: int) -> bool:
        return self.fdp.ConsumeIntInRange(0, one_in - 1) == 0

    def size(self) -> int:
        """A matrix size: mostly 0–8, sometimes one that reaches the wide tiles and the in-place
        and few-token paths (more than 16 columns, more than 8 tokens)."""
        return self.pick(9) if self.pick(4) else [17, 24, 33, 40][self.pick(4)]

    def dim(self, value: int) -> int:
        """The intended size, or (rarely) a perturbed one."""
        if self.chance(12):
            choice = [0, 1, value + 1, max(value - 1, 0), 2**40, 2**60][self.pick(6)]
            if choice >= 2**40:
                if self.huge_used:
                    return 0
                self.huge_used = True
            return choice
        return value

    def array(self, shape: tuple, writable_out: bool = False) -> object:
        """A float32 array of `shape` (values from the rng) in some layout, or a bad-dtype one."""
        shape = tuple(int(s) for s in shape)
        if any(s >= 2**40 for s in shape):  # zero memory, astronomically large: must be refused
            first = next(i for i, s in enumerate(shape) if s >= 2**40)  # one huge dim (numpy's limit)
            cap = 16 if shape[first] <= 2**40 else 1
            shape = tuple(s if i == first else min(s, cap) for i, s in enumerate(shape))
            return np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=shape,
                                                   strides=(0,) * len(shape))
        if int(np.prod(shape, dtype=np.int64)) > 4096:
            shape = tuple(min(s, 16) for s in shape)
        base = self.rng.standard_normal(shape).astype(np.float32)
        if not writable_out and self.chance(20):
            dt = BAD_DTYPES[self.pick(len(BAD_DTYPES))]
            return base.astype(dt)
        layout = self.pick(10) if not writable_out else self.pick(3)
        if layout == 1 and base.ndim >= 2:  # transposed view of a contiguous array
            return np.ascontiguousarray(np.swapaxes(base, -1, -2)).swapaxes(-1, -2)
        if layout == 2 and base.ndim >= 1:  # every other element along the last axis
            wide = np.zeros(shape[:-1] + (2 * shape[-1],), np.float32)
            wide[..., ::2] = base
            return wide[..., ::2]
        if layout == 3 and base.ndim >= 1:  # negative stride
            return np.ascontiguousarray(base[..., ::-1])[..., ::-1]
        if layout == 4:  # misaligned by one byte
            buf = bytearray(base.nbytes + 1)
            arr = np.frombuffer(buf, np.float32, count=base.size, offset=1).reshape(shape)
            arr[...] = base
            return arr
        if layout == 5:  # read-only
            base.flags.writeable = False
            return base
        if layout == 6 and base.ndim >= 1 and shape[0] > 0:  # 0-stride broadcast of one row
            return np.broadcast_to(base[:1], shape)
        if layout == 7 and torch is not None:
            t = torch.from_numpy(base)
            if self.chance(3) and base.ndim >= 2:
                t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
            if self.chance(4):
                t = t.to([torch.float16, torch.bfloat16, torch.float64][self.pick(3)])
            return t
        if layout == 8 and base.ndim >= 1:  # Fortran order
            return np.asfortranarray(base)
        return base

    def scalar(self) -> object:
        k = self.pick(8)
        return [1.0, 0.5, -2.0, 0.0, float("nan"), float("inf"), 3, "s"][k]


def small(*arrs: object) -> bool:
    """All arrays small enough for a float64 reference (huge 0-stride views are not)."""
    return all(a is None or max(a.shape, default=0) <= 10**6 for a in arrs)


def as_ref(a: object) -> np.ndarray:
    if torch is not None and isinstance(a, torch.Tensor):
        return a.detach().double().numpy()
    return np.asarray(a, dtype=np.float64)


def snapshot(args: dict) -> dict:
    snaps = {}
    for key, a in args.items():
        if isinstance(a, np.ndarray) and a.dtype != object and a.size < 10**6:
            snaps[key] = a.copy()
        elif torch is not None and isinstance(a, torch.Tensor):
            snaps[key] = a.clone()
    return snaps


def unchanged(before: dict, args: dict, skip: set) -> None:
    for key, snap in before.items():
        if key in skip:
            continue
        now = args[key]
        same = torch.equal(now, snap) if torch is not None and isinstance(now, torch.Tensor) else \
            np.array_equal(now, snap, equal_nan=True)
        if not same:
            raise AssertionError(f"input {key} was modified by the call")


def all_f32(*arrs: object) -> bool:
    for a in arrs:
        if a is None:
            continue
        if isinstance(a, np.ndarray):
            if a.dtype != np.float32 or a.dtype.byteorder == ">":
                return False
        elif torch is not None and isinstance(a, torch.Tensor):
            if a.dtype != torch.float32:
                return False
        else:
            return False
    return True


def dtype_name(a: object) -> object:
    """'float32', 'float16' or 'bfloat16' for an operand the kernels may take, else None."""
    if isinstance(a, np.ndarray):
        if a.dtype.byteorder == ">":
            return None
        return {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(a.dtype)
    if torch is not None and isinstance(a, torch.Tensor):
        return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(a.dtype)
    return None


def half_call(base: list, adapters: list, f32_or_base: list, f32: list) -> object:
    """The half dtype of a call the bf16 / fp16 kernels take — the base operands (x, W, g) of one half
    dtype, the adapters (A, B) of one dtype, float32 or the base's, bias (None allowed) float32 or the
    base's, u float32 — else None."""
    dt = {dtype_name(a) for a in base}
    if len(dt) != 1 or not dt <= {"float16", "bfloat16"}:
        return None
    half = dt.pop()
    ad = {dtype_name(a) for a in adapters}
    ok = len(ad) == 1 and ad <= {"float32", half} and all(a is None or dtype_name(a) in ("float32", half)
                                                          for a in f32_or_base)
    return half if ok and all(dtype_name(a) == "float32" for a in f32) else None


def mixed_call(f32_base: list, W: object, adapters: list, f32_or_base: list) -> bool:
    """Whether the half kernels take a call as 'mixed': x (and g, u) float32 on a bf16 / fp16 W, A and B float32,
    bias float32 or W's dtype (None allowed). Its arithmetic is tested in tests/test_ops_lora_half.py."""
    half = dtype_name(W)
    return (half in ("float16", "bfloat16") and all(dtype_name(a) == "float32" for a in f32_base + adapters)
            and all(a is None or dtype_name(a) in ("float32", half) for a in f32_or_base))


U_HALF = {"float32": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-11}  # a rounding to the output dtype


def as_result(a: object, dtype: str) -> np.ndarray:
    """A kernel result as float64: bfloat16 results come as uint16 arrays of their bits."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a)).view(torch.bfloat16).double().numpy()
    return np.asarray(a, dtype=np.float64)


def check_close(got: np.ndarray, ref: np.ndarray, mag: np.ndarray, k_eff: int, what: str,
                dtype: str = "float32") -> None:
    """got within the fp32 accumulation bound of ref (×4 slack), plus one rounding to `dtype`."""
    if not np.all(np.isfinite(ref)):
        return
    tol = (k_eff + 2) * 2.0**-24 * 4 * mag + 1e-30
    tol = tol + U_HALF[dtype] * (np.abs(ref) + tol) + (2.0**-24 if dtype == "float16" else 0.0)
    got = as_result(got, dtype)
    if got.shape != ref.shape or not np.all(np.abs(got - ref) <= tol):
        raise AssertionError(f"{what}: result differs from the float64 reference")


def packed_arg(G: Gen, W: object, fifo: bool, for_backward: bool) -> object:
    """packed_w for a call: None, W's own pack, a pack of W for the other layout/direction (must
    be refused), or not a pack at all; pack_weight itself sees the fuzzed W."""
    kind = G.pick(6)
    try:
        if kind == 1:
            return ops.pack_weight(W, fan_in_fan_out=fifo, for_backward=for_backward)
        if kind == 2:
            return ops.pack_weight(W, fan_in_fan_out=not fifo, for_backward=for_backward)
        if kind == 3:
            return ops.pack_weight(W, fan_in_fan_out=fifo, for_backward=not for_backward)
    except ALLOWED:
        return None
    return "not a pack" if kind == 4 else None


def fuzz_forward(G: Gen) -> None:
    n, k, m, r = G.size(), 1 + G.size(), 1 + G.size(), 1 + G.pick(4)
    lead = (n,) if G.pick(3) else (max(n // 2, 1), 2)
    fifo = G.chance(4)
    args = {"x": G.array(lead[:-1] + (lead[-1], G.dim(k)) if len(lead) == 2 else (lead[0], G.dim(k))),
            "W": G.array((G.dim(k), G.dim(m)) if fifo else (G.dim(m), G.dim(k))),
            "A": G.array((G.dim(r), G.dim(k))), "B": G.array((G.dim(m), G.dim(r))),
            "bias": G.array((G.dim(m),)) if G.chance(2) else None}
    p = [0.0, 0.0, 0.3, 0.9, 1.0, -0.1][G.pick(6)]
    seed = [0, 1, 2**63, -1, 2**64][G.pick(5)]
    scale = G.scalar()
    nrows = int(np.prod(lead))
    out_kind, u_kind = G.pick(6), G.pick(4)
    out = u_out = None
    if out_kind == 1:
        out = np.empty(lead + (m,), np.float32)
    elif out_kind == 2:  # wrong shape / dtype / read-only
        out = [np.empty(lead + (m + 1,), np.float32), np.empty(lead + (m,), np.float64),
               np.broadcast_to(np.zeros(m, np.float32), lead + (m,))][G.pick(3)]
    elif out_kind == 3 and isinstance(args["x"], np.ndarray) and args["x"].dtype == np.float32 and k == m:
        out = args["x"]  # out aliases x
    elif out_kind == 4:  # out overlaps u_out
        flat = np.zeros(nrows * m + nrows * r + 8, np.float32)
        out = flat[:nrows * m].reshape(lead + (m,))
        u_out = flat[3:3 + nrows * r].reshape(lead + (r,))
    if u_kind == 1 and u_out is None:
        u_out = np.empty(lead + (r,), np.float32)
    elif u_kind == 2 and u_out is None and isinstance(args["A"], np.ndarray) and args["A"].flags.writeable:
        u_out = args["A"]  # aliases an input (shape rarely fits; either way it must not corrupt A)
    packed = packed_arg(G, args["W"], fifo, False)
    before = snapshot(args)
    out_before = out.copy() if isinstance(out, np.ndarray) and out.size < 10**6 else None
    try:
        y, u = ops.lora_forward(args["x"], args["W"], args["A"], args["B"], scale, args["bias"], out=out,
                                u_out=u_out, dropout_p=p, seed=seed, fan_in_fan_out=fifo, packed_w=packed)
    except ALLOWED:
        unchanged(before, args, set())
        if out_before is not None and out is not args["x"] and out.flags.writeable and u_kind != 2:
            if not np.array_equal(out, out_before, equal_nan=True):
                raise AssertionError("a failed call wrote its output")
        return
    unchanged(before, args, set())
    half = half_call([args["x"], args["W"]], [args["A"], args["B"]], [args["bias"]], [])
    mixed = mixed_call([args["x"]], args["W"], [args["A"], args["B"]], [args["bias"]])
    if not (all_f32(*args.values()) or half or mixed) or not isinstance(scale, (int, float)):
        raise AssertionError("a call with non-float32 input succeeded")
    if mixed or not small(*args.values()):
        return
    x, W, A, B = (as_ref(args[k_]) for k_ in "xWAB")
    x2 = x.reshape(int(np.prod(x.shape[:-1])), x.shape[-1])
    mask = ops.dropout_mask(x2.shape[0], x2.shape[1], p, seed).astype(np.float64) if p else 1.0
    Wm = W.T if fifo else W
    u_ref = (x2 * mask) @ A.T
    y_ref = x2 @ Wm.T + scale * u_ref @ B.T
    mag = np.abs(x2) @ np.abs(Wm).T + abs(scale) * (np.abs(x2 * mask) @ np.abs(A).T) @ np.abs(B).T
    if args["bias"] is not None:
        b = as_ref(args["bias"])
        y_ref = y_ref + b
        mag = mag + np.abs(b)
    kk = x2.shape[1]
    check_close(np.asarray(u).reshape(u_ref.shape), u_ref, (np.abs(x2 * mask) @ np.abs(A).T), kk, "u")
    check_close(np.asarray(y).reshape(y_ref.shape), y_ref, mag, kk + A.shape[0], "y", half or "float32")


def fuzz_backward(G: Gen) -> None:
    n, k, m, r = G.size(), 1 + G.size(), 1 + G.size(), 1 + G.pick(4)
    fifo = G.chance(4)
    args = {"g": G.array((n, G.dim(m))), "x": G.array((n, G.dim(k))), "u": G.array((n, G.dim(r))),
            "W": G.array((G.dim(k), G.dim(m)) if fifo else (G.dim(m), G.dim(k))),
            "A": G.array((G.dim(r), G.dim(k))), "B": G.array((G.dim(m), G.dim(r)))}
    need_dx = not G.chance(3)
    p = [0.0, 0.0, 0.5, 1.0][G.pick(4)]
    outs = {}
    kind = G.pick(5)
    if kind == 1:
        outs = {"dx_out": np.empty((n, k), np.float32), "dA_out": np.empty((r, k), np.float32),
                "dB_out": np.empty((m, r), np.float32)}
    elif kind == 2 and isinstance(args["A"], np.ndarray) and args["A"].dtype == np.float32:
        outs = {"dA_out": args["A"]}  # aliases A
    elif kind == 3:
        outs = {"dB_out": np.empty((m, r + 1), np.float32)}
    packed = packed_arg(G, args["W"], fifo, True)
    before = snapshot(args)
    try:
        dx, dA, dB = ops.lora_backward(args["g"], args["x"], args["u"], args["W"], args["A"], args["B"], 0.7,
                                       need_dx=need_dx, dropout_p=p, seed=5, fan_in_fan_out=fifo, packed_w=packed,
                                       **outs)
    except ALLOWED:
        unchanged(before, args, set())
        return
    unchanged(before, args, set())
    half = half_call([args["g"], args["x"], args["W"]], [args["A"], args["B"]], [], [args["u"]])
    mixed = mixed_call([args["g"], args["x"], args["u"]], args["W"], [args["A"], args["B"]], [])
    if not (all_f32(*args.values()) or half or mixed):
        raise AssertionError("a call with non-float32 input succeeded")
    if mixed or not small(*args.values()):
        return
    ad = dtype_name(args["A"]) if half else "float32"  # dA, dB in the adapters' dtype, dx in the base's
    g, x, u, W, A, B = (as_ref(args[k_]) for k_ in ("g", "x", "u", "W", "A", "B"))
    mask = ops.dropout_mask(x.shape[0], x.shape[1], p, 5).astype(np.float64) if p else 1.0
    Wm = W.T if fifo else W
    v = g @ B
    check_close(np.asarray(dB), 0.7 * g.T @ u, 0.7 * np.abs(g).T @ np.abs(u), x.shape[0], "dB", ad)
    check_close(np.asarray(dA), 0.7 * v.T @ (x * mask), 0.7 * (np.abs(g) @ np.abs(B)).T @ np.abs(x * mask),
                x.shape[0] + B.shape[0], "dA", ad)
    if need_dx:
        check_close(np.asarray(dx), g @ Wm + 0.7 * (v @ A) * mask,
                    np.abs(g) @ np.abs(Wm) + 0.7 * (np.abs(g) @ np.abs(B) @ np.abs(A)) * np.abs(mask),
                    Wm.shape[0] + 2 * A.shape[0], "dx", half or "float32")
    elif dx is not None:
        raise AssertionError("need_dx=False returned dx")


def fuzz_merge(G: Gen) -> None:
    k, m, r = G.pick(9), G.pick(9), 1 + G.pick(4)
    fifo = G.chance(3)
    W = G.array((G.dim(k), G.dim(m)) if fifo else (G.dim(m), G.dim(k)), writable_out=not G.chance(4))
    args = {"A": G.array((G.dim(r), G.dim(k))), "B": G.array((G.dim(m), G.dim(r)))}
    if G.chance(6) and isinstance(W, np.ndarray) and W.dtype == np.float32 and W.shape == (m, r):
        args["B"] = W  # W aliases B
    before = snapshot(args)
    W0 = W.copy() if isinstance(W, np.ndarray) and W.dtype != object and W.size < 10**6 else None
    try:
        (ops.unmerge if G.chance(2) else ops.merge)(W, args["A"], args["B"], 0.5, fan_in_fan_out=fifo)
    except ALLOWED:
        unchanged(before, args, set())
        if W0 is not None and not np.array_equal(W, W0, equal_nan=W0.dtype.kind in "fc"):
            raise AssertionError("a failed merge modified W")
        return
    unchanged(before, args, set())


def fuzz_sgemm(G: Gen) -> None:
    M, K, N = G.size(), G.size(), G.size()
    args = {"a": G.array((G.dim(M), G.dim(K))), "b": G.array((G.dim(K), G.dim(N))),
            "bias": G.array((G.dim(N),)) if G.chance(2) else None}
    out = np.empty((M, N), np.float32) if G.chance(2) else None
    before = snapshot(args)
    try:
        c = ops.sgemm(args["a"], args["b"], 1.5, args["bias"], out)
    except ALLOWED:
        unchanged(before, args, set())
        return
    unchanged(before, args, set())
    if not small(*args.values()):
        return
    a, b = as_ref(args["a"]), as_ref(args["b"])
    ref = 1.5 * a @ b
    mag = 1.5 * np.abs(a) @ np.abs(b)
    if args["bias"] is not None:
        ref, mag = ref + as_ref(args["bias"]), mag + np.abs(as_ref(args["bias"]))
    check_close(np.asarray(c), ref, mag, a.shape[1], "sgemm")


def fuzz_dropout(G: Gen) -> None:
    n, k = [G.pick(9), -1, 2**40][G.pick(3) if G.chance(8) else 0], G.pick(9)
    p = [0.0, 0.5, 0.999, 1.0, -0.5, float("nan")][G.pick(6)]
    try:
        mask = ops.dropout_mask(n, k, p, G.pick(1000))
    except ALLOWED:
        return
    keep = np.unique(mask[mask != 0])
    if mask.shape != (n, k) or len(keep) > 1 or (len(keep) and abs(keep[0] * (1 - p) - 1) > 1e-4):
        raise AssertionError("dropout mask has values other than 0 and 1/(1-p)")


def fuzz_q4(G: Gen) -> None:
    """A 4-bit weight (`_C.q4_weight`) whose stored arrays are consistent or not (data bytes, scales per
    block, nested scales, block size, shape), then `lora_forward` / `lora_backward` on its handle with x of a
    half dtype or float32 and fuzzed adapters: an error from the allowed set, or — every operand consistent —
    y within one rounding of the same call on W dequantized (`quant.dequantize`: the same values) and dx of
    the right shape. Nothing the arrays claim makes C read outside them."""
    if torch is None:
        return
    from lorafuse import _C, quant

    m, k, r = 1 + G.pick(9), [32, 64, 96, 7][G.pick(4)], 1 + G.pick(4)
    block = [32, 64, 128, 48][G.pick(4) if G.chance(6) else G.pick(3)]
    W = torch.from_numpy(G.rng.standard_normal((m, k)).astype(np.float32))
    data, state = quant.quantize_weight(W, ["nf4", "fp4"][G.pick(2)], block_size=min(block, 128) if block != 48
                                        else 64, double_quant=G.chance(2))
    d, absmax, rows2d, kw, _ = quant._stored(data, state, "fuzz")
    if G.chance(5):  # a stored array shorter or longer than its shape needs
        which = G.pick(3)
        if which == 0:
            d = d[: G.dim(d.shape[0])]
        elif which == 1:
            absmax = absmax[: G.dim(absmax.shape[0])]
        elif kw:
            kw["nested_absmax"] = kw["nested_absmax"][: G.dim(kw["nested_absmax"].shape[0])]
    rows2d = (G.dim(rows2d[0]), G.dim(rows2d[1]))
    dt = [torch.bfloat16, torch.float16][G.pick(2)]
    name = str(dt).replace("torch.", "")
    try:
        handle = _C.q4_weight(d, absmax, rows2d, block, str(state.quant_type), dtype=name, **kw)
    except ALLOWED:
        return
    if max(rows2d) > 4096:  # accepted with no rows: x (…, k) could not be materialised
        return
    # the values the handle stands for: its own arrays, shape and block size (a perturbed shape the arrays still
    # cover, e.g. fewer rows or no columns, is a valid handle of another W than `W`)
    Wd = torch.empty(rows2d, dtype=dt)
    _C.dequant_4bit(d, absmax, rows2d, block, str(state.quant_type), name, out=Wd, **kw)
    _lora_on_handle(G, handle, Wd, dt, r, "4-bit")


def _lora_on_handle(G: Gen, handle: object, Wd: "torch.Tensor", dt: "torch.dtype", r: int, what: str) -> None:
    """`lora_forward` / `lora_backward` on a quantized weight's handle with x of a half dtype or float32 and fuzzed
    adapters: an error from the allowed set, or results of the right shapes and — x in the handle's dtype — y
    within one rounding of the same call on Wd (m, k), the values the handle stands for, in dt."""
    m, k = Wd.shape
    n = G.size()
    xdt = [dt, dt, torch.float32, torch.bfloat16 if dt == torch.float16 else torch.float16][G.pick(4)]
    shape = tuple(min(G.dim(v), v + 1) for v in (n, k))  # perturbed, never huge (x is materialised)
    x = torch.from_numpy(G.rng.standard_normal(shape).astype(np.float32)).to(xdt)
    A, B = G.array((G.dim(r), G.dim(k))), G.array((G.dim(m), G.dim(r)))
    try:
        drop = dict(dropout_p=[0.0, 0.3][G.pick(2)], seed=G.pick(100))
        y, u = ops.lora_forward(x, handle, A, B, 0.5, **drop)
        g = torch.from_numpy(G.rng.standard_normal((x.shape[0], m)).astype(np.float32)).to(xdt)
        dx, dA, dB = ops.lora_backward(g, x, u, handle, A, B, 0.5)
    except ALLOWED:
        return
    if tuple(np.shape(dx)) != tuple(x.shape) or np.shape(y) != (x.shape[0], m):
        raise AssertionError(f"{what} LoRA: results of the wrong shape")
    y_dense, _ = ops.lora_forward(x.to(dt), Wd, A, B, 0.5, **drop)  # the same values through the dense path
    if xdt == dt:  # both rounded once to dt from fp32 sums of the same products in other orders
        name = str(dt).replace("torch.", "")
        ref, got = as_result(y_dense, name), as_result(y, name)
        mag = np.abs(as_ref(x.float())) @ np.abs(Wd.double().numpy()).T + np.abs(ref)
        tol = (k + r + 2) * 2.0**-24 * 4 * mag + 2 * U_HALF[name] * (np.abs(ref) + 1e-30) + 2.0**-23
        if np.all(np.isfinite(ref)) and not np.all(np.abs(got - ref) <= tol):
            raise AssertionError(f"{what} y differs from the same call on W dequantized")


def _half_or_fuzzed(G: Gen, shape: tuple, dt: "torch.dtype") -> object:
    """A torch tensor of `shape` in dt (mostly), or `G.array`'s fuzzed operand of that shape."""
    if G.chance(4):
        return G.array(shape)
    shape = tuple(min(int(v), 40) for v in shape)  # materialised: never huge
    return torch.from_numpy(G.rng.standard_normal(shape).astype(np.float32)).to(dt)


def fuzz_dora(G: Gen) -> None:
    """dora_forward / dora_backward (DoRA on a bf16 / fp16 base): x, W, g of a half dtype mostly, A, B, col_scale
    and bias fuzzed; an allowed error, or a success only for the dtypes the entry points take (x, W, g one half
    dtype, A, B, col_scale float32, bias float32 or the base's) with z within the base product's rounding and the
    fp32 sums of the float64 reference, and dc = Σ g ⊙ z."""
    if torch is None:
        return
    dt = [torch.bfloat16, torch.float16][G.pick(2)]
    n, k, m, r = G.size(), 1 + G.size(), 1 + G.size(), 1 + G.pick(4)
    fifo = G.chance(4)
    args = {"x": _half_or_fuzzed(G, (n, G.dim(k)), dt),
            "W": _half_or_fuzzed(G, (G.dim(k), G.dim(m)) if fifo else (G.dim(m), G.dim(k)), dt),
            "A": G.array((G.dim(r), G.dim(k))), "B": G.array((G.dim(m), G.dim(r))), "c": G.array((G.dim(m),)),
            "bias": [None, G.array((G.dim(m),)), _half_or_fuzzed(G, (m,), dt)][G.pick(3)]}
    before = snapshot(args)
    try:
        y, u, z = ops.dora_forward(args["x"], args["W"], args["A"], args["B"], 0.75, args["c"], args["bias"],
                                   fan_in_fan_out=fifo)
    except ALLOWED:
        unchanged(before, args, set())
        return
    unchanged(before, args, set())
    half = half_call([args["x"], args["W"]], [args["A"], args["B"]], [args["bias"]], [args["c"]])
    if half is None or dtype_name(args["A"]) != "float32":
        raise AssertionError("dora_forward succeeded on dtypes it does not take")
    x, W, A, B, c = (as_ref(args[k_]) for k_ in ("x", "W", "A", "B", "c"))
    Wm = W.T if fifo else W
    P, U = x @ Wm.T, x @ A.T
    tol = (x.shape[1] + r + 2) * 2.0**-24 * 4 * (np.abs(x) @ np.abs(Wm).T + 0.75 * np.abs(U) @ np.abs(B).T) + 1e-30
    tol = tol + U_HALF[half] * (np.abs(P) + tol) + 2.0**-24
    ref = P + 0.75 * U @ B.T
    zz = np.asarray(z, np.float64)
    if np.all(np.isfinite(ref)) and (zz.shape != ref.shape or not np.all(np.abs(zz - ref) <= tol)):
        raise AssertionError("dora_forward: z differs from the float64 reference")
    if as_result(y, half).shape != ref.shape:
        raise AssertionError("dora_forward: y of the wrong shape")
    g = _half_or_fuzzed(G, (x.shape[0], G.dim(Wm.shape[0])), dt)
    zarg = [z, z, G.array(np.shape(z)), None][G.pick(4)]
    need_dx, need_dc = not G.chance(3), not G.chance(3)
    bargs = {"g": g, "x": args["x"], "u": u, "z": zarg}
    before = snapshot(bargs)
    try:
        dx, dA, dB, dc = ops.dora_backward(g, args["x"], u, zarg, args["W"], args["A"], args["B"], 0.75, args["c"],
                                           need_dx=need_dx, need_dc=need_dc, fan_in_fan_out=fifo)
    except ALLOWED:
        unchanged(before, bargs, set())
        return
    unchanged(before, bargs, set())
    if dtype_name(g) != half or (need_dc and dtype_name(zarg) != "float32"):
        raise AssertionError("dora_backward succeeded on dtypes it does not take")
    if (dx is None) == need_dx or (dc is None) == need_dc or np.shape(dA) != A.shape or np.shape(dB) != B.shape:
        raise AssertionError("dora_backward: results missing, unasked for, or of the wrong shape")
    if need_dc:
        gg, zr = as_ref(g), as_ref(zarg)
        check_close(np.asarray(dc), (gg * zr).sum(0), (np.abs(gg) * np.abs(zr)).sum(0), gg.shape[0], "dc")


def fuzz_q8(G: Gen) -> None:
    """An 8-bit weight (`_C.q8_weight`: int8 codes CB (m, k), float32 row scales SCB) whose arrays are consistent
    or not (dtypes, SCB's length, CB's rank), then the LoRA kernels on its handle (`_lora_on_handle`)."""
    if torch is None:
        return
    from lorafuse import _C
    from lorafuse.quant8 import dequantize_int8

    m, k, r = 1 + G.pick(9), 1 + G.pick(70), 1 + G.pick(4)
    CB = torch.from_numpy(G.rng.integers(-127, 128, (m, k)).astype(np.int8))
    SCB = torch.from_numpy(np.abs(G.rng.standard_normal(m)).astype(np.float32))
    dt = [torch.bfloat16, torch.float16][G.pick(2)]
    cb, scb = CB, SCB
    if G.chance(5):  # the wrong dtype, too few scales, a flat CB
        cb, scb = [(CB.to(torch.uint8), SCB), (CB, SCB[: G.dim(m)]), (CB, SCB.double()), (CB.reshape(-1), SCB)][
            G.pick(4)]
    try:
        handle = _C.q8_weight(cb, scb, dtype=str(dt).replace("torch.", ""))
    except ALLOWED:
        return
    _lora_on_handle(G, handle, dequantize_int8(CB, SCB, dt), dt, r, "8-bit")


# The C extension is not compiled with coverage instrumentation (that needs clang's
# -fsanitize=fuzzer-no-link); instrumenting the harness gives libFuzzer feedback on which
# argument shapes and which accept/reject branches were reached.
(fuzz_forward, fuzz_backward, fuzz_merge, fuzz_sgemm, fuzz_dropout, fuzz_q4, fuzz_q8, fuzz_dora, _lora_on_handle,
 packed_arg) = (atheris.instrument_func(f)
                for f in (fuzz_forward, fuzz_backward, fuzz_merge, fuzz_sgemm, fuzz_dropout, fuzz_q4, fuzz_q8,
                          fuzz_dora, _lora_on_handle, packed_arg))
Gen.array = atheris.instrument_func(Gen.array)
ENTRY = [fuzz_forward, fuzz_forward, fuzz_backward, fuzz_merge, fuzz_sgemm, fuzz_dropout, fuzz_q4, fuzz_q8, fuzz_dora]


def TestOneInput(data: bytes) -> None:
    G = Gen(data)
    ENTRY[G.pick(len(ENTRY))](G)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
