"""Opt-in cache of a frozen weight's packed GEMM panels, kept across calls (float32 CPU).

Every forward packs W (m, k) into the micro-kernel's panel layout, and every backward packs it
again for dx = g·W — the same work each step, since a LoRA base weight never changes. With the
cache on, each direction is packed once (`ops.pack_weight`) and reused: a few percent of a
layer's time saved (benchmarks/RESULTS.md) for about one extra copy of W per direction packed.

The packs are valid while the weight is the same tensor, unchanged: the key is the tensor object
(a weak reference), its data pointer, shape, strides, autograd version counter and the kernels'
ISA. In-place writes that
bypass the version counter (``weight.data.add_``, writes through a NumPy view) are not seen:
call ``clear()`` after them. A weight that requires grad (full fine-tuning) or an inference tensor
(no version counter) is never cached.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from . import _C, ops

__all__ = ["RunTimeCache", "PackedWeightCache", "PackedWeightOption"]


class RunTimeCache:
    """A cache a layer or weight keeps at run time (packs, row norms, kernel handles): ``copy.deepcopy`` and
    pickling (``torch.save(model)``) give an empty one of the same class — the copy has other tensors, and
    what is kept can be neither copied nor pickled; it is rebuilt on first use."""

    __slots__ = ()

    def __deepcopy__(self, memo: dict) -> "RunTimeCache":
        return type(self)()

    def __reduce__(self) -> tuple:
        return (type(self), ())


class PackedWeightCache(RunTimeCache):
    """The forward and backward packs of one layer's weight, made on first use."""

    __slots__ = ("_key", "_weight", "_packs")

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self._weight: Optional[weakref.ref] = None  # the tensor packed (a new Parameter repacks)
        self._packs: list[Optional[ops.PackedWeight]] = [None, None]  # [forward, backward]

    def get(self, weight: torch.Tensor, fan_in_fan_out: bool, for_backward: bool) -> Optional[ops.PackedWeight]:
        """The pack of ``weight`` for this direction (made now if missing or stale), or None
        when it must not be cached: it requires grad, is not a dense float32 CPU tensor, or is an
        inference tensor (made under ``torch.inference_mode``: no version counter to watch)."""
        if (weight.requires_grad or weight.dtype != torch.float32 or not weight.is_cpu or weight.is_inference()
                or weight.layout != torch.strided):
            return None
        key = (weight.data_ptr(), weight._version, weight.shape, weight.stride(), fan_in_fan_out, _C.get_isa())
        if key != self._key or self._weight is None or self._weight() is not weight:
            self.clear()
            self._key, self._weight = key, weakref.ref(weight)
        slot = 1 if for_backward else 0
        pack = self._packs[slot]
        if pack is None:
            pack = ops.pack_weight(weight.detach(), fan_in_fan_out=fan_in_fan_out, for_backward=for_backward)
            self._packs[slot] = pack
        return pack

    def clear(self) -> None:
        """Drop both packs (the next call repacks)."""
        self._key = self._weight = None
        self._packs = [None, None]

    @property
    def nbytes(self) -> int:
        """Memory held by the packs."""
        return sum(p.nbytes for p in self._packs if p is not None)


class PackedWeightOption:
    """The opt-in packed-W cache of a lorafuse layer (`FusedLinear`), a mixin: the
    layer passes ``self._weight_cache`` to the kernels and clears it wherever it changes W itself
    (merge/unmerge). A run-time attribute: never in a state dict, empty after a copy."""

    _weight_cache: Optional[PackedWeightCache] = None

    def set_packed_weight_cache(self, enabled: bool = True) -> None:
        """Keep the frozen base weight's packed GEMM panels across calls (float32 CPU only).

        Each forward and backward then skips re-packing W — measured a few percent of a layer's
        time (benchmarks/RESULTS.md) — for about one extra copy of W per direction, made on
        first use (``packed_weight_bytes``). Results are bit-identical. W must stay frozen:
        in-place changes that bypass autograd's version counter (``weight.data.add_``, NumPy
        views) need ``set_packed_weight_cache(False)`` or a re-enable to be seen.
        """
        self.__dict__["_weight_cache"] = PackedWeightCache() if enabled else None  # not nn.Module's setattr

    @property
    def packed_weight_bytes(self) -> int:
        """Memory held by the kept panels of W (0 when the cache is off or not filled yet)."""
        return 0 if self._weight_cache is None else self._weight_cache.nbytes
