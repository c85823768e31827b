"""The fused SLP embedding assembly (``monkey_kernels.ops.slp``) against the reference modules, every backend.

Low-precision results are judged the flash-attention way: the op's error against a float64 run of the
reference (``SLPEmbeddingRef``: lookup, projection, per-sequence scatter) may be at most ``FACTOR`` times
the error of the same reference run in the op's dtype, plus a small floor. float64 (native backend) is
judged against the float64 reference directly (there the rule would compare the reference with itself).
Shapes are tiny and hidden sizes are not multiples of the kernel's block sizes.

The ``native`` cases run the C++ ops (CPU); without the extension they fail unless
``MONKEY_KERNELS_ALLOW_NO_NATIVE=1`` (see ``conftest.py``). The CUDA kernel of the native forward is
compared with the Triton kernel and the float64 reference in ``test_native_cuda_kernel_*`` (GPU only).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional, Tuple

import pytest
import torch
from torch import nn

from helpers.accuracy import assert_within_pytorch_error, rel_err
from conftest import available_backends, kernel_device, require_native
from helpers.slp_models import LayoutModel
from monkey_kernels.ops.slp.reference import PAD_TOKEN_ID, SLPEmbeddingRef, SpatialLayoutProjector
from monkey_kernels import FusedSLPEmbedding, slp_embed

BACKENDS = available_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Table dtypes beyond DTYPES that a backend runs in the shared matrix: the native CPU op and the torch backend
# compute float64 tables in float64 (triton has no fp64).
EXTRA_DTYPES = {"native": [torch.float64], "torch": [torch.float64]}
# float64 against the float64 reference: summation order only (a float32 step anywhere would give ~1e-7).
FP64_TOLERANCE = 1e-13
BOX_ID = 0


@dataclass
class Case:
    batch: int
    seq: int
    hidden: int
    vocab: int
    n_boxes: int
    pixels: bool = True  # pixel corners + page sizes, else normalized boxes
    image_ids: Tuple[int, ...] = ()
    image_span: int = 0  # placeholders per image span
    images_per_seq: Tuple[int, ...] = ()
    padded_boxes: bool = True  # num_boxes < n_boxes for some sequences
    fewer_placeholders: bool = False  # some sequences leave boxes unused (non-strict)
    padding_idx: Optional[int] = None
    trainable: tuple = field(default=("table", "weight", "bias", "boxes", "page_sizes", "image_features"))


CASES = {
    # LayTextLLM: pixel boxes normalized in the kernel, zero-padded boxes, -1-padded ids, strict counts
    "laytext_pixels": Case(3, 30, 40, 37, 6),
    # normalized boxes, two image placeholder ids in spans, fewer placeholders than boxes, padding_idx row
    "normalized_with_images": Case(
        2, 34, 72, 45, 5, pixels=False, image_ids=(43, 44), image_span=4, images_per_seq=(2, 1),
        fewer_placeholders=True, padding_idx=3,
    ),
    # Monkey-like: no boxes at all in one sequence, image spans of different counts per sequence
    "monkey_spans": Case(2, 32, 56, 40, 3, image_ids=(39,), image_span=6, images_per_seq=(1, 3)),
}


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device):
    """Random ids with placeholders at random positions, boxes, page sizes and image features."""
    g = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
    B, S, H, V, N = case.batch, case.seq, case.hidden, case.vocab, case.n_boxes
    text_ids = [i for i in range(V) if i != BOX_ID and i not in case.image_ids]
    ids = torch.tensor(text_ids)[torch.randint(0, len(text_ids), (B, S), generator=g)]
    num_boxes = torch.randint(1 if not case.padded_boxes else 0, N + 1, (B,), generator=g)
    num_boxes[0] = N
    if case.image_ids and len(case.images_per_seq) == B:
        num_boxes[1] = 0 if case.n_boxes <= 3 else num_boxes[1]  # a sequence without boxes
    placeholders = num_boxes.clone()
    if case.fewer_placeholders:
        placeholders = (num_boxes - torch.randint(0, 3, (B,), generator=g)).clamp(min=0)
    image_counts = [n * case.image_span for n in case.images_per_seq] if case.image_ids else [0] * B
    n_image = max(image_counts) if image_counts else 0
    for b in range(B):
        pad = int(torch.randint(0, 5, (), generator=g)) if b > 0 else 0
        usable = S - pad
        free = list(range(usable))
        # image spans: contiguous runs of image_span placeholders (alternating ids when there are two)
        start = 1
        for span in range(case.images_per_seq[b] if case.image_ids else 0):
            for j in range(case.image_span):
                ids[b, start + j] = case.image_ids[(span + j) % len(case.image_ids)]
                free.remove(start + j)
            start += case.image_span + 1
        order = torch.randperm(len(free), generator=g)[: int(placeholders[b])]
        ids[b, torch.tensor([free[i] for i in order.tolist()], dtype=torch.long)] = BOX_ID
        if pad:
            ids[b, usable:] = PAD_TOKEN_ID

    corner = torch.rand(B, N, 2, generator=g, dtype=torch.float64)
    extent = torch.rand(B, N, 2, generator=g, dtype=torch.float64) * (1 - corner)
    boxes = torch.cat([corner, corner + extent], dim=-1)
    page_sizes = None
    if case.pixels:
        page_sizes = (torch.rand(B, 2, generator=g, dtype=torch.float64) * 900 + 100).round()
        boxes = (boxes * page_sizes.repeat(1, 2)[:, None, :]).round()
    for b in range(B):  # the public collate pads boxes with zeros
        boxes[b, int(num_boxes[b]):] = 0

    def to(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    table = torch.randn(V, H, generator=g, dtype=torch.float64)
    tensors = {
        "table": to(table),
        "weight": to(torch.randn(H, 4, generator=g, dtype=torch.float64)),
        "bias": to(torch.randn(H, generator=g, dtype=torch.float64) * 0.1),
        "boxes": to(boxes),
        "page_sizes": to(page_sizes),
        "image_features": to(torch.randn(B, n_image, H, generator=g, dtype=torch.float64)) if n_image else None,
    }
    for name in case.trainable:
        if tensors.get(name) is not None:
            tensors[name].requires_grad_(True)
    extra = {
        "input_ids": ids.to(device),
        "num_boxes": num_boxes.to(device),
        "num_image_tokens": torch.tensor(image_counts).to(device) if n_image else None,
    }
    return tensors, extra


def reference_module(tensors, case: Case, dtype: torch.dtype):
    """``SLPEmbeddingRef`` over leaf copies of ``tensors`` cast to ``dtype`` (CPU); returns (module, leaves)."""
    leaves = {
        n: None if t is None else t.detach().cpu().to(dtype).requires_grad_(t.requires_grad)
        for n, t in tensors.items()
    }
    V, H = leaves["table"].shape
    embedding = nn.Embedding(V, H, padding_idx=case.padding_idx, dtype=dtype)
    projector = SpatialLayoutProjector(H, dtype=dtype)
    # The leaves themselves become the modules' weights so autograd gradients land on them.
    embedding.weight = nn.Parameter(leaves["table"], requires_grad=leaves["table"].requires_grad)
    projector.proj.weight = nn.Parameter(leaves["weight"], requires_grad=leaves["weight"].requires_grad)
    projector.proj.bias = nn.Parameter(leaves["bias"], requires_grad=leaves["bias"].requires_grad)
    leaves["table"], leaves["weight"], leaves["bias"] = embedding.weight, projector.proj.weight, projector.proj.bias
    return SLPEmbeddingRef(embedding, projector, BOX_ID, case.image_ids), leaves


def run_reference(tensors, extra, case, dtype):
    module, leaves = reference_module(tensors, case, dtype)
    out = module(extra["input_ids"].cpu(), leaves["boxes"], leaves["page_sizes"], leaves["image_features"])
    return out, leaves


def run_op(tensors, extra, case, backend, **kwargs):
    return slp_embed(
        extra["input_ids"], tensors["table"], tensors["weight"], tensors["bias"], tensors["boxes"],
        box_token_id=BOX_ID, page_sizes=tensors["page_sizes"], num_boxes=extra["num_boxes"],
        image_features=tensors["image_features"], image_token_id=case.image_ids,
        num_image_tokens=extra["num_image_tokens"], image_span_unit=case.image_span or None,
        strict_boxes=not case.fewer_placeholders, padding_idx=case.padding_idx, backend=backend, **kwargs,
    )


def grads_of(output, leaves: dict, grad_output):
    names = [n for n, t in leaves.items() if t is not None and t.requires_grad]
    grads = torch.autograd.grad(output, [leaves[n] for n in names], grad_output)
    return dict(zip(names, grads))


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


MATRIX = [
    pytest.param(backend, case_name, dtype, id=f"{backend}-{case_name}-{_dtype_id(dtype)}")
    for backend in BACKENDS for case_name in CASES for dtype in DTYPES + EXTRA_DTYPES.get(backend, [])
]


@pytest.mark.parametrize("backend,case_name,dtype", MATRIX)
def test_matches_fp64_reference(backend, case_name, dtype):
    case = CASES[case_name]
    tensors, extra = make_inputs(case, dtype, kernel_device(backend))
    out = run_op(tensors, extra, case, backend)
    assert out.dtype == dtype and out.shape == (case.batch, case.seq, case.hidden)
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite output"
    # The upstream gradient is an input like any other: the float64 reference gets the same (rounded)
    # values as the op, so only the op's own arithmetic counts as its error.
    grad_output = torch.randn(out.shape, dtype=torch.float64).to(dtype).double()
    grads = grads_of(out, tensors, grad_output.to(device=out.device, dtype=dtype))

    ref64, leaves64 = run_reference(tensors, extra, case, torch.float64)
    grads64 = grads_of(ref64, leaves64, grad_output)
    if dtype == torch.float64:
        assert set(grads) == set(grads64), "a trainable input got no gradient"
        for label, value, reference in [("output", out, ref64)] + [
                (f"grad {n}", grads[n], grads64[n]) for n in grads64]:
            assert torch.isfinite(value).all(), f"{label}: non-finite (unwritten?) entries"
            assert rel_err(value, reference) <= FP64_TOLERANCE, f"{label}: error {rel_err(value, reference):.3e}"
    else:
        plain, leaves_plain = run_reference(tensors, extra, case, dtype)
        grads_plain = grads_of(plain, leaves_plain, grad_output.to(dtype))
        assert_within_pytorch_error(backend, dtype, out, plain, ref64, grads, grads_plain, grads64)

    ids = extra["input_ids"].cpu()
    # padding rows are exact zeros; text and image rows are exact copies
    assert (out.detach().cpu()[ids == PAD_TOKEN_ID] == 0).all()
    text = (ids >= 0) & (ids != BOX_ID) & ~torch.isin(ids, torch.tensor(case.image_ids, dtype=ids.dtype))
    assert torch.equal(out.detach().cpu()[text], tensors["table"].detach().cpu()[ids[text]])
    # padded box slots and the padding_idx row get exact zero gradients
    for b, n in enumerate(extra["num_boxes"].tolist()):
        assert (grads["boxes"][b, n:] == 0).all()
    if case.padding_idx is not None:
        assert (grads["table"][case.padding_idx] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree(backend):
    case = CASES["normalized_with_images"]
    tensors, extra = make_inputs(case, torch.float32, kernel_device(backend))
    out = run_op(tensors, extra, case, backend)
    cpu = {n: None if t is None else t.detach().cpu() for n, t in tensors.items()}
    other = run_op(cpu, {n: None if t is None else t.cpu() for n, t in extra.items()}, case, "torch")
    torch.testing.assert_close(out.detach().cpu(), other, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_give_the_contiguous_result(backend):
    case = CASES["normalized_with_images"]
    tensors, extra = make_inputs(case, torch.float32, kernel_device(backend))
    expected = run_op(tensors, extra, case, backend)
    strided = {n: None if t is None else t.detach() for n, t in tensors.items()}
    strided["table"] = strided["table"].t().contiguous().t()
    strided["weight"] = strided["weight"].t().contiguous().t()
    strided["boxes"] = strided["boxes"].permute(2, 0, 1).contiguous().permute(1, 2, 0)
    strided["image_features"] = strided["image_features"].transpose(0, 1).contiguous().transpose(0, 1)
    wide = torch.zeros(2 * case.hidden, device=expected.device)
    wide[::2] = strided["bias"]
    strided["bias"] = wide[::2]
    assert not strided["table"].is_contiguous() and not strided["boxes"].is_contiguous()
    torch.testing.assert_close(run_op(strided, extra, case, backend), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_page_sizes_as_integers_and_pixel_normalization(backend):
    """Integer page sizes (as a collate function delivers them) give the float result."""
    case = CASES["laytext_pixels"]
    tensors, extra = make_inputs(case, torch.float32, kernel_device(backend))
    expected = run_op(tensors, extra, case, backend)
    ints = dict(tensors, page_sizes=tensors["page_sizes"].detach().to(torch.int32))
    torch.testing.assert_close(run_op(ints, extra, case, backend), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_reference_and_shares_state(backend):
    device = kernel_device(backend)
    H, V = 48, 31
    embedding = nn.Embedding(V, H, device=device)
    projector = SpatialLayoutProjector(H, device=device)
    ref = SLPEmbeddingRef(embedding, projector, box_token_id=BOX_ID, image_token_id=30)
    fused = FusedSLPEmbedding.from_reference(ref, backend=backend)
    assert list(fused.state_dict()) == list(ref.state_dict())
    assert fused.embed_tokens is embedding and fused.projector is projector
    assert set(ref.state_dict()) == {"embed_tokens.weight", "projector.proj.weight", "projector.proj.bias"}
    again = FusedSLPEmbedding.from_reference(embedding, projector, image_token_id=30, backend=backend)
    assert again.to_reference().embed_tokens is embedding

    ids = torch.randint(1, 30, (2, 20), device=device)
    ids[0, [3, 7]] = BOX_ID
    ids[1, 5] = BOX_ID
    ids[:, 10:14] = 30
    boxes = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.0, 0.5, 1.0, 0.9]], [[0.2, 0.2, 0.6, 0.7], [0, 0, 0, 0]]],
                         device=device)
    feats = torch.randn(2, 4, H, device=device)
    expected = ref(ids, boxes, None, feats)
    got = fused(ids, boxes, None, feats, num_boxes=torch.tensor([2, 1], device=device))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    loaded = FusedSLPEmbedding(copy.deepcopy(embedding), SpatialLayoutProjector(H, device=device), BOX_ID, 30,
                               backend=backend)
    loaded.load_state_dict(ref.state_dict())
    torch.testing.assert_close(loaded(ids, boxes, None, feats, num_boxes=[2, 1]), expected, rtol=1e-5, atol=1e-5)
    back = fused.to_reference()
    torch.testing.assert_close(back(ids, boxes, None, feats), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainable_vision_features_from_a_leaf_view(backend):
    """The original's failure: image features written in place into a view of a leaf. The fused op writes
    a fresh output; features that are a view of a trainable leaf (and a trainable table) get gradients."""
    device = kernel_device(backend)
    H, V = 40, 20
    table = torch.randn(V, H, device=device, requires_grad=True)
    vision_leaf = torch.randn(2, 9, H, device=device, requires_grad=True)
    features = vision_leaf[:, 1:7]  # a view of a leaf that requires grad
    ids = torch.randint(1, 19, (2, 16), device=device)
    ids[:, 4:10] = 19
    weight = torch.randn(H, 4, device=device, requires_grad=True)
    out = slp_embed(ids, table, weight, None, None, image_features=features, image_token_id=19, backend=backend)
    assert out.data_ptr() != table.data_ptr()
    out.square().sum().backward()
    expected = torch.zeros_like(vision_leaf)
    expected[:, 1:7] = 2 * out.detach()[:, 4:10]
    torch.testing.assert_close(vision_leaf.grad, expected)
    assert table.grad is not None and torch.isfinite(table.grad).all()
    assert weight.grad is not None and (weight.grad == 0).all()  # no box tokens


def _error_inputs(device):
    H, V = 40, 25
    ids = torch.randint(1, 20, (2, 18), device=device)
    ids[0, [2, 6]] = BOX_ID
    ids[1, [1, 4, 8]] = BOX_ID
    ids[1, 10:14] = 24
    ids[0, 10:14] = 24
    boxes = torch.tensor([[[10., 20., 30., 40.], [5., 5., 50., 60.], [0, 0, 0, 0]],
                          [[1., 2., 3., 4.], [0., 0., 100., 100.], [7., 8., 9., 10.]]], device=device)
    return dict(
        input_ids=ids, embedding_weight=torch.randn(V, H, device=device),
        proj_weight=torch.randn(H, 4, device=device), proj_bias=torch.randn(H, device=device), boxes=boxes,
        page_sizes=torch.tensor([[100., 100.], [200., 150.]], device=device), num_boxes=torch.tensor([2, 3]),
        image_features=torch.randn(2, 4, H, device=device), image_token_id=24,
    )


def _with(inputs, **changes):
    out = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    for key, fn in changes.items():
        out[key] = fn(out[key]) if callable(fn) else fn
    return out


def _set(tensor, index, value):
    tensor[index] = value
    return tensor


ERROR_CASES = {
    "more_placeholders_than_boxes": (dict(input_ids=lambda t: _set(t, (1, 15), BOX_ID)), r"sequence 1 has 4 box"),
    "fewer_placeholders_strict": (dict(input_ids=lambda t: _set(t, (1, 8), 5), strict_boxes=True),
                                  r"sequence 1 has 2 box placeholders .* exactly 3"),
    "image_span_too_long": (dict(input_ids=lambda t: _set(t, (1, 14), 24)), r"sequence 1 has an image .* 5 tokens"),
    "image_span_too_short": (dict(input_ids=lambda t: _set(t, (0, 13), 7)), r"sequence 0 has an image .* 3 tokens"),
    "span_not_a_multiple_of_the_unit": (dict(image_span_unit=3), r"sequence 0 has an image .* multiple of 3"),
    "box_non_finite": (dict(boxes=lambda t: _set(t, (1, 2, 3), float("nan"))), r"sequence 1, box 2"),
    "box_x2_before_x1": (dict(boxes=lambda t: _set(t, (1, 1, 2), -1.0)), r"sequence 1, box 1 .* x2 >= x1"),
    "id_past_the_table": (dict(input_ids=lambda t: _set(t, (1, 16), 25)), r"sequence 1 has id 25 .*\[0, 25\)"),
    "negative_id_other_than_padding": (dict(input_ids=lambda t: _set(t, (0, 0), -3)), r"sequence 0 has id -3"),
    "page_size_zero": (dict(page_sizes=lambda t: _set(t, (1, 0), 0.0)), r"page_sizes: sequence 1"),
    "no_boxes_given": (dict(boxes=None, page_sizes=None, num_boxes=None), r"sequence 0 has 2 box .*none were given"),
    "bad_proj_shape": (dict(proj_weight=lambda t: t[:, :3]), r"proj_weight must be"),
    "boxes_wrong_batch": (dict(boxes=lambda t: t[:1], num_boxes=None), r"boxes must be \[B=2"),
}


@pytest.mark.parametrize("name", list(ERROR_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_name_the_sequence(backend, name):
    changes, pattern = ERROR_CASES[name]
    inputs = _with(_error_inputs(kernel_device(backend)), **changes)
    ids = inputs.pop("input_ids")
    with pytest.raises(ValueError, match=pattern):
        slp_embed(ids, backend=backend, **inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_valid_error_inputs_pass_and_validate_false_gives_zero_rows(backend):
    device = kernel_device(backend)
    inputs = _error_inputs(device)
    ids = inputs.pop("input_ids")
    base = slp_embed(ids, backend=backend, **inputs)
    assert torch.isfinite(base).all()
    bad_ids = ids.clone()
    bad_ids[1, 15] = BOX_ID  # a 4th placeholder for 3 boxes
    bad_ids[0, 16] = 999  # past the table
    bad_ids[0, 13] = 3  # image span of 3 for 4 feature rows
    out = slp_embed(bad_ids, backend=backend, validate=False, **inputs)
    assert (out[1, 15] == 0).all() and (out[0, 16] == 0).all()
    unchanged = torch.ones(ids.shape, dtype=torch.bool, device=device)
    unchanged[1, 15] = unchanged[0, 16] = unchanged[0, 13] = False
    torch.testing.assert_close(out[unchanged], base[unchanged])


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_model_swaps_the_reference_embedding_and_back(backend):
    from monkey_kernels import patch_model, unpatch_model

    device = kernel_device(backend)
    vocab, hidden = 29, 40
    model = LayoutModel(vocab, hidden, device)
    keys_before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(1, vocab - 1, (2, 16), device=device)
    ids[0, [2, 9]] = BOX_ID
    ids[1, 4] = BOX_ID
    ids[:, 11:13] = vocab - 1
    corners = torch.rand(2, 2, 2, device=device) * 0.8
    boxes = torch.cat([corners, corners + 0.1], dim=-1)  # [x1, y1, x2, y2] with x2 > x1, y2 > y1
    feats = torch.randn(2, 2, hidden, device=device)
    expected = model(ids, boxes, feats)

    report = patch_model(model, backend=backend)
    assert report.rules["slp_embedding"] == 1 and report.kinds["slp_embedding"] == 1
    assert isinstance(model.embed, FusedSLPEmbedding)
    assert set(model.state_dict()) == set(keys_before)
    out = model(ids, boxes, feats)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert model.embed.projector.proj.weight.grad is not None and model.embed.embed_tokens.weight.grad is not None

    unpatch_model(model)
    assert isinstance(model.embed, SLPEmbeddingRef)
    for key, value in model.state_dict().items():
        assert torch.equal(value, keys_before[key]), key


# ---------------------------------------------------------------------------------------------------------
# Native ops: determinism, torch.library checks, the CUDA kernel
# ---------------------------------------------------------------------------------------------------------
def test_native_backward_is_deterministic():
    """Two backward passes give bitwise-identical gradients (no atomics, fixed summation orders), with
    frequent repeated tokens so that table rows sum many token rows."""
    require_native()
    case = CASES["normalized_with_images"]
    tensors, extra = make_inputs(case, torch.float32, torch.device("cpu"))
    ids = extra["input_ids"]
    text = (ids > 10) & ~torch.isin(ids, torch.tensor(case.image_ids))  # text ids only: placeholders stay
    extra["input_ids"] = torch.where(text, ids % 5 + 6, ids)
    grad_output = torch.randn(case.batch, case.seq, case.hidden)
    runs = [grads_of(run_op(tensors, extra, case, "native"), tensors, grad_output) for _ in range(2)]
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_native_ops_pass_torch_library_opcheck():
    """Schemas, fake (meta) implementations and AOT dispatch of the three op overloads (torch.compile)."""
    ops = require_native()
    kind = torch.tensor([1, 2, 0, 3, 1, 2], dtype=torch.int32)
    src = torch.tensor([3, 1, 0, 2, 6, 4])
    table, boxes, weight = torch.randn(7, 5), torch.rand(2, 3, 4) * 50, torch.randn(5, 4)
    sizes, bias, feats = torch.rand(2, 2) * 100 + 60, torch.randn(5), torch.randn(2, 2, 5)
    args = (kind, src, table, boxes, sizes, weight, bias, feats)
    torch.library.opcheck(ops.slp_embed_forward.default, args)
    torch.library.opcheck(ops.slp_embed_forward.out, args, {"out": torch.empty(6, 5)})
    torch.library.opcheck(ops.slp_embed_backward.default,
                          (torch.randn(6, 5), kind, src, boxes, sizes, weight, 7, 2, 2, [True] * 6))
    partial = ops.slp_embed_backward(torch.randn(6, 5), kind, src, boxes, sizes, weight, 7, -1, 2,
                                     [False, True, False, True, False, False])
    assert [g is None for g in partial] == [True, False, True, False, True, True]


def test_native_op_errors_name_the_argument():
    ops = require_native()
    kind, src = torch.ones(4, dtype=torch.int32), torch.zeros(4, dtype=torch.int64)
    table, boxes, weight = torch.randn(5, 6), torch.rand(1, 2, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match="weight must be"):
        ops.slp_embed_forward(kind, src, table, boxes, None, weight[:, :3], None, None)
    with pytest.raises(ValueError, match="src must have the length of kind"):
        ops.slp_embed_forward(kind, src[:3], table, boxes, None, weight, None, None)
    with pytest.raises(ValueError, match="out must be contiguous"):
        ops.slp_embed_forward.out(kind, src, table, boxes, None, weight, None, None, out=torch.empty(6, 4).t())


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernel needs a GPU")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case_name", list(CASES))
def test_native_cuda_kernel_matches_triton_and_fp64(case_name, dtype):
    """The CUDA C++ kernel (csrc/cuda/slp_embed_kernel.cu, backend='native' on CUDA tensors) against the
    Triton kernel on the same inputs and against the float64 reference (gradients: the shared backward)."""
    case = CASES[case_name]
    tensors, extra = make_inputs(case, dtype, torch.device("cuda"))
    out = run_op(tensors, extra, case, "native")
    triton_out = run_op(tensors, extra, case, "triton")
    assert torch.isfinite(out).all()
    # text / image rows are copies, box rows four fp32 FMAs: at most one rounding of the output dtype apart
    torch.testing.assert_close(out, triton_out, rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)
    grad_output = torch.randn(out.shape, dtype=torch.float64).to(dtype).double()
    grads = grads_of(out, tensors, grad_output.to(device=out.device, dtype=dtype))
    ref64, leaves64 = run_reference(tensors, extra, case, torch.float64)
    plain, leaves_plain = run_reference(tensors, extra, case, dtype)
    assert_within_pytorch_error("native", dtype, out, plain, ref64, grads,
                                grads_of(plain, leaves_plain, grad_output.to(dtype)),
                                grads_of(ref64, leaves64, grad_output))


@needs_cuda
@pytest.mark.parametrize("hidden", [40, 37])  # 40: 16-byte packs; 37: odd H, the scalar path
def test_native_cuda_kernel_strided_inputs(hidden):
    """Non-contiguous table / features (the kernel's strided scalar path) give the contiguous result."""
    case = Case(2, 34, hidden, 45, 5, pixels=False, image_ids=(43, 44), image_span=4, images_per_seq=(2, 1),
                fewer_placeholders=True)
    tensors, extra = make_inputs(case, torch.bfloat16, torch.device("cuda"))
    expected = run_op(tensors, extra, case, "native")
    strided = {n: None if t is None else t.detach() for n, t in tensors.items()}
    strided["table"] = strided["table"].t().contiguous().t()
    strided["image_features"] = strided["image_features"].transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(run_op(strided, extra, case, "native"), expected)
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(expected, run_op(tensors, extra, case, "triton"), rtol=eps, atol=eps)


@needs_cuda
def test_native_on_cuda_tensors_is_refused_without_the_cuda_kernel():
    """With a CPU-only build of the extension, backend='native' on CUDA tensors is a ValueError, never a
    silent fallback."""
    from monkey_kernels.ops.slp.native_impl import has_cuda_kernel as _native_has_cuda_kernel

    if _native_has_cuda_kernel():
        pytest.skip("this build has the CUDA kernel (tested by test_native_cuda_kernel_*)")
    device = torch.device("cuda")
    with pytest.raises(ValueError, match="native"):
        slp_embed(torch.ones(1, 4, dtype=torch.long, device=device), torch.randn(3, 8, device=device),
                  torch.randn(8, 4, device=device), None, backend="native")


def _bench_slp():
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    return importlib.import_module("benchmarks.bench_slp")


def test_bench_measures_the_native_cpu_ops(tmp_path):
    """The benchmark's native methods run (and are validated against the reference) on CPU."""
    require_native()
    bench = _bench_slp()
    out = tmp_path / "slp.json"
    threads = torch.get_num_threads()  # the benchmark sets its own CPU thread count
    try:
        result = bench.main(["--device", "cpu", "--small", "--cases", "monkey", "--rounds", "1", "--backends",
                             "native", "torch", "--no-progress", "--no-plot", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert out.exists() and not result["skipped_backends"]
    rows = {(r["method"], r["mode"]): r for r in result["rows"]}
    for method in ("fused", "fused_novalidate"):
        assert rows[(method, "fwd")]["backend"] == "native"
        assert rows[(method, "fwd")]["ms"] > 0 and rows[(method, "fwd_bwd")]["ms"] > 0
    assert result["validation_rel_errors"]["monkey/native"] <= bench.TOLERANCES[torch.float32]


@needs_cuda
def test_bench_compares_the_cuda_kernel_with_triton(tmp_path):
    """On a GPU the benchmark times the CUDA C++ kernel (native) next to the Triton kernel (fused)."""
    bench = _bench_slp()
    result = bench.main(["--device", "cuda", "--small", "--backends", "triton", "native", "--rounds", "1",
                         "--rep-ms", "5", "--no-progress", "--no-plot", "--out", str(tmp_path / "slp.json")])
    assert not result["skipped_backends"], result["skipped_backends"]
    methods = {r["method"] for r in result["rows"]}
    assert {"fused", "fused_novalidate", "fused_native", "fused_native_novalidate"} <= methods
