"""The multi-LoRA primitives on the C++ ops of the native extension (CPU tensors; the ``native`` backend).

``torch.ops.monkey_kernels_native.multi_lora_*`` (``csrc/multi_lora_cpu.cpp``): row chunks in parallel
(``at::parallel_for``), the base GEMM by BLAS or by the register-tiled kernel where that measured faster on the
machine (``MONKEY_KERNELS_CPU_GEMM=auto|blas|tiled``), every rank-sized GEMM (shrink, expand, outer
products, merges) by the register-tiled kernel of ``csrc/lowrank_gemm.h`` on raw pointers (AVX-512, AVX2 or
portable, picked at run time; ``MONKEY_KERNELS_LOWRANK_ISA`` caps it), bias / residual fused; their fake
implementations are registered here, when this module is imported (after :mod:`monkey_kernels._native`
loaded the library).
Dropout masks are counter-based (``csrc/dropout_hash.h``): the C++ ops compute ``keep(seed, row, col)`` where
they read an element, so the backward recomputes the forward's mask from the seed and no mask is drawn
ahead or stored. :func:`native_keep_mask` materialises one (for references and tests).
"""
from __future__ import annotations

import torch

from ... import _native
from ..checks import accumulation_dtype
from ..registry import register_backend

__all__ = ["NativeMultiLoRA", "IMPLEMENTATION", "native_keep_mask"]

_NS = _native.OP_NAMESPACE


# ---------------------------------------------------------------------------------------------------------
def native_keep_mask(seed: int, rows: int, cols: int, p: float, device) -> torch.Tensor:
    """The bool keep-mask ``[rows, cols]`` the native ops apply for ``(seed, p)`` (a CPU tensor)."""
    if torch.device(device).type != "cpu":
        raise ValueError(f"the native backend runs on CPU tensors; got device {device}")
    return _native.ops().multi_lora_keep_mask(int(seed), int(rows), int(cols), float(p))


class NativeMultiLoRA:
    """The primitives of :class:`~.torch_impl.TorchMultiLoRA`, run by the C++ ops ``torch.ops.monkey_kernels_native.*``
    (CPU tensors; any strides; float32/64, float16, bfloat16 with fp32 accumulation)."""

    name = "native"
    #: ``outer(..., ranks=)`` writes exact zeros past each adapter's rank and for adapters without rows
    outer_zeroes_unowned = True
    #: ``merged_linear``: each adapter's merged weight in one GEMM (see ``merge_worthwhile``)
    supports_merged_weights = True
    dropout_keep_mask = staticmethod(native_keep_mask)

    @staticmethod
    def shrink(x, weight, segments, ranks, r_block, dropout_p=0.0, seed=0):
        """fp32 (fp64 for fp64 ``x``) ``[M, r_block]``: ``drop(x) @ weight[a][:rank]^T`` per row, zeros past
        the rank and on base-only rows. ``x [M, K]``, ``weight [A, R, K]`` (any strides)."""
        return _native.ops().multi_lora_shrink(
            x, weight, segments.seg_indptr, segments.adapter_ids, ranks, int(r_block), int(seed), float(dropout_p))

    @staticmethod
    def fused_gemm(x, weight, bias, h, expand, scale, residual, segments, ranks, *,
                   out_features, out_dtype, dropout_p=0.0, seed=0):
        """``[M, out_features]`` of ``out_dtype``: ``x @ weight^T + bias + drop(scale[a] * h[:, :R] @
        expand[a]^T) + residual``; any of them may be ``None`` (see ``torch_impl``)."""
        return _native.ops().multi_lora_fused_gemm(
            x, weight, bias, h, expand, scale, residual, segments.seg_indptr, segments.adapter_ids, ranks,
            segments.num_rows, int(out_features), out_dtype, int(seed), float(dropout_p))

    # Mean segment length from which merged_linear pays off: shorter segments mean one BLAS call per few
    # rows, where the row-chunked fused_gemm keeps every thread busy with one call per thread.
    merge_min_segment_rows = 32

    @classmethod
    def merge_worthwhile(cls, segments) -> bool:
        """Merged weights for long segments, except Partial LoRA's layout (:meth:`one_adapter_among_base_rows`)."""
        if segments.num_rows < cls.merge_min_segment_rows * max(segments.num_segments, 1):
            return False
        return not cls.one_adapter_among_base_rows(segments)

    @staticmethod
    def one_adapter_among_base_rows(segments) -> bool:
        """Whether the rows that own an adapter all own the same one and base-only rows lie between or around
        them: InternLM-XComposer's PLoRA (image runs, text runs without LoRA). There the merged path runs one BLAS
        call per run (text and image alternate) and saves the LoRA of a single adapter only; the one-call-per-
        thread shrink + fused GEMM measured 2-7 % faster on the five-linear PLoRA chain (CPU, fp32, 1 thread,
        widths / 8, interleaved A/B; ``README.md``, PLoRA benchmark) and as fast or faster (up to 1.2x) on
        Monkey's one-tile-plus-global-view layout, the other layout this matches. Monkey's multi-tile layouts (an
        adapter per tile) and a single adapter over every row keep the merged path. The metadata is on the CPU
        here (the native backend's tensors): reading it costs a few small tensor ops, no sync."""
        indptr, ids = segments.seg_indptr, segments.adapter_ids
        owned = ids[indptr[1:] > indptr[:-1]]  # segments with rows (the static bound's empty tail drops out)
        adapters = owned[owned >= 0]
        if adapters.numel() == 0 or adapters.numel() == owned.numel():
            return False
        return bool((adapters == adapters[0]).all())

    @staticmethod
    def merged_linear(x, weight, bias, down, up, scale, residual, segments, ranks, *, out_dtype, r_block=0,
                      outer_y=None):
        """``(out, shrink, outer)``: ``out [M, N] = x @ (weight + scale[a] * up[a][:, :rank] @ down[a][:rank])^T +
        bias + residual`` per row (no dropout, the LoRA reads ``x``): an adapter with enough rows gets its merged
        weight and ONE GEMM (``csrc/multi_lora_cpu.cpp``, ``multi_lora_merged_gemm``). ``x [M, K]``,
        ``weight [N, K]``, ``down [A, R, K]``, ``up [A, N, R]`` (any strides).

        In the same pass over ``x``, segment by segment while it is in cache: with ``r_block > 0``,
        ``shrink [M, r_block]`` (fp32; fp64 for fp64) ``= x @ down[a][:rank]^T`` (the forward's ``H``, the
        backward's ``G``); with ``outer_y [M, >= R]``, ``outer [A, K, R]`` (dtype of ``x``) ``= scale[a] *
        sum over rows of a of x^T @ outer_y`` (the backward's ``dB`` from ``H``). Both are exactly 0 past each
        rank, on base-only rows and for adapters without rows; unrequested, they come back empty."""
        return _native.ops().multi_lora_merged_gemm(
            x, weight, bias, down, up, scale, residual, segments.seg_indptr, segments.adapter_ids, ranks, out_dtype,
            int(r_block), outer_y)

    @staticmethod
    def outer(x, y, segments, out, scale=None, dropout_p=0.0, seed=0, ranks=None):
        """Writes ``out[a] = (scale[a] *) sum over rows of a of drop(x)^T @ y[:, :R]`` into ``out [A, N, R]``
        (any strides); deterministic (a fixed work split and summation order). With ``ranks``, columns
        ``r >= ranks[a]`` and adapters that own no rows are exactly 0 (never computed)."""
        num_adapters, _, R = out.shape
        result = _native.ops().multi_lora_outer(
            x, y, segments.seg_indptr, segments.adapter_ids, scale, int(seed), float(dropout_p), num_adapters, R,
            out.dtype, ranks)
        out.copy_(result)
        return out


def _register_fakes() -> None:
    """Fake (meta) implementations of the C++ ops, for torch.compile; registered once the library is loaded."""

    @torch.library.register_fake(f"{_NS}::multi_lora_shrink")
    def _shrink_fake(x, weight, seg_indptr, adapter_ids, ranks, r_block, seed, dropout_p):
        return x.new_empty((x.shape[0], r_block), dtype=accumulation_dtype(x.dtype))

    @torch.library.register_fake(f"{_NS}::multi_lora_fused_gemm")
    def _fused_gemm_fake(x, weight, bias, h, expand, scale, residual, seg_indptr, adapter_ids, ranks, num_rows,
                         out_features, out_dtype, seed, dropout_p):
        return seg_indptr.new_empty((num_rows, out_features), dtype=out_dtype)

    @torch.library.register_fake(f"{_NS}::multi_lora_merged_gemm")
    def _merged_gemm_fake(x, weight, bias, down, up, scale, residual, seg_indptr, adapter_ids, ranks, out_dtype,
                          r_block=0, outer_y=None):
        out = x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype)
        shrink = x.new_empty((x.shape[0], r_block), dtype=accumulation_dtype(out_dtype))
        outer = x.new_empty((down.shape[0] if outer_y is not None else 0, x.shape[1], down.shape[1]))
        return out, shrink, outer

    @torch.library.register_fake(f"{_NS}::multi_lora_outer")
    def _outer_fake(x, y, seg_indptr, adapter_ids, scale, seed, dropout_p, num_adapters, rank, out_dtype,
                    ranks=None):
        return x.new_empty((num_adapters, x.shape[1], rank), dtype=out_dtype)

    @torch.library.register_fake(f"{_NS}::multi_lora_keep_mask")
    def _keep_mask_fake(seed, rows, cols, p):
        return torch.empty((rows, cols), dtype=torch.bool, device="meta")


IMPLEMENTATION = register_backend("multi_lora", "native", NativeMultiLoRA)


if _native.available():  # importing this module loads the extension (it is imported when native is chosen)
    _register_fakes()
