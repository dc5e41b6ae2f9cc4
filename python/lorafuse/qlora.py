"""QLoRA on the fused kernels: LoRA layers on a 4-bit or 8-bit frozen base (bitsandbytes' storage, read as it is).

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16), dtype=torch.bfloat16)
    model = lorafuse.get_peft_model(model, LoraConfig(...))   # or peft.get_peft_model after patch_peft()

PEFT puts its ``lora.bnb.Linear4bit`` on bitsandbytes' ``Linear4bit`` modules; lorafuse makes those layers
`FusedLinear4bit` (a subclass: same constructor, parameters, state-dict keys, merge/unmerge — PEFT's own
code). Its forward, for x (..., in_features) → y (..., out_features), per output element j:

    y  = round_cd(x·Wᵀ + b + s·(x̃·Aᵀ)·Bᵀ)         W[j, p] = round_cd(code[q[j, p]] · absmax[block])
    dx = round_cd(g·W + s·drop'((g·B)·A)),  dA = s·(g·B)ᵀ·x̃,  dB = s·gᵀ·(x̃·Aᵀ)

cd the compute dtype (bf16 or fp16; x's dtype), every sum fp32: the C kernels of the half-precision path
(kernels/cpu/lora_half.c) with W given as its 4-bit codes (``_C.q4_weight``), dequantized inside the GEMM's
packing or, for a few tokens, a block at a time in cache (rowdots_half.c) — W in full precision never exists
in memory, in the forward or in dx. bitsandbytes + PEFT instead dequantize all of W to bf16 in every forward
and again in every backward, round x·Wᵀ + b to bf16, then add the LoRA term computed apart. W's elements are
bit-identical to ``bitsandbytes.functional.dequantize_4bit`` (tests/test_quant4.py) followed by bnb's cast to
the compute dtype.

Fused when: adapters enabled and unmerged, one active plain-LoRA adapter — or, on a 4-bit base, a DoRA one
(``use_dora=True``: `dora.dora_linear_half` on `half_weight.Quant4HalfW`, x in the compute dtype, fp32 adapters
and magnitude; the row norms from W dequantized 256 rows at a time, kept, and W·Aᵀ by the 4-bit GEMM) — (no other
variant, no ``lora_bias``), the base exactly bnb's ``Linear4bit`` (or LinearNF4 / LinearFP4) without hooks and in its
canonical layout (not bnb's CPU inference repacking, ``packing_format_for_cpu``), x on the CPU in the layer's
compute dtype (bf16 or fp16) — or float32 (QLoRA's fp32 activations after PEFT's
``prepare_model_for_kbit_training``: then, as bnb + PEFT compute it, the base product on x rounded to the
compute dtype and rounded itself, the fp32 LoRA term added after, y and dx float32) —, the quant state's
dtype float32 or the compute dtype (one rounding of each W element, as bnb), adapters float32 (PEFT's
default) or the compute dtype, no autocast, not while torch.compile traces, no extra forward argument.
Anything else runs PEFT's forward unchanged; ``layer.lorafuse_path`` tells which ran last ('c' or 'peft').
Under ``create_graph=True`` the gradients come from torch math on W dequantized (differentiable), as
`lorafuse.autograd` does for full-precision bases.

8-bit bases (LLM.int8: ``load_in_8bit=True``, bnb's ``Linear8bitLt`` with ``Int8Params`` — int8 codes CB (out,
in) and one fp32 scale SCB per row): PEFT's ``lora.bnb.Linear8bitLt`` becomes `FusedLinear8bitLt`, computing the
formulas above with W[j, p] = round_cd(CB[j, p] · (SCB[j] · (1/127))) (``_C.q8_weight``), cd = x's dtype —
bnb's Linear8bitLt in training mode (``MatMul8bitFp``: W dequantized to x's dtype, then ``F.linear``). Fused
under the conditions above, and only in training mode with x bf16 / fp16: in eval mode bnb quantizes x to int8
too (its inference matmul, with outlier columns), and a float32 x it computes in float32 — PEFT's forward runs
there. `LoraLinear4bit` / `LoraLinear8bit` do the same on lorafuse's own quantized modules (`lorafuse.quantize`).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable, Optional

import torch
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.compiler import is_compiling

from .backend import cpu_kernels, draw_seed
from .dora import dora_linear_half, dora_magnitude, forget_row_norms, kept_row_norms
from .half_weight import Quant4HalfW
from .layers import lora_unhooked, under_transform
from .quant import Linear4bit, Weight4bit, dequantize, lora_linear_4bit, quantize_weight
from .quant8 import Linear8bit, Weight8bit, lora_linear_8bit, quantize_weight_int8

__all__ = ["FusedLinear4bit", "FusedLinear8bitLt", "LoraLinear4bit", "LoraLinear8bit", "dispatch_lorafuse_quant",
           "fused_call_4bit", "fused_call_8bit"]

_HALF = (torch.bfloat16, torch.float16)


def _bnb_class(name: str) -> Optional[type]:
    """bitsandbytes' ``nn.<name>`` class, or None without bitsandbytes."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return getattr(bnb.nn, name, None)


def _peft_bnb_class(name: str) -> Optional[type]:
    """PEFT's LoRA layer for a bnb base (``peft.tuners.lora.bnb.<name>``: Linear4bit, Linear8bitLt), or None."""
    if _bnb_class(name) is None:
        return None
    from peft.tuners.lora import bnb as peft_bnb

    return getattr(peft_bnb, name, None)


BnbLinear4bit, BnbLinear8bitLt = _bnb_class("Linear4bit"), _bnb_class("Linear8bitLt")
PeftLinear4bit, PeftLinear8bitLt = _peft_bnb_class("Linear4bit"), _peft_bnb_class("Linear8bitLt")


def fusable_base(base: nn.Module) -> bool:
    """bnb's Linear4bit (its forward, not overridden), W in bnb's canonical 4-bit layout (its hooks: the caller's
    `_adapter_operands`)."""
    if BnbLinear4bit is None or not isinstance(base, BnbLinear4bit) or type(base).forward is not BnbLinear4bit.forward:
        return False
    qs = getattr(base.weight, "quant_state", None)
    return (qs is not None and not getattr(qs, "packing_format_for_cpu", False) and len(qs.shape) == 2
            and base.weight.device.type == "cpu")


def bnb_int8_scales(base: nn.Module) -> Optional[torch.Tensor]:
    """SCB (out,) fp32 of bnb's Linear8bitLt (its forward, without hooks) computing as it does in training
    (``MatMul8bitFp``: W dequantized to x's dtype, then ``F.linear``): module in training mode, int8 weight
    (out, in) on the CPU, not ``has_fp16_weights``; else None. SCB lives on the weight until bnb's first forward
    moves it to ``state``. In eval mode bnb quantizes x to int8 as well (LLM.int8's inference matmul), which the
    fused kernels do not reproduce: PEFT's forward runs there."""
    if (BnbLinear8bitLt is None or not isinstance(base, BnbLinear8bitLt)
            or type(base).forward is not BnbLinear8bitLt.forward or not base.training
            or base.state.has_fp16_weights):
        return None
    w = base.weight
    scb = getattr(w, "SCB", None)
    scb = base.state.SCB if scb is None else scb
    if w.dtype != torch.int8 or w.dim() != 2 or not w.is_cpu or scb is None or scb.dtype != torch.float32:
        return None
    return scb if scb.shape == (w.shape[0],) else None


def _adapter_operands(layer: Any, x: torch.Tensor, cd: torch.dtype, x_dtypes: tuple,
                      dora: bool = False) -> Optional[tuple]:
    """(A, B, scale, dropout p, seed) of a quantized-base LoRA layer's one active adapter, or None where PEFT's
    forward must run: adapters disabled or merged, several active, a variant (but DoRA where ``dora``: the
    caller found the adapter is one and fuses it) or
    ``lora_bias``, x not a CPU tensor of width in_features and of a dtype in ``x_dtypes``, a compute dtype cd not
    bf16 / fp16, autocast, torch.compile tracing, adapter dtypes other than fp32 or cd (fp32 only for a float32
    x: PEFT casts x to A's dtype), the C extension missing, hooks on a module PEFT's forward calls
    (`layers.lora_unhooked`: accelerate's offload among them), a torch.func transform or forward AD."""
    if layer._disable_adapters or layer.merged_adapters or len(layer.active_adapters) != 1:
        return None
    name, modules = layer.active_adapters[0], layer._modules
    lin_a = modules["lora_A"]._modules.get(name)
    if (lin_a is None or (name in getattr(layer, "lora_variant", {}) and not dora) or layer.lora_bias.get(name)
            or not x.is_cpu or x.dtype not in x_dtypes or cd not in _HALF or x.shape[-1] != layer.in_features
            or x.numel() == 0 or torch.is_autocast_enabled("cpu") or is_compiling() or not lora_unhooked(layer, name)
            or under_transform()):
        return None
    lora_a, lora_b = lin_a.weight, modules["lora_B"]._modules[name].weight
    adtypes = (torch.float32,) if x.dtype == torch.float32 else (torch.float32, cd)
    if lora_a.dtype != lora_b.dtype or lora_a.dtype not in adtypes or cpu_kernels() is None:
        return None
    dropout = modules["lora_dropout"]._modules[name]
    p = float(dropout.p) if dropout.training and isinstance(dropout, nn.Dropout) else 0.0
    return lora_a, lora_b, float(layer.scaling[name]), p, draw_seed() if p > 0.0 else 0


def fused_call_4bit(layer: Any, x: torch.Tensor, base: nn.Module, cd: torch.dtype) -> Optional[Callable]:
    """`lora_linear_4bit` bound to a 4-bit LoRA layer's operands (`_adapter_operands`; x in cd ∈ {bf16, fp16} or
    float32) on a base whose elements are rounded once to the compute dtype ``cd`` (the caller has checked the
    base) — for a DoRA adapter `dora.dora_linear_half` on the 4-bit W (`half_weight.Quant4HalfW`; x in cd,
    adapters and magnitude float32, PEFT's default) —, or None where PEFT's forward must run."""
    active = layer.active_adapters
    magnitude = dora_magnitude(layer, active[0]) if len(active) == 1 else None
    ops = _adapter_operands(layer, x, cd, (cd,) if magnitude is not None else (cd, torch.float32),
                            dora=magnitude is not None)
    if ops is None:
        return None
    bias = base.bias
    bias = None if bias is None else bias.to(cd)  # added in the compute dtype, as bnb and `quant.Linear4bit` do
    a, b, scale, p, seed = ops
    if magnitude is None:
        return functools.partial(lora_linear_4bit, x, base.weight, bias, a, b, scale, p, seed, cd)
    if a.dtype != torch.float32 or magnitude.dtype != torch.float32:
        return None
    return functools.partial(dora_linear_half, x, Quant4HalfW(base.weight, cd), bias, a, b, magnitude, scale, p,
                             seed, kept_row_norms(layer), cpu_kernels())


def fused_call_8bit(layer: Any, x: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> Optional[Callable]:
    """`lora_linear_8bit` bound to an 8-bit LoRA layer's operands (`_adapter_operands`; x bf16 / fp16, the
    compute dtype) on int8 codes ``weight`` (out, in) and row scales ``scb``, or None where PEFT's forward must
    run (a float32 x among them: bitsandbytes computes it in float32)."""
    ops = _adapter_operands(layer, x, x.dtype, _HALF)
    if ops is None or weight.shape != (layer.out_features, layer.in_features):
        return None
    a, b, scale, p, seed = ops
    bias = None if bias is None else bias.to(x.dtype)  # bnb's Linear8bitLt adds it in x's dtype
    return functools.partial(lora_linear_8bit, x, weight, scb, bias, a, b, scale, p, seed)


class _FusedQuantForward:
    """The forward the quantized-base LoRA layers share: the fused call `_lorafuse_call` gives, else
    `_peft_forward` (PEFT's math). ``lorafuse_path``: 'c' or 'peft', the path of the last forward."""

    lorafuse_path: Optional[str] = None

    def _lorafuse_call(self, x: torch.Tensor) -> Optional[Callable]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _compute_dtype(self) -> torch.dtype:  # pragma: no cover - overridden
        raise NotImplementedError

    def _peft_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def backend(self) -> str:
        """'c' or 'peft': the path a forward would take now for an input of the compute dtype."""
        probe = torch.empty(1, self.in_features, dtype=self._compute_dtype())
        return "peft" if self._lorafuse_call(probe) is None else "c"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        fused = None if args or kwargs else self._lorafuse_call(x)
        self.__dict__["lorafuse_path"] = "peft" if fused is None else "c"
        return self._peft_forward(x, *args, **kwargs) if fused is None else fused()


if PeftLinear4bit is not None:

    class FusedLinear4bit(_FusedQuantForward, PeftLinear4bit):
        """PEFT's ``lora.bnb.Linear4bit`` with a fused forward (module docstring); adds no state."""

        def merge(self, *args: Any, **kwargs: Any) -> None:
            """PEFT's merge (W dequantized, s·B·A added, quantized again); the kept DoRA norms of W go first."""
            forget_row_norms(self)
            super().merge(*args, **kwargs)

        def unmerge(self, *args: Any, **kwargs: Any) -> None:
            """PEFT's unmerge, the kept DoRA norms of W dropped first (see `merge`)."""
            forget_row_norms(self)
            super().unmerge(*args, **kwargs)

        def _lorafuse_call(self, x: torch.Tensor) -> Optional[Callable]:
            """`lora_linear_4bit` on this layer's operands, or None where PEFT's forward must run."""
            base = self._modules["base_layer"]
            if not fusable_base(base):
                return None
            cd = base.compute_dtype if base.compute_dtype is not None else x.dtype  # bnb sets it from x
            if base.weight.quant_state.dtype not in (torch.float32, cd):  # bnb would round W's elements twice
                return None
            return fused_call_4bit(self, x, base, cd)

        def _compute_dtype(self) -> torch.dtype:
            return getattr(self.get_base_layer(), "compute_dtype", None) or torch.bfloat16

        def _peft_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return PeftLinear4bit.forward(self, x, *args, **kwargs)

        def _get_name(self) -> str:
            return "Linear4bit"  # its repr stays PEFT's "lora.Linear4bit(...)"
else:  # pragma: no cover - without bitsandbytes PEFT has no 4-bit LoRA layer to fuse
    FusedLinear4bit = None  # type: ignore[assignment,misc]


if PeftLinear8bitLt is not None:

    class FusedLinear8bitLt(_FusedQuantForward, PeftLinear8bitLt):
        """PEFT's ``lora.bnb.Linear8bitLt`` with a fused forward (module docstring) where bnb's base computes as
        in training (`bnb_int8_scales`); adds no state."""

        def _lorafuse_call(self, x: torch.Tensor) -> Optional[Callable]:
            """`lora_linear_8bit` on this layer's operands, or None where PEFT's forward must run."""
            base = self._modules["base_layer"]
            scb = bnb_int8_scales(base)
            return None if scb is None else fused_call_8bit(self, x, base.weight, scb, base.bias)

        def _compute_dtype(self) -> torch.dtype:
            return torch.bfloat16

        def _peft_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return PeftLinear8bitLt.forward(self, x, *args, **kwargs)

        def _get_name(self) -> str:
            return "Linear8bitLt"  # its repr stays PEFT's "lora.Linear8bitLt(...)"
else:  # pragma: no cover - without bitsandbytes PEFT has no 8-bit LoRA layer to fuse
    FusedLinear8bitLt = None  # type: ignore[assignment,misc]


# PEFT ≥ 0.19 passes its LoraConfig to update_layer; older PEFT the config's fields one by one
_UPDATE_LAYER_ARGS = frozenset(inspect.signature(LoraLayer.update_layer).parameters)


class _LoraOnQuantized(_FusedQuantForward, nn.Module, LoraLayer):
    """PEFT's LoRA layer (``LoraLayer``: lora_A / lora_B / lora_dropout / scaling, PEFT's state-dict keys and
    initialisations) on one of lorafuse's own quantized modules (`lorafuse.quantize`, no bitsandbytes needed):
    `LoraLinear4bit`, `LoraLinear8bit`. Forward: fused where `_lorafuse_call` says so, else base(x) + the LoRA
    term as PEFT computes it (x cast to the adapters' dtype, the term cast back). Merging dequantizes W, adds
    s·B·A and quantizes again the same way (`_requantize`), as PEFT does for bitsandbytes' layers (with its
    warning about rounding). Variants (DoRA …) are refused with ValueError."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any = None, r: int = 0, lora_alpha: int = 1,
                 **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        if "config" in _UPDATE_LAYER_ARGS:
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)
        else:  # PEFT < 0.19: the config's fields as keyword arguments (PEFT's dispatch passes them)
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha,
                              **{k: v for k, v in kwargs.items() if k in _UPDATE_LAYER_ARGS})

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: Any = None, use_dora: bool = False, use_alora: bool = False,
                             **kwargs: Any) -> None:
        """None (plain LoRA); ValueError for DoRA / aLoRA (PEFT ≥ 0.19 passes the config, older PEFT its fields)."""
        if config is not None:
            use_dora = use_dora or config.use_dora
            use_alora = use_alora or getattr(config, "alora_invocation_tokens", None) is not None
        if use_dora or use_alora:
            name = type(self.get_base_layer()).__name__
            raise ValueError(f"lorafuse.quant's {name} takes plain LoRA adapters only (no DoRA or aLoRA); "
                             "load the model with bitsandbytes for PEFT's quantized variants")
        return None

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """s·B·A (out_features, in_features) in the adapters' dtype."""
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def _requantize(self, adapter: str, sign: float, safe: bool = False) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _merged_weight(self, dequantized: torch.Tensor, adapter: str, sign: float, safe: bool) -> torch.Tensor:
        """dequantized + sign·s·B·A, checked for NaN / Inf when ``safe`` (PEFT's safe_merge)."""
        merged = dequantized + sign * self.get_delta_weight(adapter)
        if safe and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        return merged

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """PEFT's merge for a quantized base (see the class docstring)."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter in self.lora_A:
                self._requantize(adapter, 1.0, safe_merge)
                self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """PEFT's unmerge for a quantized base: the merged adapters subtracted again, last first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                self._requantize(adapter, -1.0)

    def _peft_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """base(x), plus each active adapter's s·B(A(drop(x))) computed as PEFT computes it."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError(f"LoRA layers on lorafuse.quant's {type(self.get_base_layer()).__name__} do not take "
                             "adapter_names (mixed batches)")
        kwargs.pop("adapter_names", None)
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
            xa = self._cast_input_dtype(x, lora_a.weight.dtype)
            term = lora_b(lora_a(self.lora_dropout[adapter](xa))) * self.scaling[adapter]
            result = result + term.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class LoraLinear4bit(_LoraOnQuantized):
    """`_LoraOnQuantized` on `lorafuse.quant.Linear4bit`. Fused (the module docstring's conditions) for x in
    bf16 / fp16, W's elements rounded once to x's dtype; or float32 x on a W quantized from bf16 / fp16, its
    base product in that dtype as `quant.Linear4bit` computes it. Merge: quantize(dequantize(W) + s·B·A) with
    the same type, block size and double quantization."""

    def _lorafuse_call(self, x: torch.Tensor) -> Optional[Callable]:
        base = self._modules["base_layer"]
        if type(base) is not Linear4bit:  # its hooks: `_adapter_operands`
            return None
        cd = x.dtype if x.dtype in _HALF else base.compute_dtype  # as `quant.Linear4bit.forward` computes
        return None if cd is None else fused_call_4bit(self, x, base, cd)

    def _compute_dtype(self) -> torch.dtype:
        return self.get_base_layer().weight.quant_state.dtype

    def _requantize(self, adapter: str, sign: float, safe: bool = False) -> None:
        """W ← quantize(dequantize(W) + sign·s·B·A) (bnb's arithmetic: W in its stored dtype, promoted by the
        sum)."""
        warnings.warn("Merge lora module to 4-bit linear may get different generations due to rounding errors.")
        base = self.get_base_layer()
        qs = base.weight.quant_state
        merged = self._merged_weight(dequantize(base.weight), adapter, sign, safe)
        data, state = quantize_weight(merged, qs.quant_type, block_size=int(qs.blocksize), double_quant=qs.nested)
        base.weight = Weight4bit(data, state)


class LoraLinear8bit(_LoraOnQuantized):
    """`_LoraOnQuantized` on `lorafuse.quant8.Linear8bit`. Fused for x in bf16 / fp16 (W's elements
    CB·(SCB·(1/127)) rounded once to x's dtype, as bnb's Linear8bitLt computes in training); a float32 x runs
    the base's float32 product and PEFT's LoRA term. Merge as PEFT's ``lora.bnb.Linear8bitLt``: W dequantized as
    bnb's ``int8_vectorwise_dequant`` (CB·SCB·(1/127), float32), s·B·A added, quantized again (W rounded to
    float16 first, row absmax scales: `quant8.quantize_weight_int8`)."""

    def _lorafuse_call(self, x: torch.Tensor) -> Optional[Callable]:
        base = self._modules["base_layer"]
        if type(base) is not Linear8bit:  # its hooks: `_adapter_operands`
            return None
        return fused_call_8bit(self, x, base.weight, base.weight.SCB, base.bias)

    def _compute_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def _requantize(self, adapter: str, sign: float, safe: bool = False) -> None:
        """W ← quantize_int8(CB·SCB·(1/127) + sign·s·B·A)."""
        warnings.warn("Merge lora module to 8-bit linear may get different generations due to rounding errors.")
        base = self.get_base_layer()
        w = base.weight
        dequantized = w.data.float() * w.SCB.view(-1, 1) * 7.874015718698502e-3  # int8_vectorwise_dequant's order
        merged = self._merged_weight(dequantized, adapter, sign, safe)
        base.weight = Weight8bit(*quantize_weight_int8(merged))


def dispatch_lorafuse_quant(target: nn.Module, adapter_name: str, config: Any = None,
                            **kwargs: Any) -> Optional[nn.Module]:
    """A PEFT dispatcher: `LoraLinear4bit` for a `lorafuse.quant.Linear4bit` target, `LoraLinear8bit` for a
    `lorafuse.quant8.Linear8bit` one, else None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    cls = LoraLinear4bit if isinstance(base, Linear4bit) else LoraLinear8bit if isinstance(base, Linear8bit) else None
    if cls is None:
        return None
    config = config if config is not None else kwargs.pop("lora_config", None)  # PEFT < 0.19 names it so
    return cls(target, adapter_name, config=config, **kwargs)
