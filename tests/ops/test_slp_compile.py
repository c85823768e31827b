"""``torch.compile`` of the SLP embedding assembly: the custom op pair (opcheck) and a patched embedding layer
compiled with ``fullgraph=True``, forward and backward equal to eager, on every CPU backend."""
from __future__ import annotations

import pytest
import torch

from conftest import available_backends, kernel_device
from monkey_kernels import FusedSLPEmbedding, patch_model
from monkey_kernels.ops.slp import SLPEmbeddingRef, SpatialLayoutProjector, build_token_index, slp_embed_fwd

BACKENDS = available_backends()


class TinyEmbeddingModel(torch.nn.Module):
    def __init__(self, vocab=11, hidden=8):
        super().__init__()
        self.embed = SLPEmbeddingRef(torch.nn.Embedding(vocab, hidden), SpatialLayoutProjector(hidden), box_token_id=0,
                                     image_token_id=9)


def _inputs(device, dtype):
    ids = torch.tensor([[1, 0, 4, 9, 9, 0, 3], [2, 5, 0, 9, 9, -1, -1]], device=device)
    corners = torch.rand(2, 2, 2, 2, device=device, dtype=dtype).sort(dim=2).values  # x1 <= x2, y1 <= y2
    boxes = corners.permute(0, 1, 3, 2).reshape(2, 2, 4)[..., [0, 2, 1, 3]].contiguous()
    features = torch.randn(2, 2, 8, device=device, dtype=dtype)
    return ids, boxes, features


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_slp_embedding_compiles_fullgraph_and_matches_eager(backend):
    device = kernel_device(backend)
    dtype = torch.float32
    model = TinyEmbeddingModel().to(device=device, dtype=dtype)
    report = patch_model(model, backend=backend)
    assert report.rules["slp_embedding"] == 1 and isinstance(model.embed, FusedSLPEmbedding)
    ids, boxes, features = _inputs(device, dtype)

    def run(fn):
        model.zero_grad(set_to_none=True)
        boxes_leaf = boxes.clone().requires_grad_()
        feats_leaf = features.clone().requires_grad_()
        out = fn(ids, boxes_leaf, image_features=feats_leaf)
        (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()] + [boxes_leaf.grad, feats_leaf.grad]
        return out.detach(), grads

    eager_out, eager_grads = run(model.embed)
    compiled_out, compiled_grads = run(torch.compile(model.embed, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled_out, eager_out)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_slp_custom_op_passes_opcheck(backend):
    ids, boxes, features = _inputs("cpu", torch.float64)
    table = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    index = build_token_index(ids, 11, 0, (9,), torch.full((2,), 2), 2, torch.full((2,), 2), 2)
    args = (table, weight, bias, boxes.double().requires_grad_(), None, features.double().requires_grad_(),
            index.kind, index.src, -1, backend)
    torch.library.opcheck(slp_embed_fwd, args)
