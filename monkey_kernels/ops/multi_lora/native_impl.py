"""The multi-LoRA primitives on the C++ ops of the native extension (CPU tensors; the ``native`` backend).

``torch.ops.monkey_kernels_native.multi_lora_*`` (``csrc/multi_lora_cpu.cpp``): row chunks in parallel
(``at::parallel_for``), ATen GEMMs inside, bias / residual fused; their fake implementations are registered
here, when this module is imported (after :mod:`monkey_kernels._native` loaded the library).
Dropout masks are the torch backend's (one mask per seed on both CPU backends).
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _native
from ..checks import accumulation_dtype
from .torch_impl import torch_keep_mask

__all__ = ["NativeMultiLoRA", "IMPLEMENTATION"]

_NS = _native.OP_NAMESPACE


# ---------------------------------------------------------------------------------------------------------
def _optional_keep(seed: int, rows: int, cols: int, p: float, device) -> Optional[torch.Tensor]:
    # The torch backend's masks: a seed draws the same mask on both CPU backends.
    return torch_keep_mask(seed, rows, cols, p, device) if p > 0.0 else None


class NativeMultiLoRA:
    """The primitives of :class:`~.torch_impl.TorchMultiLoRA`, run by the C++ ops ``torch.ops.monkey_kernels_native.*``
    (CPU tensors; any strides; float32/64, float16, bfloat16 with fp32 accumulation)."""

    name = "native"
    dropout_keep_mask = staticmethod(torch_keep_mask)

    @staticmethod
    def shrink(x, weight, segments, ranks, r_block, dropout_p=0.0, seed=0):
        """fp32 (fp64 for fp64 ``x``) ``[M, r_block]``: ``drop(x) @ weight[a][:rank]^T`` per row, zeros past
        the rank and on base-only rows. ``x [M, K]``, ``weight [A, R, K]`` (any strides)."""
        keep = _optional_keep(seed, x.shape[0], x.shape[1], dropout_p, x.device)
        return _native.ops().multi_lora_shrink(
            x, weight, segments.seg_indptr, segments.adapter_ids, ranks, int(r_block), keep, float(dropout_p))

    @staticmethod
    def fused_gemm(x, weight, bias, h, expand, scale, residual, segments, ranks, *,
                   out_features, out_dtype, dropout_p=0.0, seed=0):
        """``[M, out_features]`` of ``out_dtype``: ``x @ weight^T + bias + drop(scale[a] * h[:, :R] @
        expand[a]^T) + residual``; any of them may be ``None`` (see ``torch_impl``)."""
        M = segments.num_rows
        keep = _optional_keep(seed, M, int(out_features), dropout_p, segments.device) if h is not None else None
        return _native.ops().multi_lora_fused_gemm(
            x, weight, bias, h, expand, scale, residual, segments.seg_indptr, segments.adapter_ids, ranks,
            M, int(out_features), out_dtype, keep, float(dropout_p))

    # Mean segment length from which merged_linear pays off: shorter segments mean one BLAS call per few
    # rows, where the row-chunked fused_gemm keeps every thread busy with one call per thread.
    merge_min_segment_rows = 32

    @classmethod
    def merge_worthwhile(cls, segments) -> bool:
        return segments.num_rows >= cls.merge_min_segment_rows * max(segments.num_segments, 1)

    @staticmethod
    def merged_linear(x, weight, bias, down, up, scale, residual, segments, ranks, *, out_dtype):
        """``[M, N]``: ``x @ (weight + scale[a] * up[a][:, :rank] @ down[a][:rank])^T + bias + residual`` per row
        (no dropout, the LoRA reads ``x``): an adapter with enough rows gets its merged weight and ONE GEMM
        (``csrc/multi_lora_cpu.cpp``, ``multi_lora_merged_gemm``). ``x [M, K]``, ``weight [N, K]``,
        ``down [A, R, K]``, ``up [A, N, R]`` (any strides)."""
        return _native.ops().multi_lora_merged_gemm(
            x, weight, bias, down, up, scale, residual, segments.seg_indptr, segments.adapter_ids, ranks, out_dtype)

    @staticmethod
    def outer(x, y, segments, out, scale=None, dropout_p=0.0, seed=0):
        """Writes ``out[a] = (scale[a] *) sum over rows of a of drop(x)^T @ y[:, :R]`` into ``out [A, N, R]``
        (any strides); deterministic (a fixed work split and summation order)."""
        num_adapters, _, R = out.shape
        keep = _optional_keep(seed, x.shape[0], x.shape[1], dropout_p, x.device)
        result = _native.ops().multi_lora_outer(
            x, y, segments.seg_indptr, segments.adapter_ids, scale, keep, float(dropout_p), num_adapters, R,
            out.dtype)
        out.copy_(result)
        return out


def _register_fakes() -> None:
    """Fake (meta) implementations of the C++ ops, for torch.compile; registered once the library is loaded."""

    @torch.library.register_fake(f"{_NS}::multi_lora_shrink")
    def _shrink_fake(x, weight, seg_indptr, adapter_ids, ranks, r_block, keep, dropout_p):
        return x.new_empty((x.shape[0], r_block), dtype=accumulation_dtype(x.dtype))

    @torch.library.register_fake(f"{_NS}::multi_lora_fused_gemm")
    def _fused_gemm_fake(x, weight, bias, h, expand, scale, residual, seg_indptr, adapter_ids, ranks, num_rows,
                         out_features, out_dtype, lora_keep, lora_dropout_p):
        return seg_indptr.new_empty((num_rows, out_features), dtype=out_dtype)

    @torch.library.register_fake(f"{_NS}::multi_lora_merged_gemm")
    def _merged_gemm_fake(x, weight, bias, down, up, scale, residual, seg_indptr, adapter_ids, ranks, out_dtype):
        return x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype)

    @torch.library.register_fake(f"{_NS}::multi_lora_outer")
    def _outer_fake(x, y, seg_indptr, adapter_ids, scale, keep, dropout_p, num_adapters, rank, out_dtype):
        return x.new_empty((num_adapters, x.shape[1], rank), dtype=out_dtype)


IMPLEMENTATION = NativeMultiLoRA


if _native.available():  # importing this module loads the extension (it is imported when native is chosen)
    _register_fakes()
