"""When a compiled lorafuse model fails: whether stock PEFT's own model fails the same way on this torch.

A lorafuse model is a `peft.PeftModel`: its forward is PEFT's. Where torch cannot trace PEFT's forward with
fullgraph=True (torch 2.6 and 2.7 with peft 0.21 and transformers 5.24: Dynamo breaks the graph inside the
context manager PeftModel's forward enters, or in transformers' code), lorafuse's model cannot either, and
the compiled-model tests skip naming torch's error. Where stock PEFT compiles, lorafuse's failure stands.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import pytest
import torch
import torch._dynamo


@contextmanager
def unless_stock_peft_fails_too(make_stock: Callable[[], torch.nn.Module], **inputs: Any) -> Iterator[None]:
    """Run the block (lorafuse's compiled model); if Dynamo refuses it, compile ``make_stock()`` (the same
    model on stock PEFT, in the same train/eval mode) with fullgraph=True and call it on ``inputs``: the block's
    error is re-raised when that works, and the test skips when stock PEFT is refused as well."""
    try:
        yield
    except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.InternalTorchDynamoError) as ours:
        torch._dynamo.reset()
        try:
            torch.compile(make_stock(), fullgraph=True)(**inputs)
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.InternalTorchDynamoError) as theirs:
            pytest.skip(f"torch {torch.__version__} cannot compile stock PEFT's model with fullgraph=True either: "
                        f"{type(theirs).__name__}: {str(theirs).strip().splitlines()[0]}")
        finally:
            torch._dynamo.reset()
        raise ours
