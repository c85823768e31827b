"""The multi-LoRA primitives on the Triton kernels (``triton_kernels/multi_lora.py``; the ``triton`` backend).

The launchers are bound directly (no wrapper frame between the op and the launch): ``shrink`` =
``segmented_shrink``, ``outer`` = ``segmented_outer``, ``fused_gemm`` = ``fused_lora_gemm`` with
:func:`cublas_if_chosen` as its ``alternative``: the launcher asks it first, and it returns the cuBLAS twin's output
(:mod:`.cublas_gemm`) when the per-shape measurement of :mod:`.gemm_choice` picked cuBLAS, else ``None`` (the Triton
kernel runs). Importing this module imports Triton.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

import monkey_kernels._triton.multi_lora as kernels
from monkey_kernels.ops.segments import SegmentInfo

from ..registry import register_backend
from . import gemm_choice
from .cublas_gemm import fused_lora_gemm_cublas

__all__ = ["TritonMultiLoRA", "IMPLEMENTATION", "cublas_if_chosen"]


def cublas_if_chosen(x: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     h: Optional[torch.Tensor], expand: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                     residual: Optional[torch.Tensor], segments: SegmentInfo, ranks: torch.Tensor, *,
                     out_features: int, out_dtype: torch.dtype, dropout_p: float = 0.0, seed: int = 0,
                     path: Optional[str] = None) -> Optional[torch.Tensor]:
    """The per-shape path of the triton backend's fused GEMM (arguments and result as
    ``MultiLoRABackend.fused_gemm``): the cuBLAS twin's ``[M, out_features]`` output when the path is
    ``"cublas"``, ``None`` when it is ``"triton"`` (the caller, the Triton launcher, then runs its kernel).

    The path: ``path`` when given, else :func:`.gemm_choice.choose_gemm_path` (``MONKEY_KERNELS_GEMM``; ``auto``
    times both once per shape on CUDA and is the Triton kernel elsewhere)."""
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
    return None


class TritonMultiLoRA:
    name = "triton"
    outer_zeroes_unowned = False
    supports_merged_weights = False
    shrink = staticmethod(kernels.segmented_shrink)
    # a partial, not a wrapper function: no Python frame between the op and the launch
    fused_gemm = staticmethod(functools.partial(kernels.fused_lora_gemm, alternative=cublas_if_chosen))
    outer = staticmethod(kernels.segmented_outer)
    dropout_keep_mask = staticmethod(kernels.dropout_keep_mask)


IMPLEMENTATION = register_backend("multi_lora", "triton", TritonMultiLoRA)
