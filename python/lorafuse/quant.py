"""4-bit frozen bases in bitsandbytes' storage (QLoRA's data layer, docs/DESIGN.md "4-bit bases").

    W = lorafuse.quant.dequantize(layer.weight)           # a bnb Params4bit (or lorafuse's) as it is
    y = lorafuse.quant.matmul_4bit(x, layer)              # x·Wᵀ, W dequantized inside the GEMM's packing
    lorafuse.quantize(model, "nf4", block_size=64, double_quant=True, skip_modules=("lm_head",))

The storage is bitsandbytes 0.50's (kernels/include/lorafuse/quant.h): W (out, in) read flat in
blocks of ``block_size`` elements, two 4-bit codes a byte (the even element in the high nibble), one
fp32 scale per block — or, double-quantized, uint8 scale codes + fp32 scales of 256 blocks + an offset.
`dequantize` reads bnb's ``Params4bit`` + ``quant_state`` (or lorafuse's `QuantState`) without
converting anything and gives the bits of ``bitsandbytes.functional.dequantize_4bit``; `quantize`
gives the bits of ``quantize_4bit`` (tests/test_quant4.py compares both where bitsandbytes is
installed). `Linear4bit` stores that layout, its state dict keys those of bnb's ``Linear4bit``
(``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``, ``bias``); its forward
runs the fused kernels on W's codes for bf16 / fp16 x (else dequantizes and runs ``F.linear``).
`matmul_4bit` is the fused 4-bit GEMM (``_C.q4gemm``): x·Wᵀ or g·W with W's codes dequantized while the
GEMM packs them, so W in full precision never exists. 8-bit (LLM.int8) bases: `lorafuse.quant8`
(``quantize(model, "int8")``: bnb's ``Linear8bitLt`` storage, int8 codes + a float32 scale per row).
"""
from __future__ import annotations

import copy
import functools
import json
import math
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.compiler import is_compiling

from . import _C
from .quant_lora import kept_handle, lora_linear_quant, rank0_adapters

__all__ = ["QuantState", "Weight4bit", "Linear4bit", "dequantize", "matmul_4bit", "quantize", "quantize_weight",
           "quantization_config", "q4_handle", "lora_linear_4bit"]

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_TYPES = ("nf4", "fp4")
_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _code(name: str) -> torch.Tensor:
    return torch.tensor(_C.quant_tables()[name], dtype=torch.float32)


class QuantState:
    """bitsandbytes' ``QuantState`` without bitsandbytes: the same attributes (``absmax``, ``shape``,
    ``code``, ``blocksize``, ``quant_type``, ``dtype``, ``offset``, ``state2``, ``nested``) and the same
    ``as_dict(packed=True)`` / ``from_dict`` format, so state dicts pass between the two."""

    def __init__(self, absmax: torch.Tensor, shape=None, code=None, blocksize=None, quant_type=None, dtype=None,
                 offset=None, state2: Optional["QuantState"] = None):
        self.absmax, self.shape, self.code, self.blocksize = absmax, shape, code, blocksize
        self.quant_type, self.dtype, self.offset, self.state2 = quant_type, dtype, offset, state2
        self.nested = state2 is not None

    def as_dict(self, packed: bool = False) -> dict:
        """bnb's format: tensors under their names, the rest JSON-packed into one uint8 tensor under
        ``quant_state.bitsandbytes__<type>`` when ``packed``."""
        d: dict = {"quant_type": self.quant_type, "absmax": self.absmax, "blocksize": self.blocksize,
                   "quant_map": self.code, "dtype": str(self.dtype).strip("torch."),
                   "shape": tuple(self.shape) if self.shape is not None else None}
        if self.nested:
            d.update({"nested_absmax": self.state2.absmax, "nested_blocksize": self.state2.blocksize,
                      "nested_quant_map": self.state2.code.clone(),
                      "nested_dtype": str(self.state2.dtype).strip("torch."), "nested_offset": float(self.offset)})
        if not packed:
            return d
        tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        rest = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
        tensors[f"quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(json.dumps(rest).encode()),
                                                                                dtype=torch.uint8)
        return tensors

    @classmethod
    def from_dict(cls, qs: dict) -> "QuantState":
        """The inverse of ``as_dict`` (keys stripped of their prefix up to the last dot). Values are
        checked when dequantized (`lorafuse._C.dequant_4bit` checks every length)."""
        qs = dict(qs)
        packed = [k for k in qs if k.startswith("quant_state.bitsandbytes__")]
        if len(packed) != 1 and "quant_type" not in qs:
            raise ValueError(f"expected one quant_state.bitsandbytes__<nf4|fp4> entry, found {packed}")
        if packed:
            blob = qs.pop(packed[0])
            qs.update(json.loads(bytes(blob.to(torch.uint8).cpu().numpy()).decode("utf-8")))
        qs = {k.split(".")[-1]: v for k, v in qs.items()}
        state2, offset = None, None
        if "nested_absmax" in qs:
            offset = torch.tensor(float(qs["nested_offset"]))
            state2 = cls(absmax=qs["nested_absmax"], blocksize=qs["nested_blocksize"], code=qs["nested_quant_map"],
                         dtype=getattr(torch, qs["nested_dtype"]))
        return cls(absmax=qs["absmax"], shape=torch.Size(qs["shape"]) if qs.get("shape") is not None else None,
                   code=qs["quant_map"], blocksize=qs["blocksize"], quant_type=qs["quant_type"],
                   dtype=getattr(torch, qs["dtype"]), offset=offset, state2=state2)


def _stored(weight: Any, quant_state: Any, fname: str) -> tuple:
    """(data uint8, absmax, (rows, cols), kwargs of the nested fields, quant_state) of a 4-bit weight as
    ``_C.dequant_4bit`` / ``_C.q4gemm`` take it: W (shape ``quant_state.shape``) read as (rows, cols) =
    (prod(shape[:-1]), shape[-1]); nothing converted but absmax dtypes bnb widens itself."""
    qs = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
    if qs is None:
        raise ValueError(f"{fname}: no quant_state (pass one, or a Params4bit that carries it)")
    data = weight.detach()
    if data.device.type != "cpu":
        raise ValueError(f"{fname}: the weight is on {data.device}; the 4-bit kernels run on the CPU")
    if data.dtype != torch.uint8:  # bnb's quant_storage (e.g. bfloat16): the same bytes
        data = data.contiguous().view(torch.uint8)
    shape = tuple(int(s) for s in qs.shape)
    rows2d = (math.prod(shape[:-1]), shape[-1]) if len(shape) >= 2 else (1, shape[0] if shape else 1)
    kw: dict = {}
    absmax = qs.absmax.detach()
    if getattr(qs, "nested", qs.state2 is not None):
        kw = dict(nested_absmax=qs.state2.absmax.detach().float(), nested_code=qs.state2.code.detach().float(),
                  nested_blocksize=int(qs.state2.blocksize), offset=float(qs.offset))
    elif absmax.dtype != torch.float32:  # bnb widens other absmax dtypes first
        absmax = absmax.float()
    return data, absmax, rows2d, kw, qs


def dequantize(weight: torch.Tensor, quant_state: Any = None, *, dtype: Optional[torch.dtype] = None,
               rows: Optional[tuple] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W (shape ``quant_state.shape``, e.g. (out_features, in_features)) from a 4-bit weight as it is
    stored: bnb's ``Params4bit`` (its ``.quant_state``) or lorafuse's, or packed data plus a quant
    state (bnb's ``QuantState`` or `QuantState`). dtype: ``quant_state.dtype`` unless given (float32,
    bfloat16 or float16); rows: (start, stop) for W[start:stop] only. Bit-identical to
    ``bitsandbytes.functional.dequantize_4bit`` (CPU tensors)."""
    data, absmax, rows2d, kw, qs = _stored(weight, quant_state, "dequantize")
    dtype = dtype or qs.dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dequantize: dtype must be float32, bfloat16 or float16, got {dtype}")
    r0, r1 = rows if rows is not None else (0, rows2d[0])
    if out is None:
        out = torch.empty((r1 - r0, rows2d[1]), dtype=dtype)
    _C.dequant_4bit(data, absmax, rows2d, int(qs.blocksize), str(qs.quant_type), _DTYPES[dtype],
                    rows=rows, out=out.view(r1 - r0, rows2d[1]), **kw)
    return out.view(tuple(int(s) for s in qs.shape)) if rows is None else out


def matmul_4bit(x: torch.Tensor, weight: Any, quant_state: Any = None, *, transpose: bool = True,
                dtype: Optional[torch.dtype] = None, bias: Optional[torch.Tensor] = None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x·Wᵀ (``transpose=True``: a Linear's forward, x (..., in_features) → y (..., out_features)) or
    y = x·W (``transpose=False``: dx = g·W, x (..., out_features) → y (..., in_features)), float32, for a
    4-bit W (out_features, in_features) dequantized inside the GEMM's packing (``_C.q4gemm``): the
    full-precision W never exists in memory.

    weight: bnb's ``Params4bit`` or lorafuse's 4-bit ``weight`` (their ``.quant_state``), a module holding
    one as ``.weight`` (`Linear4bit`, bnb's ``Linear4bit``), or packed data with ``quant_state``.
    x: float32, bfloat16 or float16, any strides (the leading dimensions flattened). W's elements are
    ``code · absmax`` (one fp32 product, as bnb) rounded once to ``dtype`` — by default x's dtype when x
    is half, else ``quant_state.dtype``: what bnb's ``matmul_4bit`` multiplies by (it dequantizes to
    ``quant_state.dtype``, then casts to x's dtype; the same values whenever one of the two is float32,
    else bnb rounds twice). bf16 x and bf16 W run the bf16 tiles (AMX / vdpbf16ps) where the CPU has
    them (``_C.q4gemm_path(x2d, dtype)`` names the path), else fp32 micro-kernels; fp32 accumulation.
    bias: (N,) added in fp32. out: a C-contiguous float32 tensor of y's shape."""
    if isinstance(weight, nn.Module):
        weight = weight.weight
    data, absmax, rows2d, kw, qs = _stored(weight, quant_state, "matmul_4bit")
    if x.dtype not in _DTYPES:
        raise ValueError(f"matmul_4bit: x must be float32, bfloat16 or float16, got {x.dtype}")
    if dtype is None:
        dtype = x.dtype if x.dtype != torch.float32 or qs.dtype not in _DTYPES else qs.dtype
    if dtype not in _DTYPES:
        raise ValueError(f"matmul_4bit: dtype must be float32, bfloat16 or float16, got {dtype}")
    k = rows2d[1] if transpose else rows2d[0]
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"matmul_4bit: x must have shape (..., {k}) for W {tuple(rows2d)}"
                         f"{'ᵀ' if transpose else ''}, got {tuple(x.shape)}")
    n = rows2d[0] if transpose else rows2d[1]
    lead = tuple(x.shape[:-1])
    x2 = x.detach().reshape(-1, k)
    out2 = None if out is None else out.view(-1, n)
    b = None if bias is None else bias.detach().float()
    c = _C.q4gemm(x2, data, absmax, rows2d, int(qs.blocksize), str(qs.quant_type), transpose, bias=b, out=out2,
                  dtype=_DTYPES[dtype], **kw)
    return (out if out is not None else torch.from_numpy(c)).view(*lead, n)


def quantize_weight(W: torch.Tensor, quant_type: str = "nf4", *, block_size: int = 64,
                    double_quant: bool = True) -> tuple[torch.Tensor, QuantState]:
    """(packed, quant_state) of W as bitsandbytes' ``quantize_4bit(W, blocksize, compress_statistics,
    quant_type)`` on the CPU gives them: packed uint8 (ceil(n/2), 1), the state's dtype W's."""
    if quant_type not in _TYPES:
        raise ValueError(f"quantize: quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if W.dtype not in _DTYPES:
        raise ValueError(f"quantize: W must be float32, bfloat16 or float16, got {W.dtype}")
    data, absmax = _C.quant_4bit(W.detach().cpu().contiguous(), block_size, quant_type)
    data, absmax = torch.from_numpy(data).unsqueeze(1), torch.from_numpy(absmax)
    state = QuantState(absmax=absmax, shape=W.shape, code=_code(quant_type), blocksize=block_size,
                       quant_type=quant_type, dtype=W.dtype)
    if double_quant:
        offset = absmax.mean()  # torch's mean, as bnb (its summation order, its last bit)
        codes, nested, _ = _C.double_quant(absmax, float(offset), 256)
        state.absmax, state.offset, state.nested = torch.from_numpy(codes), offset, True
        state.state2 = QuantState(absmax=torch.from_numpy(nested), code=_code("dynamic"), blocksize=256,
                                  dtype=torch.float32)
    return data, state


class Weight4bit(nn.Parameter):
    """The packed codes of a 4-bit weight as a frozen Parameter carrying its ``quant_state`` (as bnb's
    ``Params4bit`` does): ``copy.deepcopy`` and pickling (``torch.save``) keep the state, which a plain
    Parameter would drop."""

    def __new__(cls, data: torch.Tensor, quant_state: QuantState) -> "Weight4bit":
        self = super().__new__(cls, data, requires_grad=False)
        self.quant_state = quant_state
        return self

    def __deepcopy__(self, memo: dict) -> "Weight4bit":
        new = type(self)(self.data.clone(), copy.deepcopy(self.quant_state, memo))
        memo[id(self)] = new
        return new

    def __reduce_ex__(self, protocol: int) -> tuple:
        return (Weight4bit, (self.data, self.quant_state))


class Linear4bit(nn.Module):
    """A frozen nn.Linear stored as bitsandbytes stores it (``weight``: uint8 (ceil(out·in/2), 1) with
    ``weight.quant_state``); forward = x·Wᵀ + bias as bitsandbytes' Linear4bit computes it (`forward`)."""

    def __init__(self, in_features: int, out_features: int, data: torch.Tensor, quant_state: QuantState,
                 bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Weight4bit(data, quant_state)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", *, block_size: int = 64,
                    double_quant: bool = True) -> "Linear4bit":
        data, state = quantize_weight(linear.weight, quant_type, block_size=block_size, double_quant=double_quant)
        return cls(linear.in_features, linear.out_features, data, state, linear.bias)

    @property
    def compute_dtype(self) -> Optional[torch.dtype]:
        """bf16 / fp16 when W was quantized from that dtype (``quant_state.dtype``): a float32 x is then computed
        as bitsandbytes' Linear4bit with that ``compute_dtype`` computes it — what `quantize`'s
        ``quantization_config`` tells bitsandbytes on reload —; else None (x's own dtype)."""
        dtype = self.weight.quant_state.dtype
        return dtype if dtype in (torch.bfloat16, torch.float16) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x·Wᵀ + bias (..., out_features). bf16 / fp16 x: W's elements rounded to x's dtype, one rounding
        of the sum; float32 x with a half `compute_dtype`: y = round(round(x)·Wᵀ + b) in that dtype, widened
        (bitsandbytes' arithmetic). On the CPU both run the fused kernels on W's codes (`lora_linear_4bit`
        below at rank 0: W never in full precision, dx by the same kernels); otherwise W is dequantized to x's
        dtype and ``F.linear`` runs."""
        cd = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else self.compute_dtype
        if (cd is not None and x.dtype in (cd, torch.float32) and x.is_cpu and x.numel() and not is_compiling()
                and not torch.is_autocast_enabled("cpu") and self.weight.is_cpu):
            adt = torch.float32 if x.dtype == torch.float32 else x.dtype  # a float32 x takes fp32 adapters
            bias = None if self.bias is None else self.bias.to(cd)
            return lora_linear_4bit(x, self.weight, bias, *rank0_adapters(self, adt), 0.0, compute_dtype=cd)
        dtype = x.dtype if x.dtype in _DTYPES else self.weight.quant_state.dtype
        return F.linear(x, dequantize(self.weight, dtype=dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for k, v in self.weight.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        head = prefix + "weight."
        qs = {k[len(head):]: state_dict[k] for k in list(state_dict) if k.startswith(head)}
        if qs:
            self.weight = Weight4bit(state_dict[prefix + "weight"].detach().clone(), QuantState.from_dict(qs))
        state = self.weight.quant_state
        super()._load_from_state_dict({k: v for k, v in state_dict.items() if not k.startswith(head)}, prefix,
                                      local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if not isinstance(self.weight, Weight4bit):  # load_state_dict(assign=True) put a plain Parameter there
            self.weight = Weight4bit(self.weight.data, state)

    def extra_repr(self) -> str:
        qs = self.weight.quant_state
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={qs.quant_type}, blocksize={qs.blocksize}, double_quant={qs.nested}")


def quantize(model: nn.Module, quant_type: str = "nf4", *, block_size: Optional[int] = None,
             double_quant: Optional[bool] = None, skip_modules: Iterable[str] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear of ``model`` (in place; not those whose name or last name component is in
    ``skip_modules``) by a layer holding bitsandbytes' storage of its weight; returns the model.
    quant_type "nf4" / "fp4": `Linear4bit` (block_size: default 64; double_quant: default True). "int8":
    `lorafuse.quant8.Linear8bit` (bnb's ``Linear8bitLt``: int8 codes, one float32 scale per output row);
    block_size and double_quant do not apply to it, and passing either raises ValueError. A transformers
    model also gets ``config.quantization_config`` (`quantization_config`): its ``save_pretrained``
    directory loads with ``from_pretrained`` where bitsandbytes is installed."""
    if quant_type not in _TYPES + ("int8",):
        raise ValueError(f"quantize: quant_type must be 'nf4', 'fp4' or 'int8', got {quant_type!r}")
    if quant_type == "int8":
        if block_size is not None or double_quant is not None:
            raise ValueError("quantize: block_size and double_quant apply to 'nf4' / 'fp4' only; 'int8' has one "
                             "scale per output row")
        from .quant8 import Linear8bit

        make = Linear8bit.from_linear
    else:
        block_size = 64 if block_size is None else block_size
        double_quant = True if double_quant is None else bool(double_quant)
        if block_size not in _BLOCK_SIZES:
            raise ValueError(f"quantize: block_size must be one of {_BLOCK_SIZES}, got {block_size}")

        def make(linear: nn.Linear) -> nn.Module:
            return Linear4bit.from_linear(linear, quant_type, block_size=block_size, double_quant=double_quant)
    skip = set(skip_modules)
    targets = [(name, m) for name, m in model.named_modules()
               if name and type(m) is nn.Linear and name not in skip and name.rsplit(".", 1)[-1] not in skip]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(linear))
    config = getattr(model, "config", None)
    if targets and config is not None and hasattr(config, "to_dict"):  # a transformers model
        config.quantization_config = quantization_config(quant_type, bool(double_quant), targets[0][1].weight.dtype,
                                                         skip_modules)
    return model


def quantization_config(quant_type: str, double_quant: bool, compute_dtype: torch.dtype,
                        skip_modules: Iterable[str]) -> dict:
    """What transformers' ``BitsAndBytesConfig(…).to_dict()`` holds for this quantization: `quantize` puts it in a
    transformers model's ``config.quantization_config``, so that ``save_pretrained`` writes it into config.json
    and ``from_pretrained`` — with bitsandbytes installed — builds bnb's modules and loads the stored weights as
    they are. "nf4" / "fp4": ``load_in_4bit=True`` with that quant type, double quant and compute dtype (the
    weights' dtype before quantization; the block size travels in each weight's quant state). "int8": the dict
    of ``BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)``, its 4-bit fields at their
    defaults (double_quant and compute_dtype do not apply; nor does llm_int8_threshold to the stored bits —
    bnb quantizes weights with threshold 0 — only to bnb's eval-mode forward)."""
    int8 = quant_type == "int8"
    return {"quant_method": "bitsandbytes", "_load_in_8bit": int8, "_load_in_4bit": not int8,
            "load_in_4bit": not int8, "load_in_8bit": int8, "llm_int8_threshold": 6.0,
            "llm_int8_skip_modules": list(skip_modules), "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False, "bnb_4bit_quant_type": "fp4" if int8 else quant_type,
            "bnb_4bit_use_double_quant": False if int8 else bool(double_quant),
            "bnb_4bit_compute_dtype": "float32" if int8 else str(compute_dtype).replace("torch.", ""),
            "bnb_4bit_quant_storage": "uint8"}


# ------------------------------------------------------------- LoRA on a 4-bit W: the kernels' torch entry

def q4_handle(weight: Any, dtype: torch.dtype) -> Any:
    """``_C.q4_weight`` of a 4-bit weight (bnb's ``Params4bit`` or lorafuse's, with its ``quant_state``) whose
    elements are rounded to ``dtype`` (bf16 or fp16): what ``lora_forward`` / ``lora_backward`` take as W.
    Kept on the weight while its data, version and quant state stay the same objects (an in-place
    change or a new quant state makes a new one); the handle references the arrays it reads."""
    qs = weight.quant_state

    def make() -> Any:
        data, absmax, rows2d, kw, _ = _stored(weight, qs, "q4_handle")
        return _C.q4_weight(data, absmax, rows2d, int(qs.blocksize), str(qs.quant_type), dtype=_DTYPES[dtype], **kw)

    return kept_handle(weight, ("q4", weight.data_ptr(), weight._version, id(qs), id(qs.absmax), dtype), make)


def lora_linear_4bit(x: torch.Tensor, weight: Any, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                     lora_b: torch.Tensor, scale: float, dropout_p: float = 0.0, seed: int = 0,
                     compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y = x·Wᵀ + bias + scale·(x̃·Aᵀ)·Bᵀ (..., m) for x (..., k) on the CPU, W a 4-bit weight (out, in)
    (bnb's ``Params4bit`` or lorafuse's, with ``quant_state``) whose elements are rounded to the compute dtype
    (bf16 or fp16; default x's dtype), A (r, k) and B (m, r) float32 or the compute dtype, bias (m,) or None;
    dropout p with the kernels' seeded mask. x in the compute dtype: one rounding of the whole sum. x float32
    (fp32 adapters): bitsandbytes' and PEFT's roundings — the base product on x rounded to the compute dtype,
    rounded itself, then the fp32 LoRA term (lora_half.c, 'mixed'). Differentiable in x, bias, A and B.
    Raises TypeError / ValueError for operands it cannot take."""
    cd = compute_dtype or x.dtype if isinstance(x, torch.Tensor) else None
    return lora_linear_quant("lora_linear_4bit", x, functools.partial(q4_handle, weight),
                             functools.partial(_dequantize_as, weight), bias, lora_a, lora_b, scale, dropout_p, seed,
                             cd, "half or fp32")


def _dequantize_as(weight: Any, dtype: torch.dtype) -> torch.Tensor:
    return dequantize(weight, dtype=dtype)
