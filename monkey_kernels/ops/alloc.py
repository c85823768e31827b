"""Output allocation for the launchers, with an optional NaN poison for tests and debugging.

With poisoning on (``MONKEY_KERNELS_POISON=1`` or :func:`set_poison`), every float buffer that a kernel
is meant to overwrite starts as NaN, so an element the kernel forgets to write shows up in the result.
"""
from __future__ import annotations

import os

import torch

_poison = os.environ.get("MONKEY_KERNELS_POISON", "0") not in ("", "0")


def set_poison(enabled: bool) -> bool:
    """Turn NaN poisoning of fresh outputs on or off; returns the previous setting."""
    global _poison
    previous, _poison = _poison, bool(enabled)
    return previous


def empty(shape, *, device, dtype) -> torch.Tensor:
    """``torch.empty``, or a NaN-filled tensor while poisoning is on."""
    if _poison and dtype.is_floating_point:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)
