"""Argument checks and dtype rules shared by the public ops: each failure is a ``ValueError`` that names the
argument; one accumulation-dtype rule for every backend."""
from __future__ import annotations

from typing import Optional

import torch

#: Float dtypes the ops accept (float64 on the CPU backends only).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: Float dtypes the Triton kernels run.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, tensor, dims: Optional[int] = None) -> None:
    """``tensor`` is a ``torch.Tensor`` (with ``dims`` dimensions when given)."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if dims is not None and tensor.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(tensor.shape)}")


def check_device(name: str, tensor: torch.Tensor, device: torch.device, reference: str) -> None:
    """``tensor`` lives on ``device``, the device of the argument named ``reference``."""
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device} (the device of {reference})")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the ops accumulate (GEMMs, H, the SLP box projection) for inputs / outputs of ``dtype``: float64 for
    float64 (the CPU backends), float32 for everything else (half types round once, at the end)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype, reference: str) -> None:
    """``tensor`` has ``dtype``, the dtype of the argument named ``reference``."""
    if tensor.dtype != dtype:
        raise ValueError(f"{name} has dtype {tensor.dtype}, expected {dtype} (the dtype of {reference})")
