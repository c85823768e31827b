"""The cuBLAS twin of the Triton fused GEMM: the same contract as ``monkey_kernels._triton.multi_lora.
fused_lora_gemm``, computed by PyTorch GEMMs (cuBLAS on a GPU, any device's matmul elsewhere). The triton backend
runs whichever of the two is faster for a shape (:mod:`.gemm_choice`, :mod:`.triton_impl`). Imports without
Triton (the dropout mask of a dropped LoRA term, the kernel's own, loads it when needed)."""
from __future__ import annotations

from typing import Optional

import torch

from monkey_kernels.ops import alloc
from monkey_kernels.ops.segments import SegmentInfo

__all__ = ["fused_lora_gemm_cublas"]


def _base_and_epilogue(out, x, weight, bias, residual, out_dtype) -> None:
    """``out = x @ weight^T + bias + residual`` (each term optional) as one GEMM with its epilogue: fp32
    accumulation, bias and residual added by ``addmm``, rounded once. An output wider than the inputs (a promoted
    output under autocast) gets the GEMM in the inputs' dtype (the tensor-core path, rounded there as the
    reference's ``F.linear`` rounds it), then the addend in the output dtype."""
    M, N = out.shape
    addend = None  # what the GEMM epilogue adds: bias [N] and / or residual [M, N], in the output dtype
    if residual is not None:
        addend = residual.to(out_dtype) if bias is None else residual.to(out_dtype) + bias.to(out_dtype)
    elif bias is not None:
        addend = bias.to(out_dtype)
    if x is not None and x.shape[1] > 0 and x.dtype != out_dtype:
        out.copy_(torch.mm(x, weight.to(x.dtype).t()))
        if addend is not None:
            out += addend
        return
    if x is not None and x.shape[1] > 0:
        product = (x.to(out_dtype), weight.to(out_dtype).t())
        if addend is None:
            torch.mm(*product, out=out)
        else:
            torch.addmm(addend, *product, out=out)
    elif addend is None:
        out.zero_()
    else:
        out.copy_(addend.expand(M, N))


def _concatenated_lora_operands(h, expand, scale, segments: SegmentInfo, ranks):
    """``(Hs [M, A*R] fp32, Bcat [N, A*R])``: each row's ``s[a] * h[:, :rank]`` in its adapter's column block (zero
    in the other blocks and on base-only rows) and ``[E_0 | ... | E_{A-1}]`` with the columns past each rank
    zero, so that one GEMM ``Hs @ Bcat^T`` of inner size ``A * R`` adds every adapter's term."""
    device = segments.device
    M = segments.num_rows
    num_adapters, N, R = expand.shape
    row_adapter = segments.row_adapter
    active = row_adapter >= 0
    adapter_of_row = row_adapter.clamp(min=0)
    in_rank = torch.arange(R, device=device)[None, :] < ranks.to(device=device, dtype=torch.int64)[:, None]
    hs = h[:, :R].to(torch.float32)
    if scale is not None:
        hs = hs * scale.to(torch.float32)[adapter_of_row][:, None]
    # selected, never multiplied by 0: H past the rank (and an inf scale) must not turn into NaN
    hs = torch.where(in_rank[adapter_of_row] & active[:, None], hs, 0.0)
    owner = active[:, None] & (adapter_of_row[:, None] == torch.arange(num_adapters, device=device)[None, :])
    h_cat = torch.where(owner[:, :, None], hs[:, None, :], 0.0).reshape(M, num_adapters * R)
    b_cat = torch.where(in_rank[:, None, :], expand, 0.0).permute(1, 0, 2).reshape(N, num_adapters * R)
    return h_cat, b_cat


def fused_lora_gemm_cublas(
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
) -> torch.Tensor:
    """The Triton ``fused_lora_gemm`` (same arguments, same result up to rounding) by PyTorch GEMMs:
    ``OUT [M, N] = x @ weight^T + bias + drop(s[a] * h @ expand[a]^T) + residual``.

    - Base: ``torch.addmm(bias [+ residual], x, weight^T)`` into the output (one GEMM, fp32 accumulation,
      bias and residual added in its epilogue, rounded once).
    - LoRA: the concatenated-K form ``Hs [M, A*R] @ Bcat [N, A*R]^T`` with ``Hs`` holding ``s[a] * h[:, :rank]``
      of each row in its adapter's column block (zero in every other block and on base-only rows) and
      ``Bcat = [E_0 | ... | E_{A-1}]`` (columns past each rank zero): one GEMM of inner size ``A * R``
      for all adapters, no host synchronisation. Added in place into the output (bf16: a bf16 GEMM, ``Hs``
      rounded to bf16; fp32 and fp16: an fp32 GEMM, fp16's range kept); with ``dropout_p`` the fp32
      term is masked by the fused kernel's dropout mask of the same seed.

    One difference from the fused kernel: a NaN / inf inside an adapter's rank columns of ``expand``
    reaches the rows of every segment (0 * inf in the zero blocks of ``Hs``), not only that adapter's rows.
    """
    M = segments.num_rows
    N = int(out_features)
    out = alloc.empty((M, N), device=segments.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return out
    _base_and_epilogue(out, x, weight, bias, residual, out_dtype)
    if h is None or expand.shape[0] == 0 or expand.shape[2] == 0:
        return out
    h_cat, b_cat = _concatenated_lora_operands(h, expand, scale, segments, ranks)
    if dropout_p > 0.0:
        # the fused kernel's own mask (Philox, so Triton), imported only for a dropped term
        from monkey_kernels._triton.multi_lora import dropout_keep_mask  # noqa: PLC0415

        term = h_cat @ b_cat.to(torch.float32).t()
        keep = dropout_keep_mask(seed, M, N, dropout_p, segments.device)
        out += torch.where(keep, term / (1.0 - dropout_p), 0.0)
    elif out_dtype in (torch.bfloat16, torch.float32):
        out.addmm_(h_cat.to(out_dtype), b_cat.to(out_dtype).t())
    else:
        out += h_cat @ b_cat.to(torch.float32).t()
    return out
