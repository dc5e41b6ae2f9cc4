"""8-bit (LLM.int8) frozen bases in bitsandbytes' storage, without bitsandbytes.

    CB, SCB = lorafuse.quant8.quantize_weight_int8(W)      # W (out, in) → int8 (out, in), float32 (out,)
    W_ = lorafuse.quant8.dequantize_int8(CB, SCB, torch.bfloat16)
    layer = lorafuse.quant8.Linear8bit.from_linear(linear)  # or lorafuse.quantize(model, "int8")

The storage is bitsandbytes 0.50's ``Int8Params`` / ``Linear8bitLt`` with ``has_fp16_weights=False`` (what
transformers' ``BitsAndBytesConfig(load_in_8bit=True)`` builds): row-major int8 codes CB (out, in) — the
``weight`` itself — and one float32 scale per output row, SCB (out,), the row's absolute maximum.

Quantization (`quantize_weight_int8`; bnb's ``Int8Params._quantize`` on the CPU, i.e. its default
``int8_vectorwise_quant`` with threshold 0): W is cast to float16 first, ``SCB = float32(max |W16[i, :]|)``,
``CB = int8(round(W16 · fl32(127 / SCB)))`` — the product in float32, rounded half to even. A row whose
float16 values are all zero (or underflow to zero in float16) has SCB 0 and codes 0: bnb computes 0 · inf =
NaN there and casts it to int8, which gives 0 on x86 CPUs (an implementation-defined cast); lorafuse writes
the 0 explicitly. W must be finite in float16: bnb would store NaN scales for a value beyond ±65504.

Dequantization (`dequantize_int8`) is bnb's ``MatMul8bitFp`` (what ``Linear8bitLt`` computes with in training
mode on the CPU, and its backward): ``CB.to(dtype).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))``, i.e.
``W'[i, j] = round_dtype(float32(CB[i, j]) · fl32(SCB[i] · fl32(1/127)))``; float64 gives that product
exactly. `Linear8bit`'s forward is ``F.linear(x, W', bias)`` with W' in x's dtype — bit-identical to bnb's
``Linear8bitLt`` in training mode (``.train()``) on the CPU. bnb's eval mode (int8 activations, LLM.int8()'s
outlier threshold) is another computation and is not reproduced. Its state dict holds what
``Linear8bitLt`` saves: ``weight`` (int8), ``bias``, ``SCB`` (float32), ``weight_format`` (uint8 0, "row").
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.compiler import is_compiling

from . import _C
from .backend import cpu_kernels
from .quant_lora import kept_handle, lora_linear_quant, rank0_adapters

__all__ = ["Weight8bit", "Linear8bit", "quantize_weight_int8", "dequantize_int8", "q8_handle", "lora_linear_8bit"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_FP16_MAX = torch.finfo(torch.float16).max
_ROW = 0  # bnb's LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING["row"]: the only layout bnb 0.50 stores and reads


def _what(t: Any) -> str:
    return f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__


def quantize_weight_int8(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB, SCB) of W (out, in): CB int8 (out, in), SCB float32 (out,), on W's device — the bits that
    bitsandbytes' ``Int8Params`` stores on the CPU (module docstring). W: a floating-point 2-D tensor with at
    least one element, finite in float16. Raises TypeError / ValueError otherwise."""
    if not isinstance(W, torch.Tensor) or not W.is_floating_point():
        raise TypeError(f"quantize_weight_int8: W must be a floating-point tensor, got {_what(W)}")
    if W.dim() != 2 or W.numel() == 0:
        raise ValueError(f"quantize_weight_int8: W must be 2-D (out_features, in_features) with no empty dimension, "
                         f"got shape {tuple(W.shape)}")
    W16 = W.detach().contiguous().to(torch.float16)  # bnb: self.data.contiguous().to(dtype=torch.float16)
    if not torch.isfinite(W16).all():
        finite = torch.isfinite(W.detach()).all()
        why = f"exceeds float16's range (±{_FP16_MAX:g})" if finite else "holds inf or NaN"
        raise ValueError(f"quantize_weight_int8: W {why}; bitsandbytes stores W in float16 first")
    SCB = torch.max(W16.abs(), dim=1).values.float()  # the row's absmax, exact
    scale = (127.0 / SCB.unsqueeze(-1)).masked_fill_((SCB == 0).unsqueeze(-1), 0.0)  # zero rows: codes 0, not NaN
    CB = torch.round(W16 * scale).to(torch.int8)  # float16 · float32 → float32 product, half to even
    return CB, SCB


def _check_stored(CB: Any, SCB: Any, fname: str) -> None:
    if not isinstance(CB, torch.Tensor) or CB.dtype != torch.int8:
        raise TypeError(f"{fname}: CB must be an int8 tensor, got {_what(CB)}")
    if not isinstance(SCB, torch.Tensor) or SCB.dtype != torch.float32:
        raise TypeError(f"{fname}: SCB must be a float32 tensor, got {_what(SCB)}")
    if CB.dim() != 2 or SCB.shape != CB.shape[:1]:
        raise ValueError(f"{fname}: CB must be 2-D (out_features, in_features) and SCB (out_features,), got CB "
                         f"{tuple(CB.shape)} and SCB {tuple(SCB.shape)}")
    if CB.device != SCB.device:
        raise ValueError(f"{fname}: CB is on {CB.device} and SCB on {SCB.device}")


def dequantize_int8(CB: torch.Tensor, SCB: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W' (out, in) in ``dtype`` (float32, bfloat16, float16 or float64) from int8 codes CB (out, in) and float32
    row scales SCB (out,): bit-identical to the W that bitsandbytes' ``MatMul8bitFp`` multiplies by (module
    docstring); float64 gives the exact products. Raises TypeError / ValueError for arguments it cannot take
    (SCB must hold finite scales ≥ 0)."""
    _check_stored(CB, SCB, "dequantize_int8")
    if dtype not in _DTYPES:
        raise ValueError(f"dequantize_int8: dtype must be float32, bfloat16, float16 or float64, got {dtype}")
    if not (torch.isfinite(SCB) & (SCB >= 0)).all():
        raise ValueError("dequantize_int8: SCB must hold finite row scales >= 0")
    return CB.detach().to(dtype).mul_(SCB.detach().unsqueeze(1).mul(1.0 / 127.0))  # MatMul8bitFp's two products


class Weight8bit(nn.Parameter):
    """The int8 codes CB (out, in) of an 8-bit weight as a frozen Parameter carrying its float32 row scales
    ``SCB`` (out,) (as bnb's ``Int8Params`` does): ``copy.deepcopy`` and pickling (``torch.save``) keep
    ``SCB``, which a plain Parameter would drop. ``CB`` is the data itself."""

    def __new__(cls, data: torch.Tensor, SCB: torch.Tensor) -> "Weight8bit":
        if isinstance(data, torch.Tensor) and isinstance(SCB, torch.Tensor):
            data, SCB = data.detach(), SCB.detach()
        _check_stored(data, SCB, "Weight8bit")
        self = super().__new__(cls, data, requires_grad=False)
        self.SCB = SCB
        return self

    @property
    def CB(self) -> torch.Tensor:
        """The int8 codes (out, in): the data (bnb's ``Int8Params.CB``)."""
        return self.data

    def __deepcopy__(self, memo: dict) -> "Weight8bit":
        new = type(self)(self.data.clone(), copy.deepcopy(self.SCB, memo))
        memo[id(self)] = new
        return new

    def __reduce_ex__(self, protocol: int) -> tuple:
        return (Weight8bit, (self.data, self.SCB))


def _weight_format(value: Any) -> None:
    """bnb's ``maybe_rearrange_weight``: ``weight_format`` (a tensor, int or name) must say "row"."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if value not in (_ROW, "row"):
        raise ValueError(f"Linear8bit: only the 'row' weight format (0) is supported, got {value!r}")


class Linear8bit(nn.Module):
    """A frozen nn.Linear stored as bitsandbytes' ``Linear8bitLt`` stores it: ``weight`` a `Weight8bit` (int8
    CB (out_features, in_features) with ``weight.SCB`` float32 (out_features,)), ``bias`` a frozen Parameter
    or None. forward = x·W'ᵀ + bias with W' = `dequantize_int8` in x's dtype (bnb's training-mode CPU
    arithmetic). State dict: ``weight``, ``bias``, ``SCB``, ``weight_format`` — bnb's keys, dtypes and shapes;
    ``load_state_dict`` takes bnb's, its own, or a float nn.Linear's (quantized as bnb quantizes it).
    CB / SCB None: zeros, a placeholder to load a state dict into."""

    weight_format = "row"

    def __init__(self, in_features: int, out_features: int, CB: Optional[torch.Tensor] = None,
                 SCB: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        if CB is None and SCB is None:
            CB = torch.zeros(self.out_features, self.in_features, dtype=torch.int8)
            SCB = torch.zeros(self.out_features, dtype=torch.float32)
        self.weight = Weight8bit(CB, SCB)
        if tuple(self.weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"Linear8bit: CB must have shape ({self.out_features}, {self.in_features}), got "
                             f"{tuple(self.weight.shape)}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (self.out_features,)):
            raise ValueError(f"Linear8bit: bias must be a tensor of shape ({self.out_features},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Linear8bit":
        """The layer with ``linear``'s weight quantized by `quantize_weight_int8` and its bias (dtype kept)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Linear8bit.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        CB, SCB = quantize_weight_int8(linear.weight)
        return cls(linear.in_features, linear.out_features, CB, SCB, linear.bias)

    def _dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """W' (out_features, in_features) in ``dtype``: what `forward` multiplies by (`dequantize_int8`)."""
        return dequantize_int8(self.weight.data, self.weight.SCB, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x·W'ᵀ + bias (..., out_features) for x (..., in_features) float32, bfloat16, float16 (or float64):
        ``F.linear`` on W' and the bias in x's dtype — bitsandbytes' ``Linear8bitLt`` in training mode on the
        CPU. bf16 / fp16 x on the CPU: the fused kernels at rank 0 on W's codes (`lora_linear_8bit`: W'
        never formed, one rounding of the fp32 sum as ``F.linear``'s); else ``F.linear`` on W'. Differentiable
        in x (W and the bias are frozen)."""
        if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
            raise TypeError(f"Linear8bit: x must be a float32, bfloat16, float16 or float64 tensor, got {_what(x)}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"Linear8bit: x must have shape (..., {self.in_features}), got {tuple(x.shape)}")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if (x.dtype in (torch.bfloat16, torch.float16) and x.is_cpu and x.numel() and self.weight.is_cpu
                and not is_compiling() and not torch.is_autocast_enabled("cpu") and cpu_kernels() is not None):
            return lora_linear_8bit(x, self.weight, self.weight.SCB, bias, *rank0_adapters(self, x.dtype), 0.0)
        return F.linear(x, self._dequantized(x.dtype), bias)

    def _apply(self, fn: Any, recurse: bool = True) -> "Linear8bit":
        """Module.to / .cuda / .half …: the codes stay int8 and the scales float32 (on the codes' device)."""
        SCB = self.weight.SCB
        super()._apply(fn, recurse)
        if not isinstance(self.weight, Weight8bit):  # torch's overwrite-on-conversion mode makes a new Parameter
            self.weight = Weight8bit(self.weight.data, SCB.to(self.weight.device))
        self.weight.SCB = SCB.to(self.weight.device)
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight (int8), bias
        SCB = self.weight.SCB
        destination[prefix + "SCB"] = SCB if keep_vars else SCB.detach()
        destination[prefix + "weight_format"] = torch.tensor(_ROW, dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        wkey, skey, fkey = prefix + "weight", prefix + "SCB", prefix + "weight_format"
        if fkey in state_dict:
            _weight_format(state_dict[fkey])
        rest = {k: v for k, v in state_dict.items() if k not in (skey, fkey)}
        weight, SCB = state_dict.get(wkey), state_dict.get(skey)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            if SCB is not None:
                error_msgs.append(f"{wkey} is floating point but {skey} is given: expected int8 codes with their "
                                  f"scales, or a float weight alone (quantized on load)")
                return
            rest[wkey], SCB = quantize_weight_int8(weight)  # a float nn.Linear's state dict, as bnb quantizes it
        elif isinstance(weight, torch.Tensor) and weight.dtype != torch.int8:
            error_msgs.append(f"{wkey} must be int8 codes (or a float weight), got {weight.dtype}")
            return
        elif weight is not None and SCB is None:
            missing_keys.append(skey)
        if SCB is not None and (not isinstance(SCB, torch.Tensor) or not SCB.is_floating_point()
                                or SCB.shape != (self.out_features,)):
            error_msgs.append(f"{skey} must be a float32 tensor of shape ({self.out_features},), got {_what(SCB)}"
                              + (f" of shape {tuple(SCB.shape)}" if isinstance(SCB, torch.Tensor) else ""))
            return
        old = self.weight.SCB
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if not isinstance(self.weight, Weight8bit):  # load_state_dict(assign=True) put a plain Parameter there
            self.weight = Weight8bit(self.weight.data, old)
        if SCB is not None:
            self.weight.SCB = SCB.detach().to(device=self.weight.device, dtype=torch.float32).clone()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 codes with float32 row scales")


# ------------------------------------------------------------- LoRA on an 8-bit W: the kernels' torch entry

def q8_handle(weight: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> Any:
    """``_C.q8_weight`` of an 8-bit weight — int8 codes ``weight`` (out, in) and fp32 row scales ``scb`` (out,),
    bnb's ``Int8Params`` / ``SCB`` or `Linear8bit`'s — whose elements CB·(SCB·(1/127)) are
    rounded to ``dtype`` (bf16 or fp16). Kept on the weight as `quant.q4_handle`'s (keyed on both tensors)."""
    def make() -> Any:
        return _C.q8_weight(weight.detach(), scb.detach(), dtype=str(dtype).removeprefix("torch."))

    return kept_handle(weight, ("q8", weight.data_ptr(), weight._version, scb.data_ptr(), scb._version, dtype), make)


def lora_linear_8bit(x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor, bias: Optional[torch.Tensor],
                     lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, dropout_p: float = 0.0,
                     seed: int = 0) -> torch.Tensor:
    """y = x·Wᵀ + bias + scale·(x̃·Aᵀ)·Bᵀ (..., m) for x (..., k) bf16 or fp16 on the CPU, W an 8-bit weight:
    int8 codes ``weight`` (m, k) and fp32 row scales ``scb`` (m,) (bnb's LLM.int8 storage), its elements
    CB·(SCB·(1/127)) rounded to x's dtype — bitsandbytes' Linear8bitLt in training (MatMul8bitFp) —, one
    rounding of the whole sum; A (r, k), B (m, r) float32 or x's dtype, bias (m,) or None; dropout as
    `quant.lora_linear_4bit`. Differentiable in x, bias, A and B."""
    cd = x.dtype if isinstance(x, torch.Tensor) else None
    return lora_linear_quant("lora_linear_8bit", x, functools.partial(q8_handle, weight, scb),
                             functools.partial(dequantize_int8, weight, scb), bias, lora_a, lora_b, scale, dropout_p,
                             seed, cd, "half")
