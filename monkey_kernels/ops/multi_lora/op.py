"""The segmented multi-LoRA linear: functional op, autograd function, validation and a float64 reference."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch

from triton_kernels import alloc
from triton_kernels.segments import SegmentInfo

from ._checks import accumulation_dtype, check_device, check_dtype, check_tensor
from .backends import get_primitives, resolve_backend

__all__ = [
    "multi_lora_linear", "multi_lora_linear_ref", "multi_lora_linear_fwd", "multi_lora_linear_bwd", "normalize_ranks",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_NO_LENGTH = -1  # ``segment_length`` of ragged segments in the op schemas (ints only, no ``None``)


def _segments_from_tensors(seg_indptr, adapter_ids, row_segment, row_adapter, segment_length: int) -> SegmentInfo:
    """The :class:`SegmentInfo` an op was given as its tensors (validated by the caller before the op)."""
    return SegmentInfo(
        seg_indptr=seg_indptr, adapter_ids=adapter_ids, row_segment=row_segment, row_adapter=row_adapter,
        num_rows=row_segment.shape[0], num_segments=adapter_ids.shape[0], max_adapter_id=None,
        segment_length=None if segment_length == _NO_LENGTH else segment_length,
    )


def _linear_forward(
    u: torch.Tensor, v: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor, residual: Optional[torch.Tensor],
    ranks: torch.Tensor, seg_indptr: torch.Tensor, adapter_ids: torch.Tensor, row_segment: torch.Tensor,
    row_adapter: torch.Tensor, segment_length: int, r_block: int, dropout_p: float, seed: torch.Tensor, backend: str,
    need_h: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Forward of the segmented multi-LoRA linear on flattened, validated rows (a PyTorch custom op, so
    ``torch.compile`` keeps it whole; its autograd formula is registered below).

    For row ``i`` of segment ``g`` with adapter ``a`` (``a = -1``: no LoRA term), ``D`` the dropout mask scaled
    by ``1/(1-p)`` (a function of ``seed``) and ``V = U`` when ``v`` is ``None``:

    .. math::
        H_i = (D \odot V)_i A_a^\top, \qquad Y_i = U_i W^\top + b + s_a\, H_i B_a^\top + R_i

    Shapes: ``u [M, K]``, ``v [M, K_lora]``, ``weight [N, K]``, ``lora_a [A, r_max, K_lora]``,
    ``lora_b [A, N, r_max]``, ``scale [A]``, ``residual [M, N]``, ``ranks`` int32 ``[A]``, the four segment
    tensors of a :class:`SegmentInfo`, ``seed`` an int64 0-dim CPU tensor (a tensor, so that a seed drawn
    inside a compiled graph does not break it). Returns ``Y [M, N]`` (dtype of ``u``) and ``H`` (fp32, fp64
    for fp64 ``u``; ``[M, r_block]``), the one intermediate the backward keeps (``dB`` and ``ds`` read it);
    with ``need_h=False`` (no such gradient wanted) ``H`` is ``[M, 0]``.

    A backend with ``merged_linear`` (the native CPU one) computes ``Y`` with each adapter's merged weight
    ``W + s_a B_a A_a`` when there is no dropout and ``V = U`` (see ``NativePrimitives.merged_linear``); then
    ``H`` is computed only when it is needed.
    """
    segments = _segments_from_tensors(seg_indptr, adapter_ids, row_segment, row_adapter, segment_length)
    prims = get_primitives(backend)
    seed = int(seed)
    lora_in = u if v is None else v
    if _merged_path(prims, segments, v, dropout_p):
        h = prims.shrink(u, lora_a, segments, ranks, r_block) if need_h else None
        y = prims.merged_linear(u, weight, bias, lora_a, lora_b, scale, residual, segments, ranks, out_dtype=u.dtype)
    else:
        h = prims.shrink(lora_in, lora_a, segments, ranks, r_block, dropout_p=dropout_p, seed=seed)
        y = prims.fused_gemm(
            u, weight, bias, h, lora_b, scale, residual, segments, ranks,
            out_features=weight.shape[0], out_dtype=u.dtype,
        )
    if not need_h:
        h = u.new_empty((u.shape[0], 0), dtype=accumulation_dtype(u.dtype))
    return y, h


multi_lora_linear_fwd = torch.library.custom_op("monkey_kernels::multi_lora_linear_fwd", mutates_args=())(
    _linear_forward)


def _merged_path(prims, segments: SegmentInfo, v: Optional[torch.Tensor], dropout_p: float) -> bool:
    """Whether ``Y`` (and ``dU``) go through each adapter's merged weight ``W + s B A``: possible only when the
    LoRA reads the GEMM input (``V = U``) undropped, and done by backends with ``merged_linear`` on layouts
    where it pays off."""
    return (v is None and dropout_p == 0.0 and hasattr(prims, "merged_linear")
            and prims.merge_worthwhile(segments))


@multi_lora_linear_fwd.register_fake
def _(u, v, weight, bias, lora_a, lora_b, scale, residual, ranks, seg_indptr, adapter_ids, row_segment,
      row_adapter, segment_length, r_block, dropout_p, seed, backend, need_h=True):
    y = u.new_empty((u.shape[0], weight.shape[0]))
    h = u.new_empty((u.shape[0], r_block if need_h else 0), dtype=accumulation_dtype(u.dtype))
    return y, h


# Gradients the backward op computes, in the order of its outputs; a gradient nobody needs comes back
# as an empty placeholder (op outputs cannot be None).
_OP_GRADS = ("u", "v", "lora_a", "lora_b", "scale")


def _linear_backward(
    grad_out: torch.Tensor, u: torch.Tensor, v: Optional[torch.Tensor], weight: torch.Tensor,
    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor, h: torch.Tensor, ranks: torch.Tensor,
    seg_indptr: torch.Tensor, adapter_ids: torch.Tensor, row_segment: torch.Tensor, row_adapter: torch.Tensor,
    segment_length: int, r_block: int, dropout_p: float, seed: torch.Tensor, backend: str, needs: List[bool],
) -> List[torch.Tensor]:
    r"""Backward of :func:`multi_lora_linear_fwd` for ``U``, ``V``, ``A``, ``B`` and ``s`` (``needs`` says which,
    in that order); ``dW``, ``db`` and ``dR`` are plain PyTorch in the autograd formula.

    With :math:`G_i = dY_i B_a` (the shrink of ``dY``, fp32) and :math:`dH_i = s_a G_i`:

    .. math::
        ds_a = \sum_{i \in a} \langle G_i, H_i \rangle, \quad
        dB_a = s_a \sum_{i \in a} dY_i^\top H_i, \quad
        dA_a = \sum_{i \in a} dH_i^\top (D \odot V)_i,

        dV_i = D_i \odot (dH_i A_a), \quad dU = dY\, W \;(+\, dV \text{ when } V = U), \quad
        dW = dY^\top U, \quad db = \textstyle\sum_i dY_i, \quad dR = dY.

    ``dY W`` and ``dH A_a`` share one fused GEMM (the forward's with ``W^\top`` and ``A_a^\top`` as strided
    views); ``D`` is regenerated from ``seed``, never stored. Without dropout and with ``V = U``, a backend
    with ``merged_linear`` computes :math:`dU_i = dY_i (W + s_a B_a A_a)` instead: the merged weight of the
    forward, transposed (``W^\top + s_a A_a^\top B_a^\top``).
    """
    need_u, need_v, need_a, need_b, need_scale = needs
    segments = _segments_from_tensors(seg_indptr, adapter_ids, row_segment, row_adapter, segment_length)
    prims = get_primitives(backend)
    seed = int(seed)
    dy = grad_out.contiguous()
    num_adapters = lora_a.shape[0]
    k_lora = lora_a.shape[2]
    lora_in = u if v is None else v
    # one placeholder each: outputs of a custom op may not alias one another
    grad_u, grad_v, grad_a, grad_b, grad_scale = (dy.new_empty(0) for _ in range(5))

    merged_du = need_u and _merged_path(prims, segments, v, dropout_p)
    if (need_b or need_scale) and h.shape[1] == 0:
        raise RuntimeError("multi_lora_linear_bwd: dB / dscale wanted but the forward ran with need_h=False")
    need_dh = need_a or need_v or (need_u and not merged_du)
    g = dh = None
    if need_dh or need_scale:
        g = prims.shrink(dy, lora_b.transpose(1, 2), segments, ranks, r_block)
    if need_scale:
        per_row = (g * h).sum(dim=1)
        grad_scale = torch.zeros(num_adapters, device=dy.device, dtype=per_row.dtype)
        grad_scale.index_add_(0, segments.row_adapter.clamp(min=0), per_row)
        grad_scale = grad_scale.to(scale.dtype)
    if need_dh:
        active = segments.row_adapter >= 0
        row_scale = scale.to(g.dtype)[segments.row_adapter.clamp(min=0)]
        # base-only rows borrow adapter 0's scale here; selected away so that an inf scale gives no 0 * inf
        dh = torch.where(active[:, None], g * row_scale[:, None], 0.0)
    if need_a or need_b:
        owned = _owned_rank_columns(segments, ranks, num_adapters, lora_a.shape[1])
    if need_b:
        grad_b = alloc.empty(lora_b.shape, device=lora_b.device, dtype=lora_b.dtype)
        prims.outer(dy, h, segments, grad_b, scale=scale)
        grad_b = torch.where(owned[:, None, :], grad_b, 0.0)
    if need_a:
        grad_a = alloc.empty(lora_a.shape, device=lora_a.device, dtype=lora_a.dtype)
        prims.outer(lora_in, dh, segments, grad_a.transpose(1, 2), dropout_p=dropout_p, seed=seed)
        grad_a = torch.where(owned[:, :, None], grad_a, 0.0)
    if merged_du:
        grad_u = prims.merged_linear(dy, weight.t(), None, lora_b.transpose(1, 2), lora_a.transpose(1, 2), scale,
                                     None, segments, ranks, out_dtype=u.dtype)
    elif v is None:
        if need_u:
            grad_u = prims.fused_gemm(
                dy, weight.t(), None, dh, lora_a.transpose(1, 2), None, None, segments, ranks,
                out_features=k_lora, out_dtype=u.dtype, lora_dropout_p=dropout_p, seed=seed,
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
                out_features=k_lora, out_dtype=v.dtype, lora_dropout_p=dropout_p, seed=seed,
            )
    return [grad_u, grad_v, grad_a, grad_b, grad_scale]


multi_lora_linear_bwd = torch.library.custom_op("monkey_kernels::multi_lora_linear_bwd", mutates_args=())(
    _linear_backward)


def _owned_rank_columns(segments: SegmentInfo, ranks: torch.Tensor, num_adapters: int, r_max: int) -> torch.Tensor:
    """bool ``[num_adapters, r_max]``: rank column ``r`` of adapter ``a`` is live (``r < rank_a`` and ``a`` owns
    rows). dA and dB are selected to exactly 0 elsewhere: the outer products sum whole ``R``-wide rows, where a
    NaN in a row of ``X`` or ``dY`` times the zero columns of ``H`` / ``G`` past the rank would give NaN, and an
    adapter without rows would get ``0 * scale``, NaN for an inf or NaN scale."""
    ids = segments.adapter_ids.to(torch.int64)
    lengths = (segments.seg_indptr[1:] - segments.seg_indptr[:-1]).to(torch.int64)
    rows = torch.zeros(num_adapters, dtype=torch.int64, device=ids.device)
    rows.index_add_(0, ids.clamp(min=0), torch.where(ids >= 0, lengths, 0))
    live = torch.arange(r_max, device=ids.device)[None, :] < ranks.to(device=ids.device, dtype=torch.int64)[:, None]
    return live & (rows > 0)[:, None]


@multi_lora_linear_bwd.register_fake
def _(grad_out, u, v, weight, lora_a, lora_b, scale, h, ranks, seg_indptr, adapter_ids, row_segment,
      row_adapter, segment_length, r_block, dropout_p, seed, backend, needs):
    like = (u, v, lora_a, lora_b, scale)
    return [t.new_empty(t.shape) if want else grad_out.new_empty(0) for want, t in zip(needs, like)]


def _setup_context(ctx, inputs, output):
    (u, v, weight, bias, lora_a, lora_b, scale, residual, ranks, seg_indptr, adapter_ids, row_segment,
     row_adapter, segment_length, r_block, dropout_p, seed, backend, _need_h) = inputs
    _, h = output
    ctx.save_for_backward(u, v, weight, lora_a, lora_b, scale, h, ranks, seg_indptr, adapter_ids, row_segment,
                          row_adapter, seed)
    ctx.options = (segment_length, r_block, dropout_p, backend)


def _backward(ctx, grad_out, grad_h, backward_op=None):
    (u, v, weight, lora_a, lora_b, scale, h, ranks, seg_indptr, adapter_ids, row_segment,
     row_adapter, seed) = ctx.saved_tensors
    segment_length, r_block, dropout_p, backend = ctx.options
    need = ctx.needs_input_grad
    need_u, need_v, need_w, need_bias, need_a, need_b, need_scale, need_res = need[:8]
    wanted = [need_u, need_v and v is not None, need_a, need_b, need_scale]
    grads = [None] * len(_OP_GRADS)
    if any(wanted):
        computed = (backward_op or multi_lora_linear_bwd)(
            grad_out, u, v, weight, lora_a, lora_b, scale, h, ranks, seg_indptr, adapter_ids, row_segment,
            row_adapter, segment_length, r_block, dropout_p, seed, backend, wanted,
        )
        grads = [g if want else None for want, g in zip(wanted, computed)]
    grad_u, grad_v, grad_a, grad_b, grad_scale = grads
    grad_w = grad_out.t().mm(u) if need_w else None
    grad_bias = grad_out.sum(dim=0) if need_bias else None
    grad_res = grad_out if need_res else None
    return (grad_u, grad_v, grad_w, grad_bias, grad_a, grad_b, grad_scale, grad_res) + (None,) * 11


multi_lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerMultiLoRALinear(torch.autograd.Function):
    """The custom op pair above as a plain autograd.Function for eager calls: the same forward, backward and
    saved tensors, without torch.library's dispatch (about 0.1 ms a call on CPU, as much as a whole small
    layer). ``torch.compile`` and fake / meta tensors go through the custom ops instead (see
    :func:`multi_lora_linear`)."""

    @staticmethod
    def forward(ctx, *inputs):
        y, h = _linear_forward(*inputs)
        _setup_context(ctx, inputs, (y, h))
        return y

    @staticmethod
    def backward(ctx, grad_out):
        return _backward(ctx, grad_out, None, backward_op=_linear_backward)


def _through_custom_op(tensor: torch.Tensor) -> bool:
    """Whether the call must go through the custom op (traced by torch.compile, or tensors without values)."""
    return torch.compiler.is_compiling() or tensor.is_meta or torch._subclasses.fake_tensor.is_fake(tensor)


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------
def _seed_tensor(seed, dropout_p: float) -> torch.Tensor:
    """The dropout seed as the int64 0-dim CPU tensor the ops take (drawn when ``None`` and dropout is on)."""
    if seed is None:
        if dropout_p > 0.0:
            return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
        return torch.zeros((), dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        if seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool or seed.numel() != 1:
            raise ValueError(f"seed must be an int or a one-element integer tensor, got {seed.dtype} "
                             f"{tuple(seed.shape)}")
        if seed.device.type != "cpu":
            raise ValueError(f"seed must be a CPU tensor (read on the host by the ops), got one on {seed.device}")
        seed = seed.reshape(()).to(torch.int64)
        if not torch.compiler.is_compiling() and not 0 <= int(seed) < 2**31:
            raise ValueError(f"seed must be in [0, 2**31), got {int(seed)}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
    return torch.tensor(seed, dtype=torch.int64)


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
    # Reading values back is illegal inside CUDA-graph capture and a graph break under torch.compile.
    if not (checked or capturing or torch.compiler.is_compiling()):
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
    seed: Optional[Union[int, torch.Tensor]] = None,
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
        seed: dropout seed, an int in ``[0, 2**31)`` or a one-element integer CPU tensor holding one (what a
            compiled graph can draw without a graph break); ``None`` draws one from PyTorch's default CPU
            generator (so ``torch.manual_seed`` makes runs repeatable).
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
    seed = _seed_tensor(seed, dropout_p)

    M = math.prod(lead)
    if not isinstance(segments, SegmentInfo):
        # Unordered or scalar containers would be misread as ids (a dict iterates its keys).
        if isinstance(segments, (str, bytes, dict, set)) or not hasattr(segments, "__iter__"):
            raise ValueError(f"segments must be a SegmentInfo or adapter ids [batch] (a list or an integer tensor), "
                             f"got {type(segments).__name__}")
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
    if isinstance(ranks, torch.Tensor) and ranks.is_meta and not input.is_meta:
        raise ValueError(f"ranks is on meta (no values), expected {device} (the device of input) or the CPU")
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
    # The kernels index bias and scale as dense vectors (no stride argument): an expanded (stride-0) or
    # strided bias / scale gave wrong sums. Both are tiny, so a copy when needed costs nothing.
    bias = bias.contiguous() if bias is not None else None
    scale = scale.contiguous()
    from triton_kernels.multi_lora import rank_block  # noqa: PLC0415 (triton is optional for the torch path)

    r_block = rank_block(max(r_max, 1))
    # H serves dB and dscale only; inference (and frozen B and scale) need not keep it.
    need_h = torch.is_grad_enabled() and (lora_b.requires_grad or scale.requires_grad)
    op_inputs = (
        u, v, weight, bias, lora_a, lora_b, scale, res, ranks_t, segments.seg_indptr, segments.adapter_ids,
        segments.row_segment, segments.row_adapter,
        _NO_LENGTH if segments.segment_length is None else segments.segment_length,
        r_block, dropout_p, seed, backend, need_h,
    )
    if _through_custom_op(u):
        y, _ = multi_lora_linear_fwd(*op_inputs)
    else:
        y = _EagerMultiLoRALinear.apply(*op_inputs)
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
