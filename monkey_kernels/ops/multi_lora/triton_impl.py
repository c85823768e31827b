"""The multi-LoRA primitives on the Triton kernels (``triton_kernels/multi_lora.py``; the ``triton`` backend).

``shrink`` and ``outer`` are the launchers themselves (no wrapper frame); ``fused_gemm`` picks, per shape, the
fused Triton GEMM or its cuBLAS twin (:mod:`.cublas_gemm`), by the measurement of :mod:`.gemm_choice`, and
calls the one it picked. Importing this module imports Triton.
"""
from __future__ import annotations

from typing import Optional

import torch

import monkey_kernels._triton.multi_lora as kernels
from monkey_kernels.ops.segments import SegmentInfo

from ..registry import register_backend
from . import gemm_choice
from .cublas_gemm import fused_lora_gemm_cublas

__all__ = ["TritonMultiLoRA", "IMPLEMENTATION", "fused_gemm"]

def fused_gemm(x: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               h: Optional[torch.Tensor], expand: Optional[torch.Tensor], scale: Optional[torch.Tensor],
               residual: Optional[torch.Tensor], segments: SegmentInfo, ranks: torch.Tensor, *, out_features: int,
               out_dtype: torch.dtype, dropout_p: float = 0.0, seed: int = 0,
               path: Optional[str] = None) -> torch.Tensor:
    """``[M, out_features]``: the contract of ``MultiLoRABackend.fused_gemm`` (shapes there), by the fused Triton
    kernel or its cuBLAS twin: ``path`` (``"triton"`` / ``"cublas"``) when given, else
    :func:`.gemm_choice.choose_gemm_path` (``MONKEY_KERNELS_GEMM``; ``auto`` times both once per shape on CUDA
    and is the Triton kernel elsewhere). The chosen function is called from here: one frame between the op and
    the kernel's launch."""
    args = (x, weight, bias, h, expand, scale, residual, segments, ranks)
    options = dict(out_features=out_features, out_dtype=out_dtype, dropout_p=dropout_p, seed=seed)
    M, N = segments.num_rows, int(out_features)
    if path is None and M > 0 and N > 0:
        path = gemm_choice.choose_gemm_path(
            segments.device, out_dtype, M, N, k=x.shape[1] if x is not None else 0,
            r_block=h.shape[1] if h is not None else 0, has_lora=h is not None,
            candidates=lambda: {"triton": lambda: kernels.fused_lora_gemm(*args, **options),
                                "cublas": lambda: fused_lora_gemm_cublas(*args, **options)},
        )
    if path == "cublas":
        return fused_lora_gemm_cublas(*args, **options)
    if path not in (None, "triton"):
        raise ValueError(f"path must be None, 'triton' or 'cublas', got {path!r}")
    return kernels.fused_lora_gemm(*args, **options)


class TritonMultiLoRA:
    name = "triton"
    outer_zeroes_unowned = False
    supports_merged_weights = False
    shrink = staticmethod(kernels.segmented_shrink)
    fused_gemm = staticmethod(fused_gemm)
    outer = staticmethod(kernels.segmented_outer)
    dropout_keep_mask = staticmethod(kernels.dropout_keep_mask)


IMPLEMENTATION = register_backend("multi_lora", "triton", TritonMultiLoRA)
