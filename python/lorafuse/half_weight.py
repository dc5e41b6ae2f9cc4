"""The frozen bf16 / fp16 base weight W (m, k) of a DoRA layer as the half-precision DoRA path reads it
(`lorafuse.dora.DoraHalfFunction`): a dense half tensor (`DenseHalfW`) or a 4-bit weight in bitsandbytes'
storage (`Quant4HalfW`, QLoRA), behind one interface —

    kern          what the kernels take as W (`ops.dora_forward`, `ops.lora_forward` …): the tensor or the 4-bit
                  weight's handle, with ``fifo`` (fan_in_fan_out: the tensor stored (k, m))
    t_product(a)  a·Wᵀ (n, m) float32 for a (n, k);   product(a): a·W (n, k) float32 for a (n, m)
    squares()     ‖W_j‖² (m,) float64 of the values the norms read
    norm_product(A)  W·Aᵀ (m, r) float32 of those values
    dense()       W (m, k) itself (double backward only)
    key()         what identifies W's values while they stay unchanged, or None (not to be kept)

The norms read W as PEFT's DoRA does: the dense tensor itself; a 4-bit W dequantized to its quant state's dtype
(``dequantize_module_weight``), while the kernels read its elements rounded to the compute dtype (as bnb's
matmul does) — the same values unless the quant state is float32.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .backend import _tensor, cpu_kernels
from .quant import dequantize, matmul_4bit, q4_handle

__all__ = ["HalfW", "DenseHalfW", "Quant4HalfW", "squared_row_norms", "tensor_key"]

_NORM_ROWS = 256  # rows of W widened (or dequantized) at a time for its squares (a 256×k float32 temporary)


def _row_slices(m: int) -> range:
    return range(0, m, _NORM_ROWS)


def squared_row_norms(w_mk: torch.Tensor) -> torch.Tensor:
    """‖W_j‖² (m,) of W viewed (m, k), summed in float64 (no float64 copy of W): squares in W's dtype, or — a
    bf16 / fp16 W — in float32, where they are exact, _NORM_ROWS rows widened at a time."""
    w = w_mk.detach()
    if w.dtype not in (torch.bfloat16, torch.float16):
        return w.square().sum(1, dtype=torch.float64)
    return torch.cat([w[i:i + _NORM_ROWS].float().square().sum(1, dtype=torch.float64)
                      for i in _row_slices(w.shape[0])]) if w.shape[0] else w.new_zeros(0, dtype=torch.float64)


def tensor_key(t: torch.Tensor) -> tuple:
    """What identifies an unchanged tensor: data pointer, shape, strides, autograd version counter."""
    return (t.data_ptr(), t._version, t.shape, t.stride())


class HalfW:
    """The interface (module docstring); ``dtype`` the kernels' element dtype (bf16 or fp16)."""

    kern: Any
    fifo: bool
    dtype: torch.dtype

    def t_product(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def product(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def squares(self) -> torch.Tensor:
        raise NotImplementedError

    def norm_product(self, lora_a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        raise NotImplementedError

    def key(self) -> Optional[tuple]:
        raise NotImplementedError


class DenseHalfW(HalfW):
    """A bf16 / fp16 weight tensor, (m, k) or — ``fifo`` — (k, m) (GPT-2's Conv1D); the products by `_C.hgemm`,
    which widens W only inside its packing."""

    __slots__ = ("_w", "kern", "fifo", "dtype")

    def __init__(self, weight: torch.Tensor, fifo: bool) -> None:
        self._w, self.fifo, self.dtype = weight, bool(fifo), weight.dtype
        self.kern = weight.detach()

    def _mk(self) -> torch.Tensor:
        return self.kern.t() if self.fifo else self.kern

    def t_product(self, a: torch.Tensor) -> torch.Tensor:
        return _tensor(cpu_kernels().hgemm(a, self._mk().t()))

    def product(self, a: torch.Tensor) -> torch.Tensor:
        return _tensor(cpu_kernels().hgemm(a, self._mk()))

    def squares(self) -> torch.Tensor:
        return squared_row_norms(self._mk())

    def norm_product(self, lora_a: torch.Tensor) -> torch.Tensor:
        return _tensor(cpu_kernels().hgemm(self._mk(), lora_a.detach().t()))  # W streamed once by rows

    def dense(self) -> torch.Tensor:
        return self._mk()

    def key(self) -> Optional[tuple]:
        w = self._w
        return None if w.requires_grad or w.is_inference() else tensor_key(w)


class Quant4HalfW(HalfW):
    """A 4-bit weight (bnb's ``Params4bit`` or lorafuse's ``Weight4bit``, with its ``quant_state``), (out, in) as
    stored, its elements rounded to the compute dtype ``cd`` for the kernels (`quant.q4_handle`); the products
    dequantize it inside the GEMM's packing (`quant.matmul_4bit`), the squares 256 rows at a time: W in full
    precision never exists."""

    __slots__ = ("_w", "kern", "fifo", "dtype", "_norm_dtype")

    def __init__(self, weight: Any, cd: torch.dtype) -> None:
        self._w, self.fifo, self.dtype = weight, False, cd
        self.kern = q4_handle(weight, cd)
        self._norm_dtype = weight.quant_state.dtype

    def t_product(self, a: torch.Tensor) -> torch.Tensor:
        return matmul_4bit(a, self._w, dtype=self.dtype)

    def product(self, a: torch.Tensor) -> torch.Tensor:
        return matmul_4bit(a, self._w, transpose=False, dtype=self.dtype)

    def squares(self) -> torch.Tensor:
        m = int(self._w.quant_state.shape[0])
        if m == 0:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([dequantize(self._w, dtype=self._norm_dtype, rows=(i, min(i + _NORM_ROWS, m)))
                          .float().square().sum(1, dtype=torch.float64) for i in _row_slices(m)])

    def norm_product(self, lora_a: torch.Tensor) -> torch.Tensor:
        return matmul_4bit(lora_a.detach(), self._w, dtype=self._norm_dtype).t()  # (A·Wᵀ)ᵀ

    def dense(self) -> torch.Tensor:
        return dequantize(self._w, dtype=self.dtype)

    def key(self) -> Optional[tuple]:
        qs = self._w.quant_state
        return ("q4", tensor_key(self._w), id(qs), id(qs.absmax), self._norm_dtype)
