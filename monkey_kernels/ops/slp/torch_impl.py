"""The SLP embedding assembly in vectorized PyTorch (any device; the ``torch`` backend), and the PyTorch
backward that the ``triton`` backend (and ``native`` on CUDA) share.

Shapes: ``kind`` int32 ``[T]`` and ``src`` int64 ``[T]`` (see :class:`~.checks.TokenIndex`), ``table [V, H]``,
``boxes [B, N, 4]``, ``page_sizes [B, 2]`` or ``None``, ``weight [H, 4]``, ``bias [H]`` or ``None``,
``image_features [B, n_image, H]`` or ``None``.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from monkey_kernels.ops.layout import KIND_BOX, KIND_IMAGE, KIND_TEXT

from ..checks import accumulation_dtype
from ..registry import register_backend

__all__ = ["TorchSLP", "IMPLEMENTATION", "torch_forward", "torch_backward", "normalized_boxes", "source_rows",
           "gather_rows"]


def normalized_boxes(boxes: torch.Tensor, page_sizes: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``boxes / (w, h, w, h)`` (or ``boxes`` when ``page_sizes`` is None) in ``dtype``."""
    c = boxes.to(dtype)
    if page_sizes is not None:
        size = page_sizes.to(dtype)
        c = c / torch.cat([size, size], dim=-1).unsqueeze(1)
    return c


def source_rows(kind: torch.Tensor, src: torch.Tensor, wanted: int, num_slots: int) -> torch.Tensor:
    """int64 ``[num_slots]``: for each box slot (or feature row), the token row that uses it, or ``T`` if none.

    Each slot is used by at most one token, so the scatter is deterministic; tokens of other kinds all
    land on the extra slot ``num_slots``, which is dropped. No host synchronisation.
    """
    T = kind.shape[0]
    pos = torch.full((num_slots + 1,), T, dtype=torch.int64, device=kind.device)
    slot = torch.where(kind == wanted, src, num_slots)
    pos.scatter_(0, slot, torch.arange(T, dtype=torch.int64, device=kind.device))
    return pos[:num_slots]


def gather_rows(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``x[pos]`` with zero rows where ``pos == len(x)`` (no token used that slot)."""
    n = x.shape[0]
    if n == 0:
        return x.new_zeros((pos.shape[0], x.shape[1]))
    rows = x.index_select(0, pos.clamp(max=n - 1))  # [slots, H]: no copy of the whole of x
    return torch.where((pos < n)[:, None], rows, torch.zeros((), dtype=x.dtype, device=x.device))


def torch_forward(kind, src, table, boxes, page_sizes, weight, bias, image_features, box_dtype=None) -> torch.Tensor:
    """``[T, H]``: vectorized PyTorch version of ``monkey_kernels._triton.slp.slp_embed_forward`` (same arguments).

    One gather of table rows for all tokens, zeroed where not text, then the box / image rows are written
    by slot (``O(N H)``, not ``O(T H)``) into a buffer with one spare row ``T`` that absorbs unused slots.
    """
    T, H = kind.shape[0], table.shape[1]
    is_text = kind == KIND_TEXT
    text_idx = torch.cat([torch.where(is_text, src, 0), src.new_zeros(1)])
    out = table.index_select(0, text_idx)  # [T + 1, H]
    out = torch.where(torch.cat([is_text, is_text.new_zeros(1)])[:, None], out,
                      torch.zeros((), dtype=table.dtype, device=table.device))
    B, N, _ = boxes.shape
    acc = accumulation_dtype(table.dtype)  # fp32 (fp64 for a float64 table), one rounding to the table's dtype
    z = torch.nn.functional.linear(normalized_boxes(boxes, page_sizes, acc).reshape(B * N, 4), weight.to(acc),
                                   None if bias is None else bias.to(acc))
    if box_dtype is not None:
        z = z.to(box_dtype)  # the reference's nn.Linear output under autocast
    out.index_copy_(0, source_rows(kind, src, KIND_BOX, B * N), z.to(table.dtype))
    if image_features is not None:
        Bi, n_image, _ = image_features.shape
        rows = image_features.reshape(Bi * n_image, H).to(table.dtype)
        out.index_copy_(0, source_rows(kind, src, KIND_IMAGE, Bi * n_image), rows)
    return out[:T]


def torch_backward(dy: torch.Tensor, kind: torch.Tensor, src: torch.Tensor, boxes: torch.Tensor,
                   page_sizes: Optional[torch.Tensor], weight: torch.Tensor, num_embeddings: int, padding_idx: int,
                   n_image: int, needs: List[bool], box_dtype=None) -> List[Optional[torch.Tensor]]:
    """The six gradients ``[table, weight, bias, boxes, page_sizes, image rows [B * n_image, H]]`` of the
    assembly for ``dY [T, H]`` (``None`` where ``needs`` is False); the math is in :mod:`.op`. With ``box_dtype``
    the box rows of ``dY`` are rounded to it first."""
    need_table, need_w, need_bias, need_boxes, need_sizes, need_image = needs
    T, H = dy.shape
    grad_table = grad_w = grad_bias = grad_boxes = grad_sizes = grad_image = None
    # torch and triton backends, and native on CUDA tensors (the CUDA kernel is forward only).
    if need_table:
        is_text = kind == KIND_TEXT
        grad_table = torch.ops.aten.embedding_dense_backward(
            torch.where(is_text[:, None], dy, torch.zeros((), dtype=dy.dtype, device=dy.device)),
            torch.where(is_text, src, 0), num_embeddings, padding_idx, False,
        )

    if need_w or need_bias or need_boxes or need_sizes:
        B, N, _ = boxes.shape
        acc = accumulation_dtype(dy.dtype)  # dY has the table's (output's) dtype: as in the forward
        g = gather_rows(dy, source_rows(kind, src, KIND_BOX, B * N))  # [B*N, H]
        if box_dtype is not None:
            g = g.to(box_dtype)
        g = g.to(acc)
        c = normalized_boxes(boxes, page_sizes, acc).reshape(B * N, 4)
        if need_w:
            grad_w = (g.t() @ c).to(weight.dtype)
        if need_bias:
            grad_bias = g.sum(dim=0).to(weight.dtype)
        if need_boxes or need_sizes:
            dc = (g @ weight.to(acc)).view(B, N, 4)
            if page_sizes is None:
                if need_boxes:
                    grad_boxes = dc.to(boxes.dtype)
            else:
                size = page_sizes.to(acc)
                whwh = torch.cat([size, size], dim=-1).unsqueeze(1)  # [B, 1, 4]
                if need_boxes:
                    grad_boxes = (dc / whwh).to(boxes.dtype)
                if need_sizes:
                    per_coord = -(dc * boxes.to(acc) / whwh.square()).sum(dim=1)  # [B, 4]
                    grad_sizes = (per_coord[:, 0:2] + per_coord[:, 2:4]).to(page_sizes.dtype)

    if need_image:
        grad_image = gather_rows(dy, source_rows(kind, src, KIND_IMAGE, boxes.shape[0] * n_image))
    return [grad_table, grad_w, grad_bias, grad_boxes, grad_sizes, grad_image]


class TorchSLP:
    name = "torch"
    forward = staticmethod(torch_forward)
    backward = staticmethod(torch_backward)


IMPLEMENTATION = register_backend("slp", "torch", TorchSLP)
