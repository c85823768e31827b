"""The segmented multi-LoRA linear: functional op, autograd function, validation and a float64 reference."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from triton_kernels import alloc
from triton_kernels.segments import SegmentInfo

from ._checks import check_device, check_dtype, check_tensor
from .backends import get_primitives, resolve_backend

__all__ = ["multi_lora_linear", "multi_lora_linear_ref", "MultiLoRALinearFunction", "normalize_ranks"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class MultiLoRALinearFunction(torch.autograd.Function):
    r"""Autograd function of the segmented multi-LoRA linear (flattened rows, validated inputs).

    Forward, for row ``i`` of segment ``g`` with adapter ``a`` (``a = -1``: the LoRA term is absent),
    with ``D`` the dropout mask scaled by ``1/(1-p)`` and ``V = U`` unless a separate LoRA input is given:

    .. math::
        H_i = (D \odot V)_i A_a^\top, \qquad
        Y_i = U_i W^\top + b + s_a\, H_i B_a^\top + R_i

    ``H`` (fp32 ``[M, R_BLOCK]``) is the only saved intermediate; ``D`` is regenerated from the seed.

    Backward, with :math:`G_i = dY_i B_a` (the shrink of ``dY``, fp32) and :math:`dH_i = s_a G_i`:

    .. math::
        ds_a = \sum_{i \in a} \langle G_i, H_i \rangle, \quad
        dB_a = s_a \sum_{i \in a} dY_i^\top H_i, \quad
        dA_a = \sum_{i \in a} dH_i^\top (D \odot V)_i,

        dV_i = D_i \odot (dH_i A_a), \quad dU = dY\, W \;(+\, dV \text{ when } V = U), \quad
        dW = dY^\top U, \quad db = \textstyle\sum_i dY_i, \quad dR = dY.

    ``dY W`` and ``dH A_a`` share one fused GEMM (the forward kernel with ``W^\top`` and ``A_a^\top`` as
    strided views); ``dW``/``db`` are computed only when they require grad.
    """

    @staticmethod
    def forward(ctx, u, v, weight, bias, lora_a, lora_b, scale, residual, ranks, segments, r_block,
                dropout_p, seed, backend):
        prims = get_primitives(backend)
        lora_in = u if v is None else v
        h = prims.shrink(lora_in, lora_a, segments, ranks, r_block, dropout_p=dropout_p, seed=seed)
        y = prims.fused_gemm(
            u, weight, bias, h, lora_b, scale, residual, segments, ranks,
            out_features=weight.shape[0], out_dtype=u.dtype,
        )
        ctx.save_for_backward(u, v, weight, lora_a, lora_b, scale, h, ranks)
        ctx.segments, ctx.r_block, ctx.dropout_p, ctx.seed, ctx.backend = segments, r_block, dropout_p, seed, backend
        ctx.has_bias = bias is not None
        ctx.has_residual = residual is not None
        return y

    @staticmethod
    def backward(ctx, grad_out):
        u, v, weight, lora_a, lora_b, scale, h, ranks = ctx.saved_tensors
        prims = get_primitives(ctx.backend)
        segments, p, seed = ctx.segments, ctx.dropout_p, ctx.seed
        need = ctx.needs_input_grad
        need_u, need_v, need_w, need_bias, need_a, need_b, need_scale, need_res = need[:8]
        dy = grad_out.contiguous()
        num_adapters, r_max, k_lora = lora_a.shape
        lora_in = u if v is None else v

        grad_u = grad_v = grad_w = grad_bias = grad_a = grad_b = grad_scale = None
        need_dh = need_a or need_u or need_v
        g = None
        if need_dh or need_scale:
            g = prims.shrink(dy, lora_b.transpose(1, 2), segments, ranks, ctx.r_block)
        if need_scale:
            per_row = (g * h).sum(dim=1)
            grad_scale = torch.zeros(num_adapters, device=dy.device, dtype=torch.float32)
            grad_scale.index_add_(0, segments.row_adapter.clamp(min=0), per_row)
            grad_scale = grad_scale.to(scale.dtype)
        dh = None
        if need_dh:
            row_scale = scale.float()[segments.row_adapter.clamp(min=0)]
            dh = g * row_scale[:, None]
        if need_b:
            grad_b = alloc.empty(lora_b.shape, device=lora_b.device, dtype=lora_b.dtype)
            prims.outer(dy, h, segments, grad_b, scale=scale)
        if need_a:
            grad_a = alloc.empty(lora_a.shape, device=lora_a.device, dtype=lora_a.dtype)
            prims.outer(lora_in, dh, segments, grad_a.transpose(1, 2), dropout_p=p, seed=seed)
        if v is None:
            if need_u:
                grad_u = prims.fused_gemm(
                    dy, weight.t(), None, dh, lora_a.transpose(1, 2), None, None, segments, ranks,
                    out_features=k_lora, out_dtype=u.dtype, lora_dropout_p=p, seed=seed,
                )
        else:
            if need_u:
                grad_u = prims.fused_gemm(
                    dy, weight.t(), None, None, None, None, None, segments, ranks,
                    out_features=weight.shape[1], out_dtype=u.dtype,
                )
            if need_v:
                grad_v = prims.fused_gemm(
                    None, None, None, dh, lora_a.transpose(1, 2), None, None, segments, ranks,
                    out_features=k_lora, out_dtype=v.dtype, lora_dropout_p=p, seed=seed,
                )
        if need_w:
            grad_w = dy.t().mm(u)
        if need_bias:
            grad_bias = dy.sum(dim=0)
        grad_res = dy if need_res else None
        return (grad_u, grad_v, grad_w, grad_bias, grad_a, grad_b, grad_scale, grad_res,
                None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------
def normalize_ranks(ranks, num_adapters: int, r_max: int, device: torch.device, checked: bool = False) -> torch.Tensor:
    """Validated int32 ``[num_adapters]`` ranks on ``device``. ``None`` = every adapter has rank ``r_max``.

    ``checked=True`` skips reading the values back (for ranks validated before, e.g. by a module)."""
    if ranks is None:
        return torch.full((num_adapters,), r_max, dtype=torch.int32, device=device)
    if isinstance(ranks, torch.Tensor):
        if ranks.dtype.is_floating_point or ranks.dtype == torch.bool or ranks.dim() != 1:
            raise ValueError(f"ranks must be a 1-D integer tensor, got {ranks.dtype} {tuple(ranks.shape)}")
        values = ranks
    else:
        try:
            values = torch.as_tensor(list(ranks), dtype=torch.int64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"ranks must be a sequence of ints: {error}") from None
    if values.numel() != num_adapters:
        raise ValueError(f"ranks must have num_adapters={num_adapters} entries, got {values.numel()}")
    capturing = values.is_cuda and torch.cuda.is_current_stream_capturing()
    if not (checked or capturing):  # reading values back is illegal inside CUDA-graph capture
        host = values.cpu()
        if (host < 0).any():
            raise ValueError(f"ranks must be >= 0, got {host.tolist()}")
        if (host > r_max).any():
            raise ValueError(f"ranks must be <= r_max={r_max} (lora_a.shape[1]), got {host.tolist()}")
    return values.to(device=device, dtype=torch.int32).contiguous()


def multi_lora_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor,
    segments: Union[SegmentInfo, torch.Tensor, Sequence[int]],
    *,
    ranks: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    lora_input: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    backend: Optional[str] = None,
    ranks_checked: bool = False,
) -> torch.Tensor:
    r"""Linear layer with one LoRA adapter per segment of rows, fused with the base GEMM.

    For the rows of segment ``g`` using adapter ``a = adapter_ids[g]``::

        Y = U @ W^T + bias + scale[a] * (dropout(V) @ A[a][:rank[a]]^T) @ B[a][:, :rank[a]]^T (+ residual)

    Args:
        input: ``U``, ``[..., K]``; the leading dims flatten row-major to ``M`` rows.
        weight: ``W``, ``[N, K]``.
        bias: ``[N]`` or ``None``.
        lora_a: ``A``, ``[num_adapters, r_max, K_lora]``.
        lora_b: ``B``, ``[num_adapters, N, r_max]``.
        scale: ``[num_adapters]``, any float dtype; may require grad (Monkey's learnable ``lora_scale``).
        segments: a :class:`SegmentInfo` with ``num_rows == M``; or adapter ids ``[batch]`` for an input
            ``[batch, seq, K]`` (one adapter per batch row). Id ``-1`` = base only.
        ranks: ``[num_adapters]`` ints ``<= r_max``; entries past an adapter's rank contribute nothing.
            ``None``: all ``r_max``.
        lora_input: ``V``, ``[..., K_lora]`` with the same leading dims as ``input``; ``None``: ``V = U``.
        residual: ``[..., N]`` added in the same pass, or ``None``.
        dropout_p: LoRA dropout probability on ``V`` (pass 0 in eval). Masks are a function of ``seed``.
        seed: dropout seed; ``None`` draws one from PyTorch's default CPU generator (so
            ``torch.manual_seed`` makes runs repeatable).
        backend: ``"triton"``, ``"torch"`` or ``None``/``"auto"`` (see :mod:`monkey_kernels.backends`).
        ranks_checked: ``ranks`` was validated before (``MultiLoRALinear`` does it once); skips reading a
            device tensor back, which would synchronise with the device on every call.
    Returns:
        ``[..., N]`` in the dtype of ``input``.
    Raises:
        ValueError: naming the argument, for bad shapes, dtypes, devices, ids, ranks or segments.
    """
    check_tensor("input", input)
    check_tensor("weight", weight, 2)
    check_tensor("lora_a", lora_a, 3)
    check_tensor("lora_b", lora_b, 3)
    check_tensor("scale", scale, 1)
    if input.dim() < 1:
        raise ValueError("input must have at least 1 dimension")
    dtype, device = input.dtype, input.device
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"input must be float32, float16, bfloat16 or float64, got {dtype}")
    K = input.shape[-1]
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"weight must be [N, K={K}] (K = input.shape[-1]), got {tuple(weight.shape)}")
    num_adapters, r_max, k_lora = lora_a.shape
    lead = tuple(input.shape[:-1])
    if lora_input is not None:
        check_tensor("lora_input", lora_input)
        if tuple(lora_input.shape[:-1]) != lead:
            raise ValueError(
                f"lora_input must have the leading dims {lead} of input, got shape {tuple(lora_input.shape)}"
            )
        k_expected = lora_input.shape[-1]
    else:
        k_expected = K
    if k_lora != k_expected:
        raise ValueError(
            f"lora_a must be [num_adapters, r_max, {k_expected}] (the LoRA input width), got {tuple(lora_a.shape)}"
        )
    if tuple(lora_b.shape) != (num_adapters, N, r_max):
        raise ValueError(
            f"lora_b must be [num_adapters={num_adapters}, N={N}, r_max={r_max}], got {tuple(lora_b.shape)}"
        )
    if scale.shape[0] != num_adapters:
        raise ValueError(f"scale must be [num_adapters={num_adapters}], got {tuple(scale.shape)}")
    if not scale.dtype.is_floating_point:
        raise ValueError(f"scale must be a float tensor, got {scale.dtype}")
    if bias is not None:
        check_tensor("bias", bias, 1)
        if bias.shape[0] != N:
            raise ValueError(f"bias must be [N={N}], got {tuple(bias.shape)}")
    if residual is not None:
        check_tensor("residual", residual)
        if tuple(residual.shape) != lead + (N,):
            raise ValueError(f"residual must have shape {lead + (N,)}, got {tuple(residual.shape)}")
    named = [("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)]
    named += [(n, t) for n, t in (("bias", bias), ("lora_input", lora_input), ("residual", residual)) if t is not None]
    for name, tensor in named:
        check_dtype(name, tensor, dtype, "input")
    for name, tensor in named + [("scale", scale)]:
        check_device(name, tensor, device, "input")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    dropout_p = float(dropout_p)
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item()) if dropout_p > 0.0 else 0
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")

    M = math.prod(lead)
    if not isinstance(segments, SegmentInfo):
        if input.dim() != 3:
            raise ValueError(
                "segments given as adapter ids needs input of shape [batch, seq, K]; "
                f"got input of shape {tuple(input.shape)} (pass a SegmentInfo for other layouts)"
            )
        segments = SegmentInfo.from_batch(segments, input.shape[1], device=device)
        if segments.num_segments != input.shape[0]:
            raise ValueError(f"segments must give one adapter id per batch row ({input.shape[0]}), "
                             f"got {segments.num_segments}")
    if segments.device != device:
        raise ValueError(f"segments are on {segments.device}, expected {device} (the device of input)")
    if segments.num_rows != M:
        raise ValueError(f"segments cover {segments.num_rows} rows but input has {M} rows ({lead})")
    if segments.max_adapter_id is not None and segments.max_adapter_id >= num_adapters:
        raise ValueError(
            f"segments use adapter id {segments.max_adapter_id}, out of range for num_adapters={num_adapters}"
        )
    ranks_t = normalize_ranks(ranks, num_adapters, r_max, device, checked=ranks_checked)

    backend = resolve_backend(backend, device)
    if backend == "triton" and dtype not in _KERNEL_DTYPES:
        raise ValueError(f"the triton backend supports float32, float16 and bfloat16 inputs, got {dtype}")

    u = input.reshape(M, K)
    v = lora_input.reshape(M, k_lora) if lora_input is not None else None
    res = residual.reshape(M, N) if residual is not None else None
    if backend == "triton":
        # The kernels take any strides, but a row-major input keeps their loads coalesced.
        u = u.contiguous()
        v = v.contiguous() if v is not None else None
        res = res.contiguous() if res is not None else None
    from triton_kernels.multi_lora import rank_block  # noqa: PLC0415 (triton is optional for the torch path)

    r_block = rank_block(max(r_max, 1))
    y = MultiLoRALinearFunction.apply(
        u, v, weight, bias, lora_a, lora_b, scale, res, ranks_t, segments, r_block, dropout_p, seed, backend
    )
    return y.view(*lead, N)


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
