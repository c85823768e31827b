"""The multi-LoRA primitives in vectorized PyTorch (any device; the ``torch`` backend).

The same three primitives as the Triton kernels (``triton_kernels/multi_lora.py``) and the C++ ops
(``native_impl``): ``shrink``, ``fused_gemm``, ``outer``, plus ``dropout_keep_mask``. Equal-length segments
run batched GEMMs over segments (exact FLOPs, no host read); ragged segments one GEMM per adapter on its rows.
fp32 accumulation for half dtypes, fp64 for fp64 (the dropout scaling included).
"""
from __future__ import annotations

import torch

from monkey_kernels.ops.segments import SegmentInfo

from ..checks import accumulation_dtype
from ..registry import register_backend

__all__ = ["TorchMultiLoRA", "IMPLEMENTATION", "torch_keep_mask"]


# ---------------------------------------------------------------------------------------------------------
_last_mask: tuple = (None, None)  # (key, mask) of the last mask drawn; replaced whole, so threads read a pair


def torch_keep_mask(seed: int, rows: int, cols: int, p: float, device: torch.device) -> torch.Tensor:
    """The bool keep-mask ``[rows, cols]`` of the torch backend for ``(seed, p)``: a pure function of the seed.

    The backward needs a layer's mask twice in a row (``dA`` and ``dV``), so the last mask drawn is kept and
    returned again for the same key: one draw instead of two, and one mask of memory at most (callers only
    read it)."""
    global _last_mask
    key = (int(seed), int(rows), int(cols), float(p), torch.device(device))
    last_key, last = _last_mask
    if last_key == key:
        return last
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    mask = torch.rand((rows, cols), generator=generator, device=device) >= p
    _last_mask = (key, mask)
    return mask


def _dropout(x: torch.Tensor, p: float, seed: int, keep_mask) -> torch.Tensor:
    if p <= 0.0:
        return x
    keep = keep_mask(seed, x.shape[0], x.shape[1], p, x.device)
    # scaled in the accumulation dtype: float64 stays float64, half types round once
    return torch.where(keep, x.to(accumulation_dtype(x.dtype)) / (1.0 - p), 0.0).to(x.dtype)


def _row_rank_mask(segments: SegmentInfo, ranks: torch.Tensor, width: int) -> torch.Tensor:
    """bool ``[M, width]``: column ``r`` of row ``i`` belongs to its adapter (``r < rank``, id ≠ -1)."""
    active = segments.row_adapter >= 0
    row_rank = torch.where(active, ranks.to(torch.int64)[segments.row_adapter.clamp(min=0)], 0)
    return torch.arange(width, device=row_rank.device)[None, :] < row_rank[:, None]


def _uniform_split(segments: SegmentInfo):
    """``(G, L)`` when the rows are ``G`` segments of ``L`` rows each (then batched GEMMs over segments
    do exactly the FLOPs of the LoRA), else ``None`` (ragged: one GEMM per adapter, see :func:`_adapter_rows`)."""
    length = segments.segment_length
    if not length or segments.num_segments * length != segments.num_rows:
        return None
    return segments.num_segments, length


def _segment_weights(weight, segments, ranks, scale, dtype) -> torch.Tensor:
    """Each segment's adapter slice of ``weight [num_adapters, R, X]`` as ``[G, R, X]`` in ``dtype``, with
    rows past the rank, and every row of base-only segments, set to zero and the adapter's scale applied.

    Zeros are selected (``torch.where``), never multiplied in: a NaN or inf past an adapter's rank, or in the
    adapter that id -1 is clamped to, must not turn into ``0 * NaN = NaN``."""
    ids = segments.adapter_ids.to(torch.int64)
    index = ids.clamp(min=0)
    R = weight.shape[1]
    used = (torch.arange(R, device=ids.device)[None, :] < ranks.to(torch.int64)[index][:, None]) & (ids >= 0)[:, None]
    weights = weight[index].to(dtype)
    if scale is not None:
        weights = weights * scale.to(dtype)[index][:, None, None]
    return torch.where(used[:, :, None], weights, 0.0)


def _adapter_rows(segments: SegmentInfo):
    """``[(adapter, rows)]``: the row indices (int64, ascending) of every adapter that owns rows; base-only
    rows are in none. Ragged layouts run one GEMM per adapter on these rows: exact FLOPs, and a NaN or inf
    can only reach the rows of its own adapter (a block-structured GEMM over all adapters multiplies every
    row with the other adapters' zero blocks, and ``0 * NaN`` leaks).

    Reads the per-adapter row counts back to the host (free on CPU, a synchronisation on CUDA, which is why
    it is refused during CUDA-graph capture: the Triton backend serves CUDA)."""
    device = segments.device
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise ValueError("the torch backend needs the row count of each adapter on the host for ragged segments, "
                         "which a CUDA-graph capture forbids; use backend='triton' (or equal-length segments)")
    row_adapter = segments.row_adapter
    counts = torch.bincount(row_adapter + 1, minlength=1).tolist()
    order = torch.argsort(row_adapter, stable=True)
    groups, start = [], counts[0]  # slot 0: the base-only rows (id -1) sort first
    for adapter, count in enumerate(counts[1:]):
        if count:
            groups.append((adapter, order[start:start + count]))
        start += count
    return groups


class TorchMultiLoRA:
    """The primitives in vectorized PyTorch (any device). Equal-length segments (``segment_length`` known):
    batched GEMMs over segments, no host read. Ragged segments: one GEMM per adapter on its rows
    (:func:`_adapter_rows`). fp32 accumulation for half dtypes, fp64 for fp64."""

    name = "torch"
    outer_zeroes_unowned = False
    supports_merged_weights = False
    dropout_keep_mask = staticmethod(torch_keep_mask)

    @staticmethod
    def shrink(x, weight, segments, ranks, r_block, dropout_p=0.0, seed=0):
        num_adapters, R, K = weight.shape
        M = x.shape[0]
        dtype = accumulation_dtype(x.dtype)
        x = _dropout(x, dropout_p, seed, torch_keep_mask)
        uniform = _uniform_split(segments)
        if uniform is not None:
            G, L = uniform
            weights = _segment_weights(weight, segments, ranks, None, dtype)
            h = torch.bmm(x.view(G, L, K).to(dtype), weights.transpose(1, 2)).view(M, R)
            # An inf in a base-only row (or past the rank) times the zero weights is NaN: select zeros there.
            h = torch.where(_row_rank_mask(segments, ranks, R), h, 0.0)
            return torch.nn.functional.pad(h, (0, r_block - R))  # zero columns up to r_block, as the kernel's H
        h = torch.zeros((M, r_block), device=x.device, dtype=dtype)
        host_ranks = ranks.tolist()
        for adapter, rows in _adapter_rows(segments):
            rank = host_ranks[adapter]
            if rank:
                h[rows, :rank] = x[rows].to(dtype) @ weight[adapter, :rank].to(dtype).t()
        return h

    @staticmethod
    def fused_gemm(x, weight, bias, h, expand, scale, residual, segments, ranks, *,
                   out_features, out_dtype, dropout_p=0.0, seed=0):
        M, N = segments.num_rows, int(out_features)
        # fp32/fp64 accumulate in place in the output (no extra [M, N] buffers); half dtypes accumulate
        # in an fp32 copy and round once, like the kernels.
        acc_dtype = accumulation_dtype(out_dtype)
        uniform = _uniform_split(segments)
        if x is not None and x.shape[1] > 0:
            acc = torch.nn.functional.linear(x, weight, bias)
            if h is None and residual is None:
                return acc
            acc = acc.to(acc_dtype)
        elif bias is not None:
            acc = bias.to(acc_dtype).expand(M, N).clone()
        else:
            acc = torch.zeros((M, N), device=segments.device, dtype=acc_dtype)
        keep = None
        if h is not None and dropout_p > 0.0:
            keep = torch_keep_mask(seed, M, N, dropout_p, acc.device)
        if h is not None and uniform is not None:
            G, L = uniform
            R = expand.shape[2]
            weights = _segment_weights(expand.transpose(1, 2), segments, ranks, scale, acc_dtype)  # [G, R, N]
            rows = h[:, :R].to(acc_dtype).view(G, L, R)
            if keep is not None:
                lora = torch.bmm(rows, weights).view(M, N)
                acc += torch.where(keep, lora / (1.0 - dropout_p), 0.0)
            else:
                acc.view(G, L, N).baddbmm_(rows, weights)
        elif h is not None:
            host_ranks = ranks.tolist()
            for adapter, rows in _adapter_rows(segments):
                rank = host_ranks[adapter]
                if not rank:
                    continue
                term = h[rows, :rank].to(acc_dtype) @ expand[adapter, :, :rank].to(acc_dtype).t()
                if scale is not None:
                    term = term * scale[adapter].to(acc_dtype)
                if keep is not None:
                    term = torch.where(keep[rows], term / (1.0 - dropout_p), 0.0)
                acc.index_add_(0, rows, term)
        if residual is not None:
            acc += residual
        return acc.to(out_dtype)

    @staticmethod
    def outer(x, y, segments, out, scale=None, dropout_p=0.0, seed=0):
        num_adapters, N, R = out.shape
        dtype = accumulation_dtype(x.dtype)
        x = _dropout(x, dropout_p, seed, torch_keep_mask)
        uniform = _uniform_split(segments)
        result = torch.zeros((num_adapters, N, R), device=x.device, dtype=dtype)
        if uniform is not None:
            G, L = uniform
            ids = segments.adapter_ids.to(torch.int64)
            per_segment = torch.bmm(x.view(G, L, N).to(dtype).transpose(1, 2), y[:, :R].to(dtype).view(G, L, R))
            # base-only segments are added to adapter 0's slot below: select zeros, never multiply by 0
            per_segment = torch.where((ids >= 0)[:, None, None], per_segment, 0.0)
            result.index_add_(0, ids.clamp(min=0), per_segment)
        else:
            for adapter, rows in _adapter_rows(segments):
                result[adapter] = x[rows].to(dtype).t() @ y[rows, :R].to(dtype)
        if scale is not None:
            result = result * scale.to(dtype).view(num_adapters, 1, 1)
        out.copy_(result)
        return out


IMPLEMENTATION = register_backend("multi_lora", "torch", TorchMultiLoRA)
