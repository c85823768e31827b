"""SLP test inputs (a small padded batch with boxes, image features and padding) and a LayTextLLM-like model
holding the reference SLP embedding layer."""
from __future__ import annotations

import torch
from torch import nn

from monkey_kernels.ops.slp.reference import SLPEmbeddingRef, SpatialLayoutProjector

B, S, V, H, IMAGE_ID, BOX_ID = 2, 10, 12, 8, 11, 0


def slp_inputs(device="cpu", dtype=torch.float32):
    ids = torch.randint(1, IMAGE_ID, (B, S))
    ids[0, [2, 5]] = BOX_ID
    ids[0, [7, 8]] = IMAGE_ID
    ids[1, 1] = BOX_ID
    ids[1, [3, 4]] = IMAGE_ID
    ids[1, 9] = -1  # padding
    corner = torch.rand(B, 2, 2) * 0.5
    boxes = torch.cat([corner, corner + 0.25], dim=-1)
    boxes[1, 1] = 0  # padded box of sequence 1
    return dict(
        input_ids=ids.to(device), embedding_weight=torch.randn(V, H, device=device, dtype=dtype),
        proj_weight=torch.randn(H, 4, device=device, dtype=dtype), proj_bias=torch.randn(H, device=device, dtype=dtype),
        boxes=boxes.to(device, dtype), num_boxes=torch.tensor([2, 1], device=device),
        image_features=torch.randn(B, 2, H, device=device, dtype=dtype), image_token_id=IMAGE_ID,
    )


class LayoutModel(nn.Module):
    """A LayTextLLM-like holder of the reference embedding layer (what patch_model meets in practice)."""

    def __init__(self, vocab: int, hidden: int, device):
        super().__init__()
        self.embed = SLPEmbeddingRef(
            nn.Embedding(vocab, hidden, device=device), SpatialLayoutProjector(hidden, device=device),
            box_token_id=BOX_ID, image_token_id=vocab - 1,
        )
        self.head = nn.Linear(hidden, 3, device=device)

    def forward(self, ids, boxes, feats):
        return self.head(self.embed(ids, boxes, None, feats))
