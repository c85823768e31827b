"""Bad and edge inputs of ``slp_embed`` and ``FusedSLPEmbedding``, every backend: bad input gives a ``ValueError``
naming the argument; mixed dtypes, expanded (stride-0) inputs, empty batches, NaN (which must stay in its own
rows) and float64 tables give the float64 reference's result.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.accuracy import non_finite_pattern
from conftest import available_backends, kernel_device
from helpers.slp_models import B, BOX_ID, H, IMAGE_ID, S, V, slp_inputs
from monkey_kernels import FusedSLPEmbedding, slp_embed
from monkey_kernels.ops.slp.reference import SpatialLayoutProjector, assemble_inputs_embeds_ref

BACKENDS = available_backends()


def meta(t):
    return t.to("meta")


def call_slp(inputs, backend, **kwargs):
    inputs = dict(inputs, **kwargs)
    ids = inputs.pop("input_ids")
    return slp_embed(ids, inputs.pop("embedding_weight"), inputs.pop("proj_weight"), inputs.pop("proj_bias"),
                     inputs.pop("boxes"), box_token_id=inputs.pop("box_token_id", BOX_ID), backend=backend, **inputs)


def slp_reference_modules(inputs):
    """The reference ``nn.Embedding`` and ``SpatialLayoutProjector`` in float64 holding ``inputs``' weights."""
    embedding = nn.Embedding(V, H, dtype=torch.float64)
    projector = SpatialLayoutProjector(H, dtype=torch.float64)
    with torch.no_grad():
        embedding.weight.copy_(inputs["embedding_weight"])
        projector.proj.weight.copy_(inputs["proj_weight"])
        projector.proj.bias.copy_(inputs["proj_bias"])
    return embedding, projector


def slp_reference(inputs):
    """The reference assembly in float64 on the CPU."""
    t = {k: (v.detach().cpu().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
         for k, v in inputs.items()}
    embedding, projector = slp_reference_modules(t)
    return assemble_inputs_embeds_ref(t["input_ids"].cpu(), embedding, projector, t["boxes"], BOX_ID,
                                      image_features=t["image_features"], image_token_id=IMAGE_ID).detach()


SLP_ERRORS = {
    "ids_float": (dict(input_ids=lambda t: t.float()), "input_ids must be an integer"),
    "ids_bool": (dict(input_ids=lambda t: t > 3), "input_ids must be an integer"),
    "ids_complex": (dict(input_ids=lambda t: t.to(torch.complex64)), "input_ids must be an integer"),
    "ids_1d": (dict(input_ids=lambda t: t[0]), "input_ids must be 2-D"),
    "ids_list": (dict(input_ids=lambda t: t.tolist()), "input_ids must be a torch.Tensor"),
    "table_int": (dict(embedding_weight=lambda t: t.int()), "embedding_weight must be float"),
    "table_complex": (dict(embedding_weight=lambda t: t.to(torch.complex64)), "embedding_weight must be float"),
    "table_1d": (dict(embedding_weight=lambda t: t[0]), "embedding_weight must be 2-D"),
    "proj_int": (dict(proj_weight=lambda t: t.int()), "proj_weight must be a float"),
    "proj_transposed": (dict(proj_weight=lambda t: t.t()), "proj_weight must be"),
    "proj_bias_2d": (dict(proj_bias=lambda t: t[None]), "proj_bias must be 1-D"),
    "proj_bias_int": (dict(proj_bias=lambda t: t.int()), "proj_bias must be a float"),
    "boxes_int": (dict(boxes=lambda t: t.int()), "boxes must be a float"),
    "boxes_2d": (dict(boxes=lambda t: t[0]), "boxes must be 3-D"),
    "boxes_5_coords": (dict(boxes=lambda t: torch.cat([t, t[..., :1]], -1)), r"boxes must be \[B=2, N, 4\]"),
    "page_sizes_bool": (dict(page_sizes=torch.ones(B, 2, dtype=torch.bool)), "page_sizes must be a real"),
    "page_sizes_complex": (dict(page_sizes=torch.ones(B, 2, dtype=torch.complex64)), "page_sizes must be a real"),
    "page_sizes_shape": (dict(page_sizes=torch.ones(B, 3)), r"page_sizes must be \[B=2, 2\]"),
    "page_sizes_negative": (dict(page_sizes=-torch.ones(B, 2)), "page_sizes: sequence 0"),
    "page_sizes_inf": (dict(page_sizes=torch.full((B, 2), float("inf"))), "page_sizes: sequence 0"),
    "page_sizes_without_boxes": (dict(boxes=None, num_boxes=None, page_sizes=torch.ones(B, 2)),
                                 "page_sizes given without boxes"),
    "image_features_int": (dict(image_features=lambda t: t.int()), "image_features must be a float"),
    "image_features_wrong_hidden": (dict(image_features=lambda t: t[..., :-1]), "image_features must be"),
    "box_token_bool": (dict(box_token_id=True), "box_token_id must be an int"),
    "box_token_str": (dict(box_token_id="0"), "box_token_id must be an int"),
    "box_token_is_image_token": (dict(box_token_id=IMAGE_ID), "also an image_token_id"),
    "box_token_padding": (dict(box_token_id=-1), "padding id"),
    "image_token_str": (dict(image_token_id="eleven"), "image_token_id must be an int"),
    "image_token_bool": (dict(image_token_id=True), "image_token_id must be an int"),
    "num_boxes_float": (dict(num_boxes=torch.tensor([2.0, 1.0])), "num_boxes must be 2 integers"),
    "num_boxes_length": (dict(num_boxes=torch.tensor([2, 1, 0])), "num_boxes must be 2 integers"),
    "num_boxes_too_many": (dict(num_boxes=torch.tensor([3, 1])), r"num_boxes must be in \[0, 2\]"),
    "num_boxes_negative": (dict(num_boxes=torch.tensor([2, -1])), r"num_boxes must be in \[0, 2\]"),
    "num_image_tokens_bool": (dict(num_image_tokens=torch.tensor([True, True])), "num_image_tokens must be"),
    "num_image_tokens_too_many": (dict(num_image_tokens=torch.tensor([3, 2])), "num_image_tokens must be in"),
    "image_span_unit_zero": (dict(image_span_unit=0), "image_span_unit must be a positive int"),
    "image_span_unit_bool": (dict(image_span_unit=True), "image_span_unit must be a positive int"),
    "padding_idx_out_of_range": (dict(padding_idx=V), "padding_idx must be in"),
    "table_meta": (dict(embedding_weight=meta), "embedding_weight is on meta"),
    "proj_meta": (dict(proj_weight=meta), "proj_weight is on meta"),
    "proj_bias_meta": (dict(proj_bias=meta), "proj_bias is on meta"),
    "boxes_meta": (dict(boxes=meta), "boxes is on meta"),
    "page_sizes_meta": (dict(page_sizes=torch.ones(B, 2, device="meta")), "page_sizes is on meta"),
    "image_features_meta": (dict(image_features=meta), "image_features is on meta"),
    "nan_box": (dict(boxes=lambda t: t.index_fill(1, torch.tensor([0], device=t.device), float("nan"))),
                "boxes: sequence 0, box 0"),
    "backend_unknown": (dict(backend="cuda-magic"), "backend must be one of"),
}


@pytest.mark.parametrize("name", list(SLP_ERRORS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_slp_embed_bad_arguments(backend, name):
    changes, pattern = SLP_ERRORS[name]
    inputs = slp_inputs(kernel_device(backend))
    for key, change in changes.items():
        inputs[key] = change(inputs[key]) if callable(change) else change
    backend = inputs.pop("backend", backend)
    with pytest.raises(ValueError, match=pattern):
        call_slp(inputs, backend)


def assert_slp_matches(out, inputs, rtol=1e-5, atol=1e-5):
    expected = slp_reference(inputs)
    assert torch.equal(non_finite_pattern(out.cpu()), non_finite_pattern(expected)), "NaN/inf entries differ"
    finite = torch.isfinite(expected)
    torch.testing.assert_close(out.cpu().double()[finite], expected[finite], rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_slp_embed_mixed_dtypes_expanded_inputs_and_empty_batches(backend):
    device = kernel_device(backend)
    inputs = slp_inputs(device)
    # fp64 projection and fp16 image features next to an fp32 table: the output is in the table's dtype
    mixed = dict(inputs, proj_weight=inputs["proj_weight"].double(), proj_bias=inputs["proj_bias"].double(),
                 image_features=inputs["image_features"].half())
    out = call_slp(mixed, backend)
    assert out.dtype == torch.float32
    assert_slp_matches(out, dict(mixed, image_features=mixed["image_features"].float()))
    # stride-0 table rows, ids, boxes and features
    expanded = dict(inputs, embedding_weight=inputs["embedding_weight"][:1].expand(V, H),
                    proj_bias=inputs["proj_bias"][:1].expand(H),
                    image_features=inputs["image_features"][:, :1].expand(B, 2, H))
    assert_slp_matches(call_slp(expanded, backend), expanded)
    ids = torch.full((1, S), 3, device=device).expand(B, S)
    assert_slp_matches(call_slp(dict(inputs, input_ids=ids, num_boxes=None, boxes=None, image_features=None),
                                backend),
                       dict(inputs, input_ids=ids, boxes=None, image_features=None))
    # B = 0 and S = 0
    for shape in ((0, S), (B, 0)):
        empty = dict(inputs, input_ids=torch.zeros(shape, dtype=torch.long, device=device), num_boxes=None,
                     boxes=inputs["boxes"][: shape[0]], image_features=inputs["image_features"][: shape[0], :0])
        assert call_slp(empty, backend).shape == (*shape, H)


@pytest.mark.parametrize("backend", BACKENDS)
def test_slp_embed_nan_stays_in_its_rows(backend):
    """NaN in one table row reaches only the tokens with that id, in one sequence's image features only that
    sequence's image rows, in the projection only the box rows."""
    device = kernel_device(backend)
    inputs = slp_inputs(device)
    inputs["embedding_weight"][5, 2] = float("nan")
    inputs["image_features"][0, 1, 0] = float("nan")
    out = call_slp(inputs, backend)
    assert_slp_matches(out, inputs)
    assert not out[1].isnan().any() or (inputs["input_ids"][1] == 5).any()
    proj_nan = slp_inputs(device)
    proj_nan["proj_weight"].fill_(float("nan"))
    out = call_slp(proj_nan, backend)
    assert_slp_matches(out, proj_nan)
    box_rows = inputs["input_ids"] == BOX_ID
    assert out[box_rows].isnan().all() and not out[~box_rows & (inputs["input_ids"] != 5)].isnan().any()


@pytest.mark.parametrize("with_page_sizes", [False, True], ids=["normalized", "page_sizes"])
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_slp_embed_float64_box_rows(backend, with_page_sizes):
    """A float64 table gets box rows (and box / projection gradients) computed in float64, not fp32."""
    inputs = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in slp_inputs().items()}
    inputs["proj_weight"] = inputs["proj_weight"] * 1e3  # large enough that fp32 rounding shows above 1e-12
    if not with_page_sizes:
        assert_slp_matches(call_slp(inputs, backend), inputs, rtol=1e-12, atol=1e-12)
    page_sizes = torch.tensor([[640.0, 480.0], [300.0, 1000.0]], dtype=torch.float64)
    if with_page_sizes:
        inputs["boxes"] = inputs["boxes"] * torch.cat([page_sizes, page_sizes], dim=-1)[:, None]  # pixel corners
        inputs["page_sizes"] = page_sizes
    # Forward and every gradient against the float64 reference modules (autograd through the reference).
    names = ["embedding_weight", "proj_weight", "proj_bias", "boxes", "image_features"]
    names += ["page_sizes"] if with_page_sizes else []
    leaves = {k: inputs[k].clone().requires_grad_() for k in names}
    out = call_slp(dict(inputs, **leaves), backend)
    assert out.dtype == torch.float64
    embedding, projector = slp_reference_modules(inputs)
    boxes = inputs["boxes"].clone().requires_grad_()
    sizes = page_sizes.clone().requires_grad_() if with_page_sizes else None
    features = inputs["image_features"].clone().requires_grad_()
    expected = assemble_inputs_embeds_ref(inputs["input_ids"], embedding, projector, boxes, BOX_ID,
                                          page_sizes=sizes, image_features=features, image_token_id=IMAGE_ID)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, list(leaves.values()), grad_out)
    ref_leaves = [embedding.weight, projector.proj.weight, projector.proj.bias, boxes, features]
    ref_leaves += [sizes] if with_page_sizes else []
    want = torch.autograd.grad(expected, ref_leaves, grad_out)
    for name, g, w in zip(names, got, want):
        assert g.dtype == torch.float64, name
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def test_fused_slp_module_rejects_wrong_submodules():
    embedding = nn.Embedding(V, H)
    with pytest.raises(ValueError, match="embed_tokens must be an nn.Embedding"):
        FusedSLPEmbedding(nn.Linear(V, H), SpatialLayoutProjector(H))
    with pytest.raises(ValueError, match="projector must hold proj"):
        FusedSLPEmbedding(embedding, SpatialLayoutProjector(H + 1))
    with pytest.raises(ValueError, match="projector is required"):
        FusedSLPEmbedding.from_reference(embedding)
