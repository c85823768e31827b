"""``SegmentInfo.from_row_mask``: the segments of InternLM-XComposer's ``im_mask`` (image runs one adapter, text runs
another or none), built by device ops with a static segment count, trimmed when a host read is allowed; and the
op's results on every backend with the trimmed and the static (empty-tail) segments."""
from __future__ import annotations

import pytest
import torch

from conftest import available_backends, kernel_device
from monkey_kernels import SegmentInfo, dropout_keep_mask, multi_lora_linear


def runs_by_loop(mask: torch.Tensor, true_id: int, false_id: int):
    """``(offsets, ids)`` of the runs of ``mask`` (flattened), by a Python loop."""
    flat = mask.reshape(-1).tolist()
    offsets, ids = [0], []
    for i, value in enumerate(flat):
        if i and value != flat[i - 1]:
            offsets.append(i)
            ids.append(true_id if flat[i - 1] else false_id)
    if flat:
        offsets.append(len(flat))
        ids.append(true_id if flat[-1] else false_id)
    return offsets, ids


def random_mask(rows: int, cols: int) -> torch.Tensor:
    """Random spans (several per row, one cut at the end of a row, some rows all text)."""
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        for _ in range(int(torch.randint(0, 4, ()))):
            start = int(torch.randint(0, cols, ()))
            mask[r, start:start + int(torch.randint(1, cols + 1, ()))] = True
    return mask


@pytest.mark.parametrize("true_id, false_id", [(0, -1), (0, 1), (3, 2)])
def test_runs_match_a_loop_trimmed_and_static(true_id, false_id):
    for shape in [(3, 17), (1, 1), (4, 9), (2, 3, 5)]:
        mask = random_mask(shape[0], int(torch.tensor(shape[1:]).prod())).reshape(shape)
        offsets, ids = runs_by_loop(mask, true_id, false_id)
        trimmed = SegmentInfo.from_row_mask(mask, true_adapter=true_id, false_adapter=false_id, trim=True)
        assert trimmed.seg_indptr.tolist() == offsets and trimmed.adapter_ids.tolist() == ids
        assert trimmed.num_segments == len(ids) and trimmed.num_rows == mask.numel()
        static = SegmentInfo.from_row_mask(mask, true_adapter=true_id, false_adapter=false_id, trim=False)
        M = mask.numel()
        assert static.num_segments == M  # the static bound: the runs, then empty segments at offset M
        assert static.seg_indptr.tolist() == offsets + [M] * (M - len(ids))
        assert static.adapter_ids.tolist() == ids + [-1] * (M - len(ids))
        for seg in (trimmed, static):
            expected_rows = torch.repeat_interleave(torch.arange(len(ids)), torch.tensor(offsets).diff())
            assert seg.row_segment.tolist() == expected_rows.tolist()
            assert seg.row_adapter.tolist() == [true_id if v else false_id for v in mask.reshape(-1).tolist()]
            assert seg.seg_indptr.dtype == torch.int32 and seg.adapter_ids.dtype == torch.int32
            assert seg.row_segment.dtype == torch.int32 and seg.row_adapter.dtype == torch.int64
        # from_indptr with host validation accepts what from_row_mask built
        SegmentInfo.from_indptr(static.seg_indptr, static.adapter_ids, validate=True)


def test_single_run_and_empty_masks():
    all_text = SegmentInfo.from_row_mask(torch.zeros(2, 5, dtype=torch.bool), trim=True)
    assert all_text.seg_indptr.tolist() == [0, 10] and all_text.adapter_ids.tolist() == [-1]
    assert all_text.segment_length == 10
    all_image = SegmentInfo.from_row_mask(torch.ones(7, dtype=torch.bool), trim=True)
    assert all_image.adapter_ids.tolist() == [0] and all_image.segment_length == 7
    empty = SegmentInfo.from_row_mask(torch.zeros(0, 4, dtype=torch.bool))
    assert empty.num_rows == 0 and empty.num_segments == 0 and empty.seg_indptr.tolist() == [0]


def test_trims_by_default_only_when_a_host_read_is_allowed():
    mask = torch.tensor([[0, 1, 1, 0]], dtype=torch.bool)
    assert SegmentInfo.from_row_mask(mask).num_segments == 3  # eager on the CPU: trimmed

    def count(m):
        return SegmentInfo.from_row_mask(m).seg_indptr

    torch._dynamo.reset()
    compiled = torch.compile(count, fullgraph=True, backend="aot_eager")  # fullgraph: no host read inside
    assert compiled(mask).tolist() == [0, 1, 3, 4, 4]


@pytest.mark.parametrize("bad, message", [
    (dict(mask=torch.zeros(3, dtype=torch.int64)), "mask must be a bool tensor"),
    (dict(mask=[True, False]), "mask must be a bool tensor"),
    (dict(mask=torch.tensor(True)), "at least 1 dimension"),
    (dict(true_adapter=-1), "true_adapter"),
    (dict(false_adapter=-2), "false_adapter"),
    (dict(true_adapter=True), "true_adapter"),
    (dict(trim=1), "trim must be a bool"),
])
def test_bad_arguments_are_named(bad, message):
    args = dict(mask=torch.zeros(3, dtype=torch.bool))
    args.update(bad)
    mask = args.pop("mask")
    with pytest.raises(ValueError, match=message):
        SegmentInfo.from_row_mask(mask, **args)


@pytest.mark.parametrize("backend", available_backends())
def test_op_gives_the_same_results_with_trimmed_and_static_segments(backend):
    """The kernels skip the empty tail of the static segments: the same outputs and gradients (float64 where the
    backend has it), image rows with the adapter, text rows the base linear."""
    device = kernel_device(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    mask = random_mask(3, 21).to(device)
    K, N, R = 12, 10, 5
    x = torch.randn(3, 21, K, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(N, K, dtype=dtype, device=device, requires_grad=True)
    bias = torch.randn(N, dtype=dtype, device=device, requires_grad=True)
    a = torch.randn(1, R, K, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(1, N, R, dtype=dtype, device=device, requires_grad=True)
    scale = torch.tensor([1.5], dtype=dtype, device=device)
    leaves = [x, w, bias, a, b]
    x64 = x.detach().double()
    expected = x64 @ w.detach().double().t() + bias.detach().double()
    lora = x64 @ a.detach().double()[0].t() @ b.detach().double()[0].t() * 1.5
    expected = expected + torch.where(mask[..., None], lora, 0.0)
    grad_out = torch.randn_like(expected)
    results = []
    for trim in (True, False):
        seg = SegmentInfo.from_row_mask(mask, trim=trim)
        y = multi_lora_linear(x, w, bias, a, b, scale, seg, backend=backend)
        results.append((y.detach(), torch.autograd.grad(y, leaves, grad_out.to(dtype))))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][0].double(), expected, **tol)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("case", ["mixed_dropout", "all_text", "all_image", "text_adapter"])
def test_static_segments_against_float64(backend, case):
    """The static (``B * N``-segment, empty-tail) segments of ``from_row_mask`` against a float64 formula, output
    and every gradient (``dA``, ``dB``, ``ds`` come from the grouped outer product, whose Triton kernel walks
    only the segments before the empty tail): mixed spans with dropout, an all-text batch (one run, base
    only), an all-image batch (one run), text runs on a second adapter (PEFT stacked over PLoRA)."""
    device = kernel_device(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    rows, cols = 3, 23
    mask = {"mixed_dropout": random_mask(rows, cols), "text_adapter": random_mask(rows, cols),
            "all_text": torch.zeros(rows, cols, dtype=torch.bool),
            "all_image": torch.ones(rows, cols, dtype=torch.bool)}[case]
    false_adapter = 1 if case == "text_adapter" else -1
    p = 0.25 if case == "mixed_dropout" else 0.0
    K, N, R = 12, 10, 5
    num_adapters = 2 if false_adapter == 1 else 1
    inputs = [torch.randn(rows, cols, K, dtype=torch.float64), torch.randn(N, K, dtype=torch.float64),
              torch.randn(N, dtype=torch.float64), torch.randn(num_adapters, R, K, dtype=torch.float64),
              torch.randn(num_adapters, N, R, dtype=torch.float64), torch.rand(num_adapters, dtype=torch.float64) + 0.5]
    grad_out = torch.randn(rows, cols, N, dtype=torch.float64)
    seg = SegmentInfo.from_row_mask(mask.to(device), false_adapter=false_adapter, trim=False)
    assert seg.num_segments == rows * cols  # the static bound: an empty tail after the runs
    leaves = [t.to(device, dtype).requires_grad_() for t in inputs]
    y = multi_lora_linear(*leaves, seg, dropout_p=p, seed=7, backend=backend)
    got = torch.autograd.grad(y, leaves, grad_out.to(device, dtype))

    exact = [t.clone().requires_grad_() for t in inputs]
    x, w, bias, a, b, scale = exact
    keep = dropout_keep_mask(7, rows * cols, K, p, device, backend=backend).view(rows, cols, K).cpu()
    dropped = torch.where(keep, x / (1.0 - p), 0.0) if p else x
    want_y = x @ w.t() + bias
    image = dropped @ a[0].t() @ b[0].t() * scale[0]
    text = dropped @ a[-1].t() @ b[-1].t() * scale[-1] if false_adapter == 1 else torch.zeros_like(want_y)
    want_y = want_y + torch.where(mask[..., None], image, text)
    want = torch.autograd.grad(want_y, exact, grad_out, allow_unused=True)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y.detach().double().cpu(), want_y.detach(), **tol)
    for name, g, w_, t in zip(["x", "weight", "bias", "lora_a", "lora_b", "scale"], got, want, inputs):
        torch.testing.assert_close(g.double().cpu(), torch.zeros_like(t) if w_ is None else w_, **tol, msg=name)
    if not mask.any() and false_adapter == -1:  # no image row: exact zero adapter gradients
        assert all(torch.count_nonzero(g) == 0 for g in got[3:])
