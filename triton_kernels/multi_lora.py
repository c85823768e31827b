"""Segmented multi-LoRA kernels (Triton) and their host launchers.

Notation (rows are the flattened tokens, ``M`` of them; segment ``g`` uses adapter ``a = adapter_ids[g]``,
``a = -1`` meaning base weights only):

    H[rows of g]  = drop(X[rows of g]) @ A[a]^T                      (shrink,   H fp32 [M, R_BLOCK])
    Y             = X @ W^T + bias + s[a] * H @ B[a]^T (+ residual)  (fused GEMM: base + expand epilogue)
    OUT[a]        = s[a] * sum_{rows of a} drop(X)^T @ Hrows          (grouped outer product, for dA / dB)

The three kernels serve both directions of the multi-LoRA linear (see
``monkey_kernels.ops.multi_lora.op``): every weight is passed as a (possibly transposed)
strided view, so ``dY @ W`` and ``dH @ A[a]`` reuse the fused GEMM, and ``dY @ B[a]`` reuses the shrink.

Design (a) of the core issue: a shrink kernel, then the base GEMM with the expand in its epilogue. The
LoRA update costs one extra read of the LoRA input and no extra pass over ``Y``. A row tile may straddle
segments (ragged segments of any length); the kernels loop over the segments a tile touches and mask rows
by ``row_segment``, so no host-side tile map (and no host synchronisation) is needed. Each segment's product
reaches its own rows (and its adapter's rank) by selection, never through a product with zeros standing in
for other rows or for the padding past the rank: 0 * NaN = NaN, so a NaN / inf reaches exactly the entries
it reaches in the per-segment loop.

Dropout keeps element ``(row, col)`` of the LoRA input iff ``tl.rand(seed, row * K + col) >= p``: a pure
function of the seed, regenerated in backward, never stored.

Ranks up to 256 (Partial LoRA's): no kernel holds a whole ``R_BLOCK``-wide tile. The rank is cut into chunks of
``R_CHUNK = rank_chunk(R_BLOCK, kernel)`` columns (64; 32 in the outer product): the shrink and the outer product
give each chunk its own program (a grid axis; the shrink's chunks past an adapter's rank store zeros without a pass
over ``K``), the fused GEMM's epilogue loops over the chunks of each segment's rank. A rank block within one chunk
compiles to the unchunked kernels (no loop).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from monkey_kernels.ops import alloc
from monkey_kernels.ops.layout import rank_block
from monkey_kernels.ops.segments import SegmentInfo

from .env import install_interpreter_compat, interpreter_active

install_interpreter_compat()

__all__ = [
    "interpreter_active",
    "rank_block",
    "segmented_shrink",
    "fused_lora_gemm",
    "segmented_outer",
    "dropout_keep_mask",
]



#: The widest rank chunk each kernel holds at once (registers: its [BLOCK, R_CHUNK] fp32 accumulator or H tile;
#: shared memory: the chunk's operand tiles), chosen on the sm_90 compile report (README): the shrink and the GEMM
#: epilogue take 64 columns at a time, the grouped outer product 32 (wider chunks spill there, 64 in bf16, 128 in
#: fp32 with dropout).
RANK_CHUNK = {"shrink": 64, "gemm": 64, "outer": 32}


def rank_chunk(r_block: int, kernel: str) -> int:
    """The rank chunk of ``kernel`` (``"shrink"``, ``"gemm"``, ``"outer"``) on an ``r_block``-wide ``H`` (a
    power of two, at least 16)."""
    return min(int(r_block), RANK_CHUNK[kernel])


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow PyTorch's own matmul setting; fp32 LoRA intermediates of half inputs use tf32,
    # which keeps 10 mantissa bits (more than bf16's 7) at tensor-core speed.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _interpreter_upcast(dtype: torch.dtype) -> bool:
    # Triton 3.9's interpreter keeps bf16 as raw uint16 bits in numpy and multiplies those bits in
    # tl.dot; bf16 operands are widened to fp32 there (exact: a bf16 product fits in fp32). Compiled
    # kernels keep bf16 operands for the tensor cores.
    return interpreter_active() and dtype == torch.bfloat16


@triton.jit
def _dot_operand(x, UPCAST: tl.constexpr):
    if UPCAST:
        return x.to(tl.float32)
    return x


@triton.jit
def _dropout_keep(seed, rows, cols, row_len, p):
    """Keep-mask ``[len(rows), len(cols)]`` of inverted dropout over a logical ``[*, row_len]`` matrix."""
    offsets = (rows.to(tl.int64)[:, None] * row_len + cols[None, :]).to(tl.uint32)
    return tl.rand(seed, offsets) >= p


# ---------------------------------------------------------------------------------------------------------
# Shrink: H[M, R_BLOCK] (fp32) = drop(X)[M, K] @ Wt[a]^T per segment, Wt[a] of shape [R, K]; H[:, r >= rank[a]]
# and the rows of base-only segments are exactly 0, whatever X and Wt hold
# ---------------------------------------------------------------------------------------------------------
def _shrink_configs():
    if interpreter_active():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bk, w, s in [(64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (32, 128, 4, 4)]
    ]


@triton.autotune(configs=_shrink_configs(), key=["K", "R_BLOCK", "DROPOUT"], cache_results=True)
@triton.jit
def _segmented_shrink_kernel(
    x_ptr, w_ptr, out_ptr, row_segment_ptr, adapter_ids_ptr, ranks_ptr,
    M, K, seed, dropout_p,
    stride_xm, stride_xk, stride_wa, stride_wr, stride_wk, stride_om,
    R_BLOCK: tl.constexpr, R_CHUNK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Each segment of the tile gets its own product and writes only its own rows. Dotting other segments'
    # rows as zeros would not do: 0 * NaN (a NaN of this adapter's A) is NaN, and leaks into their rows.
    # Program (row tile, rank chunk): columns [r0, r0 + R_CHUNK) of H for the tile's rows.
    pid = tl.program_id(0)
    r0 = tl.program_id(1) * R_CHUNK
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    row_seg = tl.load(row_segment_ptr + rows, mask=row_ok, other=-1)
    seg_first = tl.min(tl.where(row_ok, row_seg, 2147483647), axis=0)
    seg_last = tl.max(row_seg, axis=0)
    r = r0 + tl.arange(0, R_CHUNK)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + r[None, :]
    # Segments outer, K inner: a single-segment tile (the common case) makes one pass over K, accumulating
    # straight into its tl.dot accumulator; a straddling tile makes one pass per segment, each loading only
    # that segment's rows of X.
    for g in range(seg_first, seg_last + 1):
        in_seg = row_seg == g  # implies row_ok (g >= 0, rows past M read -1)
        adapter = tl.load(adapter_ids_ptr + g)
        rank = tl.load(ranks_ptr + tl.maximum(adapter, 0))
        h = tl.zeros((BLOCK_M, R_CHUNK), dtype=tl.float32)
        # base-only segments (and segments with no row here: zero-length ones), and chunks past the adapter's
        # rank, store zeros with no pass over K
        if (adapter >= 0) & (r0 < rank) & (tl.max(in_seg.to(tl.int32), axis=0) > 0):
            w_base = w_ptr + adapter.to(tl.int64) * stride_wa + r[None, :] * stride_wr
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                x = tl.load(x_rows + ks[None, :] * stride_xk, mask=in_seg[:, None] & k_ok[None, :], other=0.0)
                if DROPOUT:
                    # masked exactly in x's dtype; 1/(1-p) goes on the fp32 accumulator below (rounding the
                    # scaled input back to bf16 biased every kept element the same way, and dscale sums them)
                    keep = _dropout_keep(seed, rows, ks, K, dropout_p)
                    x = tl.where(keep, x, tl.zeros_like(x))
                w = tl.load(w_base + ks[:, None] * stride_wk, mask=(r[None, :] < rank) & k_ok[:, None], other=0.0)
                h = tl.dot(_dot_operand(x, UPCAST), _dot_operand(w, UPCAST), h, input_precision=PRECISION)
            # Past the rank, A's zero padding times an inf of X is NaN: those columns are selected to 0, not
            # computed (the fused GEMM would spread such a NaN over the whole output row).
            h = tl.where(r[None, :] < rank, h, 0.0)
            if DROPOUT:
                h = h / (1.0 - dropout_p)
        tl.store(out_ptrs, h, mask=in_seg[:, None])


# ---------------------------------------------------------------------------------------------------------
# Fused GEMM: OUT[M, N] = X[M, K] @ W[N, K]^T + bias[N] + drop(s[a] * H[rows of g, :rank] @ E[a][N, :rank]^T) + RES
# (the LoRA term of each row from its own segment g only, rank = rank[a]; nothing for base-only segments)
# ---------------------------------------------------------------------------------------------------------
def _gemm_configs():
    if interpreter_active():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 256, 64, 8, 3),
            (256, 128, 64, 8, 3),
            (128, 128, 64, 8, 4),
            (128, 128, 64, 4, 4),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (64, 64, 64, 4, 4),
            (128, 128, 32, 4, 4),
        ]
    ]


_SHARED_MEMORY_BUDGET = 200 * 1024  # under the 227 KB a Hopper block may use, with room for the epilogue


def _gemm_shared_bytes(config: triton.Config, element_bytes: int) -> int:
    kwargs = config.kwargs
    tiles = kwargs["BLOCK_M"] * kwargs["BLOCK_K"] + kwargs["BLOCK_K"] * kwargs["BLOCK_N"]
    return config.num_stages * tiles * element_bytes


def _prune_gemm_configs(configs, named_args, **kwargs):
    """Drop configs whose pipelined tiles cannot fit in shared memory for this dtype (fp32 tiles are twice
    the bytes of bf16 ones), so autotuning never spends time on launches that must fail."""
    element_bytes = named_args["x_ptr"].element_size()
    fitting = [c for c in configs if _gemm_shared_bytes(c, element_bytes) <= _SHARED_MEMORY_BUDGET]
    return fitting or [min(configs, key=lambda c: _gemm_shared_bytes(c, element_bytes))]


@triton.jit
def _expand_rank_chunk(lora, h_ptr, e_ptr, scale_ptr, rows64, cols, col_ok, in_seg, single_segment, adapter, rank, r,
                       stride_hm, stride_ea, stride_en, stride_er, HAS_SCALE: tl.constexpr,
                       LORA_PRECISION: tl.constexpr):
    """``lora`` plus segment ``in_seg``'s term ``s[a] * H[rows, r] @ E[a][cols, r]^T`` over the rank columns ``r``
    (one chunk; columns at or past ``rank`` count nothing), the other rows of the tile untouched."""
    in_rank = r < rank
    # only this segment's rows and the adapter's rank: whatever H holds elsewhere is never read
    h = tl.load(h_ptr + rows64[:, None] * stride_hm + r[None, :], mask=in_seg[:, None] & in_rank[None, :], other=0.0)
    if HAS_SCALE:
        # selected, not multiplied: 0 * an infinite scale past the rank would be NaN
        h = tl.where(in_rank[None, :], h * tl.load(scale_ptr + adapter).to(tl.float32), 0.0)
    e = tl.load(
        e_ptr + adapter.to(tl.int64) * stride_ea + cols[None, :] * stride_en + r[:, None] * stride_er,
        mask=in_rank[:, None] & col_ok[None, :],
        other=0.0,
    )
    if single_segment:
        lora = tl.dot(h, e.to(tl.float32), lora, input_precision=LORA_PRECISION)
    else:
        lora = tl.where(in_seg[:, None], tl.dot(h, e.to(tl.float32), lora, input_precision=LORA_PRECISION), lora)
    return lora


@triton.autotune(
    configs=_gemm_configs(),
    key=["N", "K", "R_BLOCK", "HAS_BASE", "HAS_LORA", "HAS_RESIDUAL", "LORA_DROPOUT"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
    cache_results=True,
)
@triton.jit
def _fused_lora_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, e_ptr, scale_ptr, residual_ptr, out_ptr,
    row_segment_ptr, adapter_ids_ptr, ranks_ptr,
    M, N, K, seed, dropout_p,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_hm, stride_ea, stride_en, stride_er,
    stride_resm, stride_resn, stride_om, stride_on,
    R_BLOCK: tl.constexpr, R_CHUNK: tl.constexpr,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, LORA_DROPOUT: tl.constexpr,
    BASE_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row tiles share each weight column tile while it sits in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    group_id = pid // pids_per_group
    first_pid_m = group_id * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % pids_per_group) % group_rows)
    pid_n = (pid % pids_per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if HAS_BASE:
        # Out-of-range rows/columns are wrapped into range instead of masked: their results are never
        # stored, and the K-loop then needs only a K mask (fewer live predicate registers).
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + (rows % M).to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk
        w_ptrs = w_ptr + (cols % N).to(tl.int64)[None, :] * stride_wn + ks[:, None] * stride_wk
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptrs, mask=ks[None, :] < K - k0, other=0.0)
            w = tl.load(w_ptrs, mask=ks[:, None] < K - k0, other=0.0)
            acc = tl.dot(_dot_operand(x, UPCAST), _dot_operand(w, UPCAST), acc, input_precision=BASE_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

    if HAS_LORA:
        row_seg = tl.load(row_segment_ptr + rows, mask=row_ok, other=-1)
        seg_first = tl.min(tl.where(row_ok, row_seg, 2147483647), axis=0)
        seg_last = tl.max(row_seg, axis=0)
        r_chunk = tl.arange(0, R_CHUNK)
        # Without dropout the expand accumulates straight into the GEMM accumulator: a second
        # [BLOCK_M, BLOCK_N] fp32 accumulator would double the registers of the largest live tile.
        if LORA_DROPOUT:
            lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            lora = acc
        # In a tile that straddles segments, the rows of h outside segment g are zeros, and 0 * a NaN/inf of
        # E[a] (or of an infinite scale) is NaN: each segment's product is selected into its own rows. A
        # single-segment tile has no other rows to protect (rows past M are never stored) and accumulates
        # straight into the accumulator, without the second [BLOCK_M, BLOCK_N] tile a selection keeps live.
        single_segment = seg_first == seg_last
        for g in range(seg_first, seg_last + 1):
            adapter = tl.load(adapter_ids_ptr + g)
            in_seg = (row_seg == g) & row_ok
            if (adapter >= 0) & (tl.max(in_seg.to(tl.int32), axis=0) > 0):
                rank = tl.load(ranks_ptr + adapter)
                # the adapter's rank in chunks of R_CHUNK columns: up to rank 64 one chunk and no loop (the
                # code of the unchunked kernel), past it a loop over the chunks the rank covers
                if R_BLOCK <= R_CHUNK:
                    lora = _expand_rank_chunk(
                        lora, h_ptr, e_ptr, scale_ptr, rows64, cols, col_ok, in_seg, single_segment, adapter, rank,
                        r_chunk, stride_hm, stride_ea, stride_en, stride_er, HAS_SCALE, LORA_PRECISION)
                else:
                    for r0 in range(0, rank, R_CHUNK):
                        lora = _expand_rank_chunk(
                            lora, h_ptr, e_ptr, scale_ptr, rows64, cols, col_ok, in_seg, single_segment, adapter,
                            rank, r0 + r_chunk, stride_hm, stride_ea, stride_en, stride_er, HAS_SCALE, LORA_PRECISION)
        if LORA_DROPOUT:
            keep = _dropout_keep(seed, rows, cols, N, dropout_p)
            acc += tl.where(keep, lora / (1.0 - dropout_p), 0.0)
        else:
            acc = lora

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + rows64[:, None] * stride_resm + cols[None, :] * stride_resn, mask=out_mask, other=0.0)
        acc += res.to(tl.float32)
    tl.store(
        out_ptr + rows64[:, None] * stride_om + cols[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=out_mask,
    )


# ---------------------------------------------------------------------------------------------------------
# Grouped outer product: OUT[a][N, R] = s[a] * sum_{rows of adapter a} drop(X)[rows, N]^T @ Y[rows, R]
# ---------------------------------------------------------------------------------------------------------
def _outer_configs():
    if interpreter_active():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (32, 64, 4, 4)]
    ]


@triton.autotune(configs=_outer_configs(), key=["N", "R_BLOCK", "DROPOUT"], cache_results=True)
@triton.jit
def _segmented_outer_kernel(
    x_ptr, y_ptr, scale_ptr, out_ptr, seg_indptr_ptr, adapter_ids_ptr,
    num_segments, num_rows, search_steps, N, R, seed, dropout_p, num_splits,
    stride_xm, stride_xn, stride_ym, stride_os, stride_oa, stride_on, stride_or,
    R_BLOCK: tl.constexpr, R_CHUNK: tl.constexpr, HAS_SCALE: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (adapter, column tile x rank chunk, split), walking the adapter's segments in order;
    # split s takes the s-th chunk of every segment's rows and writes its own partial sum (reduced by the
    # launcher): deterministic, no atomics, and adapters that own no rows get an exact zero gradient.
    adapter = tl.program_id(0)
    split = tl.program_id(2)
    num_chunks = R_BLOCK // R_CHUNK
    cols = (tl.program_id(1) // num_chunks) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    r = (tl.program_id(1) % num_chunks) * R_CHUNK + tl.arange(0, R_CHUNK)
    acc = tl.zeros((BLOCK_N, R_CHUNK), dtype=tl.float32)
    # Only the segments that own rows are walked. Offsets never decrease and the last is num_rows, so every
    # segment starting at num_rows is empty and they all come last: a binary search over the offsets counts the
    # others from the device, without a host read. This matters for the static bound of
    # ``SegmentInfo.from_row_mask`` under torch.compile / CUDA-graph capture (B * N segments, the runs first,
    # the rest empty at offset M): log2(B * N) loads per program instead of a load and compare per segment.
    live_lo = tl.program_id(0) * 0
    live_hi = live_lo + num_segments
    for _ in range(0, search_steps):
        searching = live_lo < live_hi
        mid = (live_lo + live_hi) // 2
        mid_start = tl.load(seg_indptr_ptr + mid, mask=searching, other=num_rows)
        live_lo = tl.where(searching & (mid_start < num_rows), mid + 1, live_lo)
        live_hi = tl.where(searching & (mid_start >= num_rows), mid, live_hi)
    for g in range(0, live_lo):
        if tl.load(adapter_ids_ptr + g) == adapter:
            seg_start = tl.load(seg_indptr_ptr + g)
            seg_end = tl.load(seg_indptr_ptr + g + 1)
            chunk = tl.cdiv(seg_end - seg_start, num_splits)
            start = seg_start + split * chunk
            end = tl.minimum(seg_end, start + chunk)
            for m0 in range(start, end, BLOCK_M):
                rows = m0 + tl.arange(0, BLOCK_M)
                row_ok = rows < end
                rows64 = rows.to(tl.int64)
                x = tl.load(
                    x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xn,
                    mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0,
                )
                if DROPOUT:  # masked exactly; 1/(1-p) is applied once to the fp32 sum below
                    keep = _dropout_keep(seed, rows, cols, N, dropout_p)
                    x = tl.where(keep, x, tl.zeros_like(x))
                y = tl.load(y_ptr + rows64[:, None] * stride_ym + r[None, :], mask=row_ok[:, None], other=0.0)
                acc = tl.dot(tl.trans(x.to(tl.float32)), y, acc, input_precision=PRECISION)
    if DROPOUT:
        acc = acc / (1.0 - dropout_p)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + adapter).to(tl.float32)
    tl.store(
        out_ptr + split.to(tl.int64) * stride_os + adapter.to(tl.int64) * stride_oa
        + cols[:, None] * stride_on + r[None, :] * stride_or,
        acc.to(out_ptr.dtype.element_ty),
        mask=col_ok[:, None] & (r[None, :] < R),
    )


@triton.jit
def _dropout_mask_kernel(out_ptr, M, K, seed, dropout_p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _dropout_keep(seed, rows, ks, K, dropout_p)
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :],
        keep.to(tl.int8),
        mask=(rows < M)[:, None] & (ks < K)[None, :],
    )


# ---------------------------------------------------------------------------------------------------------
# Host launchers: check, allocate, launch. Shapes are validated by the public op; these only assert the
# internal contract (they are called with already-checked tensors).
# ---------------------------------------------------------------------------------------------------------
def segmented_shrink(
    x: torch.Tensor,
    weight: torch.Tensor,
    segments: SegmentInfo,
    ranks: torch.Tensor,
    r_block: int,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """``H = drop(x) @ weight[a]^T`` per segment, fp32.

    Args:
        x: ``[M, K]`` (any strides).
        weight: ``[num_adapters, R, K]`` (any strides; ``B.transpose(1, 2)`` for ``dY @ B[a]``).
        ranks: int32 ``[num_adapters]``; entries ``r >= ranks[a]`` of ``weight[a]`` are ignored.
        r_block: width of the result (``rank_block(R)``); columns past ``R`` are zero.
    Returns:
        fp32 ``[M, r_block]``; rows of base-only segments are zero.
    """
    M, K = x.shape
    out = alloc.empty((M, r_block), device=x.device, dtype=torch.float32)
    if M == 0:
        return out
    chunk = rank_chunk(r_block, "shrink")
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), r_block // chunk)  # noqa: E731
    _segmented_shrink_kernel[grid](
        x, weight, out, segments.row_segment, segments.adapter_ids, ranks,
        M, K, int(seed), float(dropout_p),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), weight.stride(2), out.stride(0),
        R_BLOCK=r_block, R_CHUNK=chunk, DROPOUT=dropout_p > 0.0, PRECISION=_dot_precision(x.dtype),
        UPCAST=_interpreter_upcast(x.dtype),
    )
    return out


def fused_lora_gemm(
    x: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    h: Optional[torch.Tensor],
    expand: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    segments: SegmentInfo,
    ranks: torch.Tensor,
    *,
    out_features: int,
    out_dtype: torch.dtype,
    dropout_p: float = 0.0,
    seed: int = 0,
    alternative: Optional[Callable[..., Optional[torch.Tensor]]] = None,
) -> torch.Tensor:
    """``OUT = x @ weight^T + bias + drop(s[a] * h @ expand[a]^T) + residual`` in one pass over ``OUT`` (the
    Triton kernel).

    Args:
        x: ``[M, K]`` or ``None`` (no base GEMM: expand only).
        weight: ``[N, K]`` (any strides; ``W.t()`` for ``dY @ W``) or ``None`` with ``x``.
        bias: ``[N]`` or ``None``.
        h: fp32 ``[M, R_BLOCK]`` from :func:`segmented_shrink`, or ``None`` (no LoRA term).
        expand: ``[num_adapters, N, R]`` (any strides; ``A.transpose(1, 2)`` for ``dH @ A[a]``).
        scale: ``[num_adapters]`` multiplying each adapter's term, or ``None`` for 1.
        residual: ``[M, N]`` or ``None``.
        dropout_p: when > 0, the LoRA term (not the base) is multiplied by the dropout mask of the
            logical ``[M, N]`` output (used for the input gradient through the LoRA dropout).
        alternative: called first with the same arguments; its output, unless ``None``, is returned instead of
            running the kernel. The triton backend passes its per-shape choice of the cuBLAS twin here
            (``monkey_kernels.ops.multi_lora.triton_impl``), so the launch stays in this frame, the one the op
            calls.
    Returns:
        ``[M, N]`` of ``out_dtype``.
    """
    if alternative is not None:
        out = alternative(x, weight, bias, h, expand, scale, residual, segments, ranks, out_features=out_features,
                          out_dtype=out_dtype, dropout_p=dropout_p, seed=seed)
        if out is not None:
            return out
    M, N = segments.num_rows, int(out_features)
    out = alloc.empty((M, N), device=segments.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return out
    has_base = x is not None
    has_lora = h is not None
    K = x.shape[1] if has_base else 0
    if has_base and K == 0:
        has_base = False
    dummy = out
    x_t = x if has_base else dummy
    w_t = weight if has_base else dummy
    h_t = h if has_lora else dummy
    e_t = expand if has_lora else dummy.view(1, M, N)
    res_t = residual if residual is not None else dummy
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _fused_lora_gemm_kernel[grid](
        x_t, w_t, bias if bias is not None else dummy, h_t, e_t,
        scale if scale is not None else dummy, res_t, out,
        segments.row_segment, segments.adapter_ids, ranks,
        M, N, K, int(seed), float(dropout_p),
        x_t.stride(0), x_t.stride(1), w_t.stride(0), w_t.stride(1),
        h_t.stride(0), e_t.stride(0), e_t.stride(1), e_t.stride(2),
        res_t.stride(0), res_t.stride(1), out.stride(0), out.stride(1),
        R_BLOCK=h.shape[1] if has_lora else 16, R_CHUNK=rank_chunk(h.shape[1] if has_lora else 16, "gemm"),
        HAS_BASE=has_base, HAS_BIAS=bias is not None, HAS_LORA=has_lora, HAS_SCALE=scale is not None,
        HAS_RESIDUAL=residual is not None, LORA_DROPOUT=has_lora and dropout_p > 0.0,
        BASE_PRECISION=_dot_precision(x.dtype if has_base else out_dtype),
        LORA_PRECISION=_dot_precision(expand.dtype if has_lora else out_dtype),
        UPCAST=has_base and _interpreter_upcast(x.dtype),
    )
    return out


def segmented_outer(
    x: torch.Tensor,
    y: torch.Tensor,
    segments: SegmentInfo,
    out: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    num_splits: Optional[int] = None,
) -> torch.Tensor:
    """``out[a] = s[a] * sum over rows of adapter a of drop(x)[rows]^T @ y[rows, :R]`` (fp32 accumulation).

    Args:
        x: ``[M, N]`` (any strides); ``drop`` uses the dropout mask of the logical ``[M, N]`` matrix.
        y: fp32 ``[M, R_BLOCK]``.
        out: ``[num_adapters, N, R]`` written in place (any strides; ``dA.transpose(1, 2)`` for ``dA``).
        scale: ``[num_adapters]`` or ``None``.
        num_splits: row chunks reduced in parallel (partial sums in an fp32 workspace, summed in a fixed
            order); ``None`` picks enough to fill the GPU, 1 under the interpreter.
    Returns:
        ``out``; adapters without rows get zeros.
    """
    num_adapters, N, R = out.shape
    if num_adapters == 0 or N == 0 or R == 0:
        return out
    if num_splits is None:
        num_splits = _default_outer_splits(x.device, num_adapters, N, segments.num_rows)
    if num_splits == 1:
        target = out.unsqueeze(0)
    else:
        target = alloc.empty((num_splits, num_adapters, N, R), device=out.device, dtype=torch.float32)
    r_block = y.shape[1]
    chunk = rank_chunk(r_block, "outer")
    grid = lambda meta: (num_adapters, triton.cdiv(N, meta["BLOCK_N"]) * (r_block // chunk), num_splits)  # noqa: E731
    _segmented_outer_kernel[grid](
        x, y, scale if scale is not None else out, target, segments.seg_indptr, segments.adapter_ids,
        segments.num_segments, segments.num_rows, segments.num_segments.bit_length(), N, R, int(seed),
        float(dropout_p), num_splits,
        x.stride(0), x.stride(1), y.stride(0),
        target.stride(0), target.stride(1), target.stride(2), target.stride(3),
        R_BLOCK=r_block, R_CHUNK=chunk, HAS_SCALE=scale is not None, DROPOUT=dropout_p > 0.0,
        PRECISION=_dot_precision(x.dtype),
    )
    if num_splits > 1:
        out.copy_(target.sum(dim=0))
    return out


_SM_COUNTS: dict = {}


def _default_outer_splits(device: torch.device, num_adapters: int, n: int, num_rows: int) -> int:
    """Splits so that (adapters x column tiles x splits) covers the GPU about twice; read lazily, never
    at import (a CPU machine has no GPU to ask)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    programs = num_adapters * triton.cdiv(n, 64)
    wanted = triton.cdiv(2 * _SM_COUNTS[index], max(programs, 1))
    # each split should still own a few row tiles per adapter
    most = max(1, num_rows // max(num_adapters * 256, 1))
    return int(max(1, min(wanted, most, 16)))


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device: torch.device) -> torch.Tensor:
    """The keep-mask (bool ``[rows, cols]``) that the kernels above apply for ``(seed, p)``."""
    out = torch.empty((rows, cols), device=device, dtype=torch.int8)
    if rows and cols:
        grid = (triton.cdiv(rows, 32), triton.cdiv(cols, 32))
        _dropout_mask_kernel[grid](out, rows, cols, int(seed), float(p), BLOCK_M=32, BLOCK_K=32)
    return out.bool()
