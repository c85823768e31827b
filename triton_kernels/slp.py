"""One-pass assembly of ``inputs_embeds`` for LayTextLLM / Monkey style models (Triton kernel + launcher).

Every token ``t`` of the flattened ``[B * S]`` sequence has a kind and a source index, built beforehand
by ``monkey_kernels.ops.slp.checks.build_token_index`` (cumsums in torch, no host synchronisation):

    kind[t] = ZERO  (0): out[t] = 0                                       (padding id -1, surplus placeholders)
    kind[t] = TEXT  (1): out[t] = table[src[t]]                           (src = the token id)
    kind[t] = BOX   (2): out[t] = W @ c + b,  c = boxes[b, k] / (w, h, w, h)[b]   (src = b * N + k; rounded to
                         the weight's dtype with ROUND_BOX: the reference's nn.Linear output under autocast)
    kind[t] = IMAGE (3): out[t] = features[b, j]                          (src = b * n_image + j)

so each output row is written exactly once and nothing is written in place. The 4-wide projection is four
FMAs per element in fp32 (no ``tl.dot``: a K=4 product would waste the tensor cores and, in Triton's
interpreter, ``tl.dot`` on bf16 is wrong); text and image rows are copied exactly.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from monkey_kernels.ops import alloc
from monkey_kernels.ops.layout import KIND_BOX, KIND_IMAGE, KIND_TEXT, KIND_ZERO

from .env import install_interpreter_compat, interpreter_active

install_interpreter_compat()

__all__ = ["KIND_ZERO", "KIND_TEXT", "KIND_BOX", "KIND_IMAGE", "slp_embed_forward", "interpreter_active"]

# The kernel compares row kinds against these compile-time constants (Triton reads globals only as constexpr).
_TEXT: tl.constexpr = tl.constexpr(KIND_TEXT)
_BOX: tl.constexpr = tl.constexpr(KIND_BOX)
_IMAGE: tl.constexpr = tl.constexpr(KIND_IMAGE)



# ---------------------------------------------------------------------------------------------------------
# OUT[T, H] (dtype of the table) from kind[T], src[T] (int32 / int64), table[V, H], boxes[B, N, 4],
# page_sizes[B, 2] (optional), W[H, 4], bias[H] (optional), features[B, n_image, H] (optional).
# Grid: (cdiv(T, BLOCK_T), cdiv(H, BLOCK_H)); every program writes its whole [BLOCK_T, BLOCK_H] tile once.
# ---------------------------------------------------------------------------------------------------------
def _embed_configs():
    if interpreter_active():
        return [triton.Config({"BLOCK_T": 8, "BLOCK_H": 32}, num_warps=4)]
    # Few rows and wide column blocks: each row is a contiguous gather, so wide blocks give long coalesced
    # transactions; several rows per program amortise the W/bias loads.
    return [
        triton.Config({"BLOCK_T": bt, "BLOCK_H": bh}, num_warps=w)
        for bt, bh, w in [(1, 1024, 4), (2, 1024, 4), (4, 512, 4), (4, 1024, 8), (8, 512, 8), (2, 2048, 8),
                          (8, 256, 4), (16, 256, 8)]
    ]


@triton.autotune(configs=_embed_configs(), key=["H", "HAS_SIZES", "HAS_BIAS", "HAS_IMAGE", "ROUND_BOX"],
                 cache_results=True)
@triton.jit
def _slp_embed_kernel(
    out_ptr, kind_ptr, src_ptr, table_ptr, boxes_ptr, sizes_ptr, w_ptr, bias_ptr, feat_ptr,
    T, H, N_BOXES, N_IMAGE,
    stride_tv, stride_th,
    stride_bb, stride_bn, stride_bc,
    stride_sb, stride_sc,
    stride_wh, stride_wc, stride_bias,
    stride_fb, stride_fn, stride_fh,
    stride_ot, stride_oh,
    HAS_SIZES: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IMAGE: tl.constexpr, ROUND_BOX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < T
    col_ok = cols < H
    kind = tl.load(kind_ptr + rows, mask=row_ok, other=0)
    src = tl.load(src_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    tile_ok = row_ok[:, None] & col_ok[None, :]

    # Masked-off lanes issue no memory traffic: each row reads only its own source.
    is_text = (kind == _TEXT) & row_ok
    acc = tl.load(
        table_ptr + src[:, None] * stride_tv + cols[None, :] * stride_th,
        mask=is_text[:, None] & col_ok[None, :],
        other=0.0,
    ).to(tl.float32)

    is_box = (kind == _BOX) & row_ok
    box_b = src // N_BOXES
    box_k = src - box_b * N_BOXES
    box_base = boxes_ptr + box_b * stride_bb + box_k * stride_bn
    c0 = tl.load(box_base, mask=is_box, other=0.0).to(tl.float32)
    c1 = tl.load(box_base + stride_bc, mask=is_box, other=0.0).to(tl.float32)
    c2 = tl.load(box_base + 2 * stride_bc, mask=is_box, other=0.0).to(tl.float32)
    c3 = tl.load(box_base + 3 * stride_bc, mask=is_box, other=0.0).to(tl.float32)
    if HAS_SIZES:
        page_w = tl.load(sizes_ptr + box_b * stride_sb, mask=is_box, other=1.0).to(tl.float32)
        page_h = tl.load(sizes_ptr + box_b * stride_sb + stride_sc, mask=is_box, other=1.0).to(tl.float32)
        c0 = c0 / page_w
        c1 = c1 / page_h
        c2 = c2 / page_w
        c3 = c3 / page_h
    w_cols = w_ptr + cols * stride_wh
    w0 = tl.load(w_cols, mask=col_ok, other=0.0).to(tl.float32)
    w1 = tl.load(w_cols + stride_wc, mask=col_ok, other=0.0).to(tl.float32)
    w2 = tl.load(w_cols + 2 * stride_wc, mask=col_ok, other=0.0).to(tl.float32)
    w3 = tl.load(w_cols + 3 * stride_wc, mask=col_ok, other=0.0).to(tl.float32)
    z = c0[:, None] * w0[None, :] + c1[:, None] * w1[None, :] + c2[:, None] * w2[None, :] + c3[:, None] * w3[None, :]
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols * stride_bias, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ROUND_BOX:
        z = z.to(w_ptr.dtype.element_ty).to(tl.float32)
    acc = tl.where(is_box[:, None], z, acc)

    if HAS_IMAGE:
        is_image = (kind == _IMAGE) & row_ok
        img_b = src // N_IMAGE
        img_j = src - img_b * N_IMAGE
        feat = tl.load(
            feat_ptr + (img_b * stride_fb + img_j * stride_fn)[:, None] + cols[None, :] * stride_fh,
            mask=is_image[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = tl.where(is_image[:, None], feat, acc)

    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * stride_ot + cols[None, :] * stride_oh,
        acc.to(out_ptr.dtype.element_ty),
        mask=tile_ok,
    )


def slp_embed_forward(
    kind: torch.Tensor,
    src: torch.Tensor,
    table: torch.Tensor,
    boxes: torch.Tensor,
    page_sizes: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    image_features: Optional[torch.Tensor],
    box_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``inputs_embeds`` rows ``[T, H]`` in the dtype of ``table`` (see the module docstring for the math).

    Args (already validated by ``monkey_kernels.ops.slp.slp_embed``; any strides):
        kind: int32 ``[T]`` (0 zero, 1 text, 2 box, 3 image).
        src: int32/int64 ``[T]``: token id, ``b * N + k`` or ``b * n_image + j`` by kind.
        table: ``[V, H]``.
        boxes: ``[B, N, 4]`` with ``N >= 1`` (a dummy ``[1, 1, 4]`` when there are no boxes).
        page_sizes: ``[B, 2]`` ``(w, h)`` or ``None`` (boxes already normalized).
        weight: the SLP's ``[H, 4]``; bias ``[H]`` or ``None``.
        image_features: ``[B, n_image, H]`` (``n_image >= 1``) or ``None``.
        box_dtype: ``None``, or the dtype of ``weight``: the box rows are rounded to it before they are written
            (autocast: the reference's ``nn.Linear`` output).
    """
    if box_dtype is not None and box_dtype != weight.dtype:
        raise ValueError(f"box_dtype must be None or the dtype of weight ({weight.dtype}), got {box_dtype}")
    T = kind.shape[0]
    H = table.shape[1]
    out = alloc.empty((T, H), device=table.device, dtype=table.dtype)
    if T == 0 or H == 0:
        return out
    sizes = page_sizes if page_sizes is not None else boxes
    feat = image_features if image_features is not None else out.view(1, T, H)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(H, meta["BLOCK_H"]))  # noqa: E731
    _slp_embed_kernel[grid](
        out, kind, src, table, boxes, sizes, weight, bias if bias is not None else weight, feat,
        T, H, boxes.shape[1], feat.shape[1],
        table.stride(0), table.stride(1),
        boxes.stride(0), boxes.stride(1), boxes.stride(2),
        sizes.stride(0), sizes.stride(1),
        weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0,
        feat.stride(0), feat.stride(1), feat.stride(2),
        out.stride(0), out.stride(1),
        HAS_SIZES=page_sizes is not None, HAS_BIAS=bias is not None, HAS_IMAGE=image_features is not None,
        ROUND_BOX=box_dtype is not None,
    )
    return out
