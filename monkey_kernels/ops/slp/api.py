"""``slp_embed``: validate -> resolve the backend -> call the op."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..autocast import autocast_dtype
from ..backends import resolve_backend
from ..custom import through_custom_op
from .checks import check_backend, validate_slp
from .op import EagerSLPEmbed, autocast_projection, slp_embed_fwd

__all__ = ["slp_embed"]


def slp_embed(
    input_ids: torch.Tensor,
    embedding_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: Optional[torch.Tensor],
    boxes: Optional[torch.Tensor] = None,
    *,
    box_token_id: int = 0,
    page_sizes: Optional[torch.Tensor] = None,
    num_boxes=None,
    image_features: Optional[torch.Tensor] = None,
    image_token_id: Union[int, Sequence[int], None] = None,
    num_image_tokens=None,
    image_span_unit: Optional[int] = None,
    strict_boxes: bool = False,
    padding_idx: Optional[int] = None,
    validate: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``inputs_embeds [B, S, H]`` from ids, the token table, SLP boxes and image features in one pass.

    Args:
        input_ids: ``[B, S]`` integer ids. ``-1`` is padding: a zero row without gradient.
        embedding_weight: the token table ``[V, H]`` (float32/16, bfloat16; float64 on the torch and native
            CPU backends);
            its dtype is the output dtype.
        proj_weight: the SLP ``nn.Linear(4, H).weight``, ``[H, 4]``; proj_bias ``[H]`` or ``None``.
        boxes: ``[B, N, 4]`` ``(x1, y1, x2, y2)``, padded per sequence (zeros, as the public collate does),
            or ``None`` when no sequence has box placeholders.
        box_token_id: the box placeholder id (LayTextLLM: 0, ``<unk>``); the ``k``-th in a sequence takes
            box ``k`` of that sequence.
        page_sizes: ``[B, 2]`` ``(w, h)``: the boxes are pixel corners, normalized in the kernel. ``None``:
            the boxes are already normalized to ``[0, 1]``.
        num_boxes: ``[B]`` valid (non-padding) boxes per sequence; ``None``: all ``N``.
        image_features: ``[B, n_image, H]`` or ``None``; the ``j``-th image placeholder of a sequence takes
            row ``j`` of that sequence's features.
        image_token_id: the image placeholder id(s) (an int or a few ints).
        num_image_tokens: ``[B]`` valid feature rows per sequence; ``None``: all ``n_image``.
        image_span_unit: when set (Monkey: 256), every contiguous run of image placeholders must be a
            multiple of it (``(tiles + 1) * 256`` per image).
        strict_boxes: also reject sequences with fewer placeholders than boxes (more is always an error).
        padding_idx: the table row that gets no gradient (``nn.Embedding.padding_idx``), or ``None``.
        validate: check values (ids in range, placeholder counts vs boxes / feature rows, span lengths,
            finite boxes with ``x2 >= x1``, ``y2 >= y1``, positive page sizes). This reads a small summary
            back to the host; pass ``False`` under CUDA-graph capture. Without it, placeholders beyond the
            valid boxes / feature rows and out-of-range ids give zero rows (never out-of-bounds reads).
        backend (see :mod:`monkey_kernels.ops.backends`): ``"triton"``, ``"native"`` (CPU; CUDA when the extension was built with CUDA), ``"torch"``
            or ``None``/``"auto"``.
    Returns:
        ``[B, S, H]`` in the table's dtype. Gradients flow to the table, ``proj_weight``, ``proj_bias``,
        ``boxes``, float ``page_sizes`` and ``image_features``, whichever require grad.
    Raises:
        ValueError: naming the argument (shapes, dtypes, devices) or the sequence (values, when validating).

    Autocast (enabled for the table's device type): as the reference (an ``nn.Embedding`` lookup, not autocast,
    and an ``nn.Linear(4, H)``, autocast): the output keeps the table's dtype; the boxes are normalized in their
    own dtype, then they, ``proj_weight`` and ``proj_bias`` are cast to the autocast dtype, and each box row is
    rounded to it (the linear's output) before it is written in the table's dtype; the backward rounds the box
    rows' gradient to it likewise. Image features are copied (converted to the table's dtype) as always.
    """
    problem = validate_slp(
        input_ids, embedding_weight, proj_weight, proj_bias, boxes, box_token_id=box_token_id,
        page_sizes=page_sizes, num_boxes=num_boxes, image_features=image_features, image_token_id=image_token_id,
        num_image_tokens=num_image_tokens, image_span_unit=image_span_unit, strict_boxes=strict_boxes,
        padding_idx=padding_idx, validate=validate,
    )
    backend = resolve_backend(backend, input_ids.device, "slp")
    check_backend(backend, embedding_weight)
    p = problem
    boxes, box_dtype = p.box_slots, None
    amp = autocast_dtype(embedding_weight.device.type)
    if amp is not None:
        proj_weight, proj_bias, boxes, page_sizes, box_dtype = autocast_projection(
            proj_weight, proj_bias, boxes, page_sizes, amp, embedding_weight.device.type)
    op_inputs = (embedding_weight, proj_weight, proj_bias, boxes, page_sizes, p.image_features, p.index.kind,
                 p.index.src, p.padding_idx, backend, box_dtype)
    if through_custom_op(embedding_weight):
        out = slp_embed_fwd(*op_inputs)
    else:
        out = EagerSLPEmbed.apply(*op_inputs)
    return out.view(p.B, p.S, p.H)
