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

__all__ = ["PackedWeightCache"]


class PackedWeightCache:
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

    def __deepcopy__(self, memo: dict) -> "PackedWeightCache":
        """A copied layer gets an empty cache (its weight is another tensor; packs are not copyable)."""
        return PackedWeightCache()

    def __reduce__(self) -> tuple:
        """Pickled (``torch.save(model)``) as an empty cache: packs are rebuilt on first use."""
        return (PackedWeightCache, ())

    def clear(self) -> None:
        """Drop both packs (the next call repacks)."""
        self._key = self._weight = None
        self._packs = [None, None]

    @property
    def nbytes(self) -> int:
        """Memory held by the packs."""
        return sum(p.nbytes for p in self._packs if p is not None)
