"""Reference modules of LayTextLLM's Spatial Layout Projector (SLP) and of the embedding assembly.

These reproduce the public LayTextLLM behaviour (one ``nn.Linear(4, hidden)``; one box, one token) and are
the ground truth for :mod:`monkey_kernels.ops.slp`:

- :class:`SpatialLayoutProjector`: one ``nn.Linear(4, hidden)`` with bias, held as ``self.proj`` (state-dict
  keys ``proj.weight`` ``[hidden, 4]`` and ``proj.bias`` ``[hidden]``), applied to boxes normalized to
  ``[0, 1]`` as ``c = [x1/w, y1/h, x2/w, y2/h]``: ``z = W c + b``.
- :func:`assemble_inputs_embeds_ref`: look up the text embeddings, then write the ``k``-th box embedding at
  the ``k``-th box-placeholder position of each sequence and the ``j``-th image feature row at the ``j``-th
  image-placeholder position (Monkey: ``(tiles + 1) * 256`` placeholders per image). A Python loop over
  sequences, like the public code; the writes go into a fresh tensor (the embedding output), never into a
  view of a leaf, which is what breaks the original once the vision side trains.
- :class:`SLPEmbeddingRef`: a module holding ``embed_tokens`` (``nn.Embedding``) and ``projector``
  (:class:`SpatialLayoutProjector`) around the assembly; :class:`monkey_kernels.modules.FusedSLPEmbedding` has
  the same attribute names, hence the same state-dict keys (``embed_tokens.weight``,
  ``projector.proj.weight``, ``projector.proj.bias``).

Padding convention shared with the fused op: token id ``-1`` (the public collate function's padding)
produces a zero row and no gradient. Placeholders past a sequence's boxes (or image rows) are an error for
the fused op when validating; this reference simply raises on them too.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

__all__ = [
    "SpatialLayoutProjector",
    "SLPEmbeddingRef",
    "normalize_boxes",
    "assemble_inputs_embeds_ref",
    "PAD_TOKEN_ID",
]

PAD_TOKEN_ID = -1


def normalize_boxes(boxes: torch.Tensor, page_sizes: Optional[torch.Tensor]) -> torch.Tensor:
    """``[..., 4]`` pixel corners ``(x1, y1, x2, y2)`` and page sizes ``[..., 2]`` ``(w, h)`` (one per
    sequence: ``boxes [B, N, 4]`` with ``page_sizes [B, 2]``) to ``[x1/w, y1/h, x2/w, y2/h]``.
    ``page_sizes=None``: the boxes are already normalized and returned unchanged."""
    if page_sizes is None:
        return boxes
    size = page_sizes.to(boxes.dtype)
    whwh = torch.cat([size, size], dim=-1)  # [B, 4] = (w, h, w, h)
    return boxes / whwh.unsqueeze(-2)


class SpatialLayoutProjector(nn.Module):
    """LayTextLLM's SLP: ``z = W c + b`` for each normalized box ``c`` in ``R^4``.

    ``forward(boxes [..., 4], page_sizes=None [B, 2])`` returns ``[..., hidden]``; with ``page_sizes`` the
    boxes are pixel corners and are normalized first (see :func:`normalize_boxes`).
    """

    def __init__(self, hidden_size: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.proj = nn.Linear(4, hidden_size, bias=True, device=device, dtype=dtype)

    def forward(self, boxes: torch.Tensor, page_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.proj(normalize_boxes(boxes, page_sizes))


def _image_ids(image_token_id) -> tuple:
    if image_token_id is None:
        return ()
    if isinstance(image_token_id, int):
        return (image_token_id,)
    return tuple(int(i) for i in image_token_id)


def assemble_inputs_embeds_ref(
    input_ids: torch.Tensor,
    embedding: nn.Embedding,
    projector: SpatialLayoutProjector,
    boxes: Optional[torch.Tensor],
    box_token_id: int,
    *,
    page_sizes: Optional[torch.Tensor] = None,
    image_features: Optional[torch.Tensor] = None,
    image_token_id: Union[int, Sequence[int], None] = None,
) -> torch.Tensor:
    """Reference ``inputs_embeds [B, S, hidden]`` (Python loop over sequences, in the modules' dtype).

    Args:
        input_ids: ``[B, S]`` ints; ``-1`` = padding (zero row).
        embedding: the token table ``[V, hidden]``.
        projector: the SLP.
        boxes: ``[B, N, 4]`` (pixel corners with ``page_sizes [B, 2]``, or normalized), or ``None``.
        box_token_id: id of the box placeholder (LayTextLLM: 0, ``<unk>``).
        image_features: ``[B, n_image_tokens, hidden]`` or ``None``.
        image_token_id: the image placeholder id(s).
    """
    ids = input_ids
    pad = ids == PAD_TOKEN_ID
    # A clone of the lookup (not a leaf, not a view of one): the in-place writes below are safe for autograd.
    embeds = embedding(ids.clamp(min=0)).clone()
    embeds[pad] = 0
    box_embeds = projector(boxes, page_sizes) if boxes is not None else None
    image_ids = torch.tensor(_image_ids(image_token_id), dtype=ids.dtype, device=ids.device)
    for b in range(ids.shape[0]):
        positions = (ids[b] == box_token_id).nonzero().flatten()
        if positions.numel():
            if box_embeds is None or positions.numel() > box_embeds.shape[1]:
                raise ValueError(f"sequence {b}: {positions.numel()} box placeholders but not enough boxes")
            embeds[b, positions] = box_embeds[b, : positions.numel()].to(embeds.dtype)
        if image_ids.numel():
            positions = torch.isin(ids[b], image_ids).nonzero().flatten()
            if positions.numel():
                if image_features is None or positions.numel() > image_features.shape[1]:
                    raise ValueError(f"sequence {b}: {positions.numel()} image placeholders, too few features")
                embeds[b, positions] = image_features[b, : positions.numel()].to(embeds.dtype)
    return embeds


class SLPEmbeddingRef(nn.Module):
    """Reference embedding layer of a LayTextLLM-style model: ``embed_tokens`` + ``projector``.

    ``forward(input_ids [B, S], boxes [B, N, 4] or None, page_sizes=None, image_features=None)`` returns
    ``inputs_embeds [B, S, hidden]`` via :func:`assemble_inputs_embeds_ref`.
    """

    def __init__(
        self,
        embed_tokens: nn.Embedding,
        projector: SpatialLayoutProjector,
        box_token_id: int = 0,
        image_token_id: Union[int, Sequence[int], None] = None,
    ) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.projector = projector
        self.box_token_id = int(box_token_id)
        self.image_token_id = _image_ids(image_token_id)

    def forward(self, input_ids, boxes=None, page_sizes=None, image_features=None):
        return assemble_inputs_embeds_ref(
            input_ids, self.embed_tokens, self.projector, boxes, self.box_token_id,
            page_sizes=page_sizes, image_features=image_features, image_token_id=self.image_token_id,
        )
