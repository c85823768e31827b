"""Float64-capable reference of the multi-LoRA linear: the per-segment Python loop the tests and benchmarks
compare every backend with."""
from __future__ import annotations

from typing import Optional

import torch

from monkey_kernels.ops.segments import SegmentInfo

__all__ = ["multi_lora_linear_ref"]


def multi_lora_linear_ref(
    input, weight, bias, lora_a, lora_b, scale, segments: SegmentInfo, *, ranks=None, lora_input=None,
    residual=None, keep_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
) -> torch.Tensor:
    """Reference: the per-segment Python loop, in the dtype of its inputs (upcast them for a float64
    reference). ``keep_mask`` (bool ``[M, K_lora]``) is the dropout mask to apply, scaled by ``1/(1-p)``."""
    K = input.shape[-1]
    lead = input.shape[:-1]
    u = input.reshape(-1, K)
    v = u if lora_input is None else lora_input.reshape(u.shape[0], -1)
    if keep_mask is not None:
        v = torch.where(keep_mask, v / (1.0 - dropout_p), torch.zeros_like(v))
    out = torch.nn.functional.linear(u, weight, bias)
    if residual is not None:
        out = out + residual.reshape(out.shape)
    pieces = []
    indptr = segments.seg_indptr.tolist()
    for g, adapter in enumerate(segments.adapter_ids.tolist()):
        rows = slice(indptr[g], indptr[g + 1])
        piece = out[rows]
        if adapter >= 0:
            rank = lora_a.shape[1] if ranks is None else int(ranks[adapter])
            a = lora_a[adapter, :rank]
            b = lora_b[adapter, :, :rank]
            piece = piece + scale[adapter].to(out.dtype) * (v[rows] @ a.t()) @ b.t()
        pieces.append(piece)
    out = torch.cat(pieces, dim=0) if pieces else out
    return out.reshape(*lead, weight.shape[0])
