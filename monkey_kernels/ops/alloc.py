"""Output allocation for the launchers, with an optional NaN poison for tests and debugging.

With poisoning on (``MONKEY_KERNELS_POISON=1``, read at every allocation, or :func:`set_poison`), every float
buffer that a kernel is meant to overwrite starts as NaN, so an element the kernel forgets to write shows up in
the result. The native C++ ops follow the same switch (:mod:`monkey_kernels._native` passes
:func:`poison_enabled` to the extension before each of their calls).
"""
from __future__ import annotations

from typing import Optional

import torch

from monkey_kernels import settings

__all__ = ["empty", "poison_enabled", "set_poison"]

_forced: Optional[bool] = None  # set_poison's override of the environment variable


def poison_enabled() -> bool:
    """Whether fresh outputs start as NaN now: :func:`set_poison`'s choice, else ``MONKEY_KERNELS_POISON``."""
    forced = _forced
    return settings.POISON.get() if forced is None else forced


def set_poison(enabled: Optional[bool]) -> Optional[bool]:
    """Turn NaN poisoning of fresh outputs on or off whatever the environment says (``None``: follow
    ``MONKEY_KERNELS_POISON`` again); returns the previous override (``None`` when there was none), so a caller
    can restore it."""
    global _forced
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"enabled must be True, False or None, got {enabled!r}")
    previous, _forced = _forced, enabled
    return previous


def empty(shape, *, device, dtype) -> torch.Tensor:
    """``torch.empty``, or a NaN-filled tensor while poisoning is on."""
    if dtype.is_floating_point and poison_enabled():
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)
