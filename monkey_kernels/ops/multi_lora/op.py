"""The segmented multi-LoRA linear as a PyTorch custom op pair with fake implementations and a registered
autograd formula (``torch.ops.monkey_kernels.multi_lora_linear_fwd`` / ``_bwd``), and its eager twin.

Both ops take flattened, validated rows (see :mod:`.checks`) and run the backend's implementation
(:func:`monkey_kernels.ops.backends.implementation`, a :class:`~monkey_kernels.ops.registry.MultiLoRABackend`):
``shrink``, ``fused_gemm``, ``outer`` and, on backends with ``supports_merged_weights``, ``merged_linear``.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch

from monkey_kernels.ops import alloc
from monkey_kernels.ops.segments import SegmentInfo

from ..autocast import HALF_DTYPES, autocast_excluded, cast_for_autocast, register_autocast
from ..backends import implementation
from ..checks import accumulation_dtype
from ..custom import eager_function, refuse_second_derivative, second_derivative_message
from ..registry import MultiLoRABackend

__all__ = ["multi_lora_linear_fwd", "multi_lora_linear_bwd", "EagerMultiLoRALinear", "NO_LENGTH"]

NO_LENGTH = -1  # ``segment_length`` of ragged segments in the op schemas (ints only, no ``None``)


def _segments_from_tensors(seg_indptr, adapter_ids, row_segment, row_adapter, segment_length: int) -> SegmentInfo:
    """The :class:`SegmentInfo` an op was given as its tensors (validated by the caller before the op): a custom
    op's schema takes tensors and scalars only, so the metadata crosses it as its four tensors."""
    return SegmentInfo(
        seg_indptr=seg_indptr, adapter_ids=adapter_ids, row_segment=row_segment, row_adapter=row_adapter,
        num_rows=row_segment.shape[0], num_segments=adapter_ids.shape[0], max_adapter_id=None,
        segment_length=None if segment_length == NO_LENGTH else segment_length,
    )


def _has_lora(lora_a: torch.Tensor) -> bool:
    """Whether there is any LoRA term at all (``num_adapters = 0`` or ``r_max = 0``: the base GEMM only)."""
    return lora_a.shape[0] > 0 and lora_a.shape[1] > 0


def _rounded_like_reference(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The fp32 intermediate ``h`` rounded to ``dtype`` when that is a half type (values, range and overflow to
    inf), kept in fp32: a reference LoRA module in ``dtype`` holds ``lora_a(x)`` in ``dtype``; fp32 / fp64 stay."""
    if dtype not in HALF_DTYPES:
        return h
    return h.to(dtype).to(h.dtype)


def _linear_forward(
    u: torch.Tensor, v: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor, residual: Optional[torch.Tensor],
    ranks: torch.Tensor, seg_indptr: torch.Tensor, adapter_ids: torch.Tensor, row_segment: torch.Tensor,
    row_adapter: torch.Tensor, segment_length: int, r_block: int, dropout_p: float, seed: torch.Tensor, backend: str,
    need_h: bool = True, out_dtype: Optional[torch.dtype] = None,
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
    inside a compiled graph does not break it), ``residual`` of any float dtype (added to the accumulator).
    Returns ``Y [M, N]`` of ``out_dtype`` (``None``: the dtype of ``u``) and ``H`` (fp32, fp64 for fp64 ``u``;
    ``[M, r_block]``), the one intermediate the backward keeps (``dB`` and ``ds`` read it); with
    ``need_h=False`` (no such gradient wanted) ``H`` is ``[M, 0]``. For half ``u``, ``H`` holds values rounded to
    that dtype (as a reference's ``lora_a(x)`` in that dtype), and ``Y`` is computed from them.

    A backend with ``supports_merged_weights`` (the native CPU one) computes ``Y`` with each adapter's merged weight
    ``W + s_a B_a A_a`` when there is no dropout, ``V = U`` and ``u`` is fp32 / fp64 (see
    ``native_impl.NativeMultiLoRA.merged_linear``), and ``H`` (only when it is needed) in the same pass over ``U``.

    Runs with autocast off (:func:`~monkey_kernels.ops.autocast.autocast_excluded`): the caller applied the policy.
    """
    # no frame of its own (the frames from a patched block down to a kernel are counted: tests/tools)
    seed, out_dtype = int(seed), u.dtype if out_dtype is None else out_dtype
    with autocast_excluded():
        segments = _segments_from_tensors(seg_indptr, adapter_ids, row_segment, row_adapter, segment_length)
        prims = implementation("multi_lora", backend)
        lora_in = u if v is None else v
        if not _has_lora(lora_a):
            y = prims.fused_gemm(u, weight, bias, None, None, None, residual, segments, ranks,
                                 out_features=weight.shape[0], out_dtype=out_dtype)
            return y, u.new_zeros((u.shape[0], r_block if need_h else 0), dtype=accumulation_dtype(u.dtype))
        if _merged_path(prims, segments, v, dropout_p, u.dtype):
            # H comes out of the same pass over U as Y (segment by segment, while U is in cache)
            y, h, _ = prims.merged_linear(u, weight, bias, lora_a, lora_b, scale, residual, segments, ranks,
                                          out_dtype=out_dtype, r_block=r_block if need_h else 0)
        else:
            h = prims.shrink(lora_in, lora_a, segments, ranks, r_block, dropout_p=dropout_p, seed=seed)
            h = _rounded_like_reference(h, u.dtype)
            y = prims.fused_gemm(
                u, weight, bias, h, lora_b, scale, residual, segments, ranks,
                out_features=weight.shape[0], out_dtype=out_dtype,
            )
        if not need_h:
            h = u.new_empty((u.shape[0], 0), dtype=accumulation_dtype(u.dtype))
        return y, h


multi_lora_linear_fwd = torch.library.custom_op("monkey_kernels::multi_lora_linear_fwd", mutates_args=())(
    _linear_forward)


def _merged_path(prims: MultiLoRABackend, segments: SegmentInfo, v: Optional[torch.Tensor], dropout_p: float,
                 dtype: torch.dtype) -> bool:
    """Whether ``Y`` (and ``dU``) go through each adapter's merged weight ``W + s B A``: possible only when the
    LoRA reads the GEMM input (``V = U``) undropped and the intermediate is not rounded (fp32 / fp64: a merged
    weight never forms ``H`` or ``s dY B``, which half inputs round), and done by backends with
    ``supports_merged_weights`` on layouts where it pays off."""
    return (v is None and dropout_p == 0.0 and dtype not in HALF_DTYPES and prims.supports_merged_weights
            and prims.merge_worthwhile(segments))


@multi_lora_linear_fwd.register_fake
def _(u, v, weight, bias, lora_a, lora_b, scale, residual, ranks, seg_indptr, adapter_ids, row_segment,
      row_adapter, segment_length, r_block, dropout_p, seed, backend, need_h=True, out_dtype=None):
    y = u.new_empty((u.shape[0], weight.shape[0]), dtype=u.dtype if out_dtype is None else out_dtype)
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
    in that order); ``dW``, ``db`` and ``dR`` are plain PyTorch in the autograd formula. ``grad_out`` is ``dY`` in
    the compute dtype (the dtype of ``u``; the formula rounds an fp32 gradient of a promoted output to it, as a
    reference's ``F.linear`` receives it).

    With :math:`G_i = dY_i B_a` (the shrink of ``dY``, fp32) and :math:`dH_i = s_a G_i` (never formed: the
    ops reading it take ``s`` as their scale):

    .. math::
        ds_a = \sum_{i \in a} \langle G_i, H_i \rangle, \quad
        dB_a = s_a \sum_{i \in a} dY_i^\top H_i, \quad
        dA_a = \sum_{i \in a} dH_i^\top (D \odot V)_i,

        dV_i = D_i \odot (dH_i A_a), \quad dU = dY\, W \;(+\, dV \text{ when } V = U), \quad
        dW = dY^\top U, \quad db = \textstyle\sum_i dY_i, \quad dR = dY.

    ``dY W`` and ``dH A_a`` share one fused GEMM (the forward's with ``W^\top`` and ``A_a^\top`` as strided
    views); ``D`` is regenerated from ``seed``, never stored. Without dropout and with ``V = U``, a backend
    with ``merged_linear`` computes :math:`dU_i = dY_i (W + s_a B_a A_a)` instead: the merged weight of the
    forward, transposed (``W^\top + s_a A_a^\top B_a^\top``), with ``G`` and ``dB`` from the same pass over ``dY``.

    For half ``u`` the gradient reaching the LoRA intermediate, :math:`dH = s_a G`, is formed and rounded to that
    dtype (a reference LoRA module in that dtype holds it so: an fp16 overflow there is an inf here too), and
    ``dA``, ``dV`` read it unscaled; ``ds`` reads the unrounded fp32 ``G``.
    """
    with autocast_excluded():  # no frame of its own (see the forward)
        need = _Needs(*needs)
        p = _BackwardPass(implementation("multi_lora", backend),
                          _segments_from_tensors(seg_indptr, adapter_ids, row_segment, row_adapter, segment_length),
                          ranks, scale, r_block, dropout_p, int(seed))
        dy = grad_out.contiguous()
        if not _has_lora(lora_a):  # no adapter, or rank 0: the LoRA terms and their gradients are zero
            return _base_only_gradients(p, need, dy, u, v, weight, lora_a, lora_b)
        if (need.b or need.scale) and h.shape[1] == 0:
            raise RuntimeError("multi_lora_linear_bwd: dB / dscale wanted but the forward ran with need_h=False")
        merged = need.u and _merged_path(p.prims, p.segments, v, dropout_p, u.dtype)
        need_g = need.a or need.v or need.scale or (need.u and not merged)
        g, merged_u, merged_b = _shrink_grad_out(p, need, dy, weight, lora_a, lora_b, h, u.dtype, merged, need_g)
        grad_scale = _scale_gradient(p, g, h, lora_a.shape[0]) if need.scale else None
        # dH = s G, and the scale the kernels reading it apply (None: dH formed here, rounded like the reference's)
        dh, dh_scale = g, p.scale
        if g is not None and u.dtype in HALF_DTYPES and (need.a or need.v or (need.u and not merged)):
            dh, dh_scale = _rounded_lora_gradient(p, g, u.dtype), None
        grad_a, outer_b = _adapter_gradients(p, need, dy, h, dh, dh_scale, u if v is None else v, lora_a, lora_b,
                                             need_b=need.b and not merged)
        grad_u, grad_v = _input_gradients(p, need, dy, weight, dh, dh_scale, lora_a, u, v, merged)
        grads = (merged_u if merged else grad_u, grad_v, grad_a, merged_b if merged else outer_b, grad_scale)
        # one placeholder each for the gradients not computed: outputs of a custom op may not alias one another
        return [t if t is not None else dy.new_empty(0) for t in grads]


class _Needs(NamedTuple):
    """Which gradients the backward op computes (its ``needs``, in the order of :data:`_OP_GRADS`)."""

    u: bool
    v: bool
    a: bool
    b: bool
    scale: bool


class _BackwardPass(NamedTuple):
    """What every step of one backward call shares: the backend, the segments, the ranks and scale, and the
    dropout of the LoRA input (its mask regenerated from ``seed``)."""

    prims: MultiLoRABackend
    segments: SegmentInfo
    ranks: torch.Tensor
    scale: torch.Tensor
    r_block: int
    dropout_p: float
    seed: int


def _base_only_gradients(p: _BackwardPass, need: _Needs, dy, u, v, weight, lora_a, lora_b) -> List[torch.Tensor]:
    """No LoRA term at all: ``dU = dY W``, the other gradients zero (placeholders where not needed)."""
    grad_u = dy.new_empty(0)
    if need.u:
        grad_u = p.prims.fused_gemm(dy, weight.t(), None, None, None, None, None, p.segments, p.ranks,
                                    out_features=weight.shape[1], out_dtype=u.dtype)
    zeros = [torch.zeros_like(t) if want and t is not None else dy.new_empty(0)
             for want, t in ((need.v, v), (need.a, lora_a), (need.b, lora_b), (need.scale, p.scale))]
    return [grad_u] + zeros


def _shrink_grad_out(p: _BackwardPass, need: _Needs, dy, weight, lora_a, lora_b, h, out_dtype, merged: bool,
                     need_g: bool):
    """``(G, dU, dB)``: ``G = dY B_a`` (fp32; ``None`` unless ``need_g``). On the merged path ``dU`` (``dY`` times
    the transposed merged weight) and ``dB`` (when needed) come out of the same pass over ``dY``, segment by
    segment while it is in cache; otherwise they are ``None`` here.

    ``dH = s_a G`` is never formed: the ops that read it take the scale (``dA = s_a sum G^T V``,
    ``dV = s_a G A_a``) and skip base-only rows, so an inf scale meets no 0 of a row without an adapter."""
    if merged:
        grad_u, g, grad_b = p.prims.merged_linear(
            dy, weight.t(), None, lora_b.transpose(1, 2), lora_a.transpose(1, 2), p.scale, None, p.segments, p.ranks,
            out_dtype=out_dtype, r_block=p.r_block if need_g else 0, outer_y=h if need.b else None)
        return (g if need_g else None), grad_u, (grad_b if need.b else None)
    g = p.prims.shrink(dy, lora_b.transpose(1, 2), p.segments, p.ranks, p.r_block) if need_g else None
    return g, None, None


def _rounded_lora_gradient(p: _BackwardPass, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``dH = s_a G`` rounded to the half ``dtype`` (kept fp32), exactly 0 on base-only rows and past each rank
    (selected: an inf scale times the zeros there would be NaN)."""
    row_adapter = p.segments.row_adapter.to(torch.int64)
    adapter = row_adapter.clamp(min=0)
    row_rank = torch.where(row_adapter >= 0, p.ranks.to(torch.int64)[adapter], 0)
    live = torch.arange(g.shape[1], device=g.device)[None, :] < row_rank[:, None]
    scaled = g * p.scale.to(g.dtype)[adapter][:, None]
    return torch.where(live, _rounded_like_reference(scaled, dtype), 0.0)


def _scale_gradient(p: _BackwardPass, g: torch.Tensor, h: torch.Tensor, num_adapters: int) -> torch.Tensor:
    """``ds_a = sum over rows of a of <G_i, H_i>`` in the dtype of ``scale``."""
    per_row = (g * h).sum(dim=1)
    grad = torch.zeros(num_adapters, device=g.device, dtype=per_row.dtype)
    grad.index_add_(0, p.segments.row_adapter.clamp(min=0), per_row)
    return grad.to(p.scale.dtype)


def _adapter_gradients(p: _BackwardPass, need: _Needs, dy, h, dh, dh_scale, lora_in, lora_a, lora_b, need_b: bool):
    """``(dA, dB)`` by the grouped outer products (``None`` where not wanted): ``dB_a = s_a sum dY^T H`` and
    ``dA_a = sum dH^T drop(V)`` with ``dH = dh_scale_a * dh`` (``dh_scale`` the scale, or ``None`` for a ``dh``
    already scaled; written transposed, ``[A, K, R]`` views). Both are exactly 0 past each rank
    and for adapters without rows: written so by a backend with ``outer_zeroes_unowned``, selected here
    otherwise (see :func:`_owned_rank_columns`)."""
    if not (need.a or need_b):
        return None, None
    exact = p.prims.outer_zeroes_unowned
    rank_kwargs = {"ranks": p.ranks} if exact else {}
    owned = None if exact else _owned_rank_columns(p.segments, p.ranks, lora_a.shape[0], lora_a.shape[1])
    grad_a = grad_b = None
    if need_b:
        grad_b = alloc.empty(lora_b.shape, device=lora_b.device, dtype=lora_b.dtype)
        p.prims.outer(dy, h, p.segments, grad_b, scale=p.scale, **rank_kwargs)
        if owned is not None:
            grad_b = torch.where(owned[:, None, :], grad_b, 0.0)
    if need.a:
        grad_a = alloc.empty(lora_a.shape, device=lora_a.device, dtype=lora_a.dtype)
        p.prims.outer(lora_in, dh, p.segments, grad_a.transpose(1, 2), scale=dh_scale, dropout_p=p.dropout_p,
                      seed=p.seed, **rank_kwargs)
        if owned is not None:
            grad_a = torch.where(owned[:, :, None], grad_a, 0.0)
    return grad_a, grad_b


def _input_gradients(p: _BackwardPass, need: _Needs, dy, weight, dh, dh_scale, lora_a, u, v, merged: bool):
    """``(dU, dV)`` by the fused GEMM (``None`` where not wanted, or for ``dU`` on the merged path, which computed
    it with ``G``): with ``V = U`` one GEMM ``dY W + drop(dH A_a)``; with a separate LoRA input ``dU = dY W``
    and ``dV = drop(dH A_a)`` (``dH = dh_scale_a * dh``, see :func:`_adapter_gradients`). ``W^T`` and ``A_a^T``
    are strided views; the dropout mask is regenerated."""
    expand, k_lora = lora_a.transpose(1, 2), lora_a.shape[2]
    lora_terms = dict(dropout_p=p.dropout_p, seed=p.seed)
    grad_u = grad_v = None
    if v is None:
        if need.u and not merged:
            grad_u = p.prims.fused_gemm(dy, weight.t(), None, dh, expand, dh_scale, None, p.segments, p.ranks,
                                        out_features=k_lora, out_dtype=u.dtype, **lora_terms)
        return grad_u, grad_v
    if need.u:
        grad_u = p.prims.fused_gemm(dy, weight.t(), None, None, None, None, None, p.segments, p.ranks,
                                    out_features=weight.shape[1], out_dtype=u.dtype)
    if need.v:
        grad_v = p.prims.fused_gemm(None, None, None, dh, expand, dh_scale, None, p.segments, p.ranks,
                                    out_features=k_lora, out_dtype=v.dtype, **lora_terms)
    return grad_u, grad_v


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
     row_adapter, segment_length, r_block, dropout_p, seed, backend, _need_h, _out_dtype) = inputs
    _, h = output
    ctx.save_for_backward(u, v, weight, lora_a, lora_b, scale, h, ranks, seg_indptr, adapter_ids, row_segment,
                          row_adapter, seed)
    ctx.options = (segment_length, r_block, dropout_p, backend, None if residual is None else residual.dtype)


def _gradients(ctx, grad_out, backward_op):
    """The autograd formula of both paths (``backward_op``: the backward custom op, or its implementation for the
    eager twin): the op's gradients from ``backward_op``, ``dW``, ``db`` and ``dR`` here; ``dY`` rounded to the
    compute dtype for all but ``dR`` (the reference's ``F.linear`` gets it so when its output was promoted)."""
    (u, v, weight, lora_a, lora_b, scale, h, ranks, seg_indptr, adapter_ids, row_segment,
     row_adapter, seed) = ctx.saved_tensors
    segment_length, r_block, dropout_p, backend, residual_dtype = ctx.options
    need = ctx.needs_input_grad
    need_u, need_v, need_w, need_bias, need_a, need_b, need_scale, need_res = need[:8]
    wanted = [need_u, need_v and v is not None, need_a, need_b, need_scale]
    grads = [None] * len(_OP_GRADS)
    with autocast_excluded():
        dy = grad_out if grad_out.dtype == u.dtype else grad_out.to(u.dtype)
        if any(wanted):
            computed = backward_op(
                dy, u, v, weight, lora_a, lora_b, scale, h, ranks, seg_indptr, adapter_ids, row_segment,
                row_adapter, segment_length, r_block, dropout_p, seed, backend, wanted,
            )
            grads = [g if want else None for want, g in zip(wanted, computed)]
        grad_u, grad_v, grad_a, grad_b, grad_scale = grads
        grad_w = dy.t().mm(u) if need_w else None
        grad_bias = dy.sum(dim=0) if need_bias else None
        grad_res = grad_out.to(residual_dtype) if need_res else None
    return (grad_u, grad_v, grad_w, grad_bias, grad_a, grad_b, grad_scale, grad_res) + (None,) * 12


_SECOND_DERIVATIVE = second_derivative_message("multi_lora_linear")


def _autograd_backward(ctx, grad_out, grad_h):
    create_graph = torch.is_grad_enabled()
    with torch.no_grad():
        grads = _gradients(ctx, grad_out, multi_lora_linear_bwd)
    if create_graph:
        return refuse_second_derivative(grads, (grad_out,) + tuple(ctx.saved_tensors), _SECOND_DERIVATIVE)
    return grads


multi_lora_linear_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


def _autocast_arguments(args: tuple, dtype: torch.dtype, device_type: str) -> tuple:
    """The op's autocast policy for a direct call of the forward custom op (the public function applies the same
    casts itself): ``u``, ``v``, ``weight``, ``bias``, ``lora_a``, ``lora_b`` to ``dtype``; ``scale``, ``residual``
    and the metadata unchanged; the output dtype, unless given, that of ``F.linear(...) + residual``."""
    args = list(args) + [None] * (20 - len(args))  # the defaults of need_h and out_dtype
    if args[18] is None:
        args[18] = True
    for index in range(6):  # u, v, weight, bias, lora_a, lora_b
        args[index] = cast_for_autocast(args[index], dtype, device_type)
    residual, u = args[7], args[0]
    if args[19] is None and residual is not None:
        args[19] = torch.promote_types(u.dtype, residual.dtype)
    return tuple(args)


register_autocast(multi_lora_linear_fwd, _autocast_arguments)

#: The eager twin of the op pair (see :mod:`monkey_kernels.ops.custom`): same forward, formula and saved tensors.
EagerMultiLoRALinear = eager_function("multi_lora_linear", _linear_forward, _setup_context,
                                      lambda ctx, grad_out: _gradients(ctx, grad_out, _linear_backward))
