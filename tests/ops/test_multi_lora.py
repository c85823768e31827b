"""The segmented multi-LoRA linear against a float64 reference, on every backend (``available_backends``).

Low-precision results are judged the flash-attention way: the op's error against a float64 reference may
be at most ``FACTOR`` times the error of the plain PyTorch computation in the same dtype (the per-segment
loop of ``multi_lora_linear_ref``), plus a small floor.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

from helpers.accuracy import assert_within_pytorch_error
from conftest import available_backends, kernel_device
from monkey_kernels import SegmentInfo, dropout_keep_mask, multi_lora_linear, multi_lora_linear_ref
from monkey_kernels._triton.env import interpreter_active

BACKENDS = available_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Dtypes beyond DTYPES that a backend runs in the shared matrix: the CPU backends compute float64 in float64.
EXTRA_DTYPES = {"native": [torch.float64], "torch": [torch.float64]}


@dataclass
class Case:
    lengths: list
    adapter_ids: list
    in_features: int
    out_features: int
    ranks: list
    lora_in_features: Optional[int] = None  # V != U when set
    residual: bool = False
    bias: bool = True
    batch_layout: bool = False  # [batch, seq, K] input with one adapter per batch row
    trainable: tuple = field(default=("input", "lora_input", "lora_a", "lora_b", "scale", "residual"))


CASES = {
    # one adapter per batch row of a [batch, seq, K] input, Monkey-like: 4 tiles + a global view (-1)
    "batch_rows": Case([9] * 5, [0, 1, 2, 3, -1], 40, 48, [16] * 4, batch_layout=True),
    # ragged and empty segments, an adapter used twice, base-only segments, odd K and N
    "ragged_empty": Case([7, 0, 33, 20, 0, 5, 1], [1, 0, -1, 2, 1, 0, 2], 37, 45, [5, 5, 5]),
    # mixed ranks, rank 1, r_max not a power of two, trainable base weight and bias too
    "mixed_ranks": Case(
        [12, 30, 3], [2, 0, 1], 33, 19, [1, 7, 3],
        trainable=("input", "weight", "bias", "lora_a", "lora_b", "scale"),
    ),
    # Monkey's mlp_lora: GEMM on U, LoRA on a different V, residual added in the same pass
    "separate_input_residual": Case(
        [17, 0, 21, 9], [0, 1, -1, 1], 53, 29, [8, 4], lora_in_features=29, residual=True
    ),
    # segments long enough (>= 32 rows on average) for the native backend's merged weights (W + s B A), with an
    # adapter too small to be worth merging (10 rows), a base-only segment and a residual
    "long_segments": Case([48, 0, 70, 10, 36], [1, -1, 0, 2, -1], 37, 45, [6, 3, 4], residual=True),
    # Partial LoRA's ranks: 256 (four 64-wide chunks in the Triton shrink and GEMM epilogue, two in the outer
    # product) and 8 (4KHD's wqkv) with junk past it, image runs between base-only text runs
    "rank256_plora": Case([40, 9, 0, 23, 5], [-1, 0, 1, 0, 1], 24, 20, [256, 8]),
}


def make_tensors(case: Case, dtype: torch.dtype, device: torch.device):
    num_adapters, r_max = len(case.ranks), max(case.ranks)
    num_rows = sum(case.lengths)
    lora_in = case.lora_in_features or case.in_features
    lead = (len(case.lengths), case.lengths[0]) if case.batch_layout else (num_rows,)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    lora_a = rand(num_adapters, r_max, lora_in, scale=lora_in**-0.5)
    lora_b = rand(num_adapters, case.out_features, r_max, scale=r_max**-0.5)
    for adapter, rank in enumerate(case.ranks):  # entries past the rank hold junk: they must not count
        lora_a.data[adapter, rank:] = 7.0
        lora_b.data[adapter, :, rank:] = -5.0
    tensors = {
        "input": rand(*lead, case.in_features),
        "weight": rand(case.out_features, case.in_features, scale=case.in_features**-0.5),
        "bias": rand(case.out_features) if case.bias else None,
        "lora_a": lora_a,
        "lora_b": lora_b,
        "scale": (torch.rand(num_adapters, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype),
        "lora_input": rand(*lead, lora_in) if case.lora_in_features else None,
        "residual": rand(*lead, case.out_features) if case.residual else None,
    }
    for name in case.trainable:
        if tensors.get(name) is not None:
            tensors[name].requires_grad_(True)
    if case.batch_layout:
        segments = SegmentInfo.from_batch(case.adapter_ids, case.lengths[0], device=device)
    else:
        indptr = [0] + list(itertools.accumulate(case.lengths))
        segments = SegmentInfo.from_indptr(indptr, case.adapter_ids, device=device)
    return tensors, segments


def run_op(tensors, segments, case, backend, dropout_p=0.0, seed=None):
    return multi_lora_linear(
        tensors["input"], tensors["weight"], tensors["bias"], tensors["lora_a"], tensors["lora_b"],
        tensors["scale"], segments, ranks=case.ranks, lora_input=tensors["lora_input"],
        residual=tensors["residual"], dropout_p=dropout_p, seed=seed, backend=backend,
    )


def run_reference(tensors, segments, case, dtype, keep_mask=None, dropout_p=0.0):
    """The per-segment loop on copies of the inputs cast to ``dtype``; returns (output, leaf copies)."""
    leaves = {
        name: None if t is None else t.detach().cpu().to(dtype).requires_grad_(t.requires_grad)
        for name, t in tensors.items()
    }
    out = multi_lora_linear_ref(
        leaves["input"], leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"],
        leaves["scale"], segments.to("cpu"), ranks=case.ranks, lora_input=leaves["lora_input"],
        residual=leaves["residual"], keep_mask=None if keep_mask is None else keep_mask.cpu(),
        dropout_p=dropout_p,
    )
    return out, leaves


def grads_of(output, leaves: dict, grad_output):
    names = [n for n, t in leaves.items() if t is not None and t.requires_grad]
    grads = torch.autograd.grad(output, [leaves[n] for n in names], grad_output)
    return dict(zip(names, grads))


def check_against_fp64(case, backend, dtype, dropout_p=0.0, seed=None):
    device = kernel_device(backend)
    tensors, segments = make_tensors(case, dtype, device)
    out = run_op(tensors, segments, case, backend, dropout_p=dropout_p, seed=seed)
    assert out.dtype == dtype and out.shape[:-1] == tensors["input"].shape[:-1]
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite output"
    # The upstream gradient is an input like any other: the float64 reference gets the same (rounded)
    # values as the op, so only the op's own arithmetic counts as its error.
    grad_output = torch.randn(out.shape, dtype=torch.float64).to(dtype).double()
    keep = None
    if dropout_p > 0:
        lora_width = (tensors["lora_input"] if tensors["lora_input"] is not None else tensors["input"]).shape[-1]
        keep = dropout_keep_mask(seed, segments.num_rows, lora_width, dropout_p, device, backend=backend)
        keep = keep.view(*out.shape[:-1], lora_width)
    grads = grads_of(out, {n: t for n, t in tensors.items()}, grad_output.to(device=device, dtype=dtype))

    ref64, leaves64 = run_reference(tensors, segments, case, torch.float64, keep, dropout_p)
    grads64 = grads_of(ref64, leaves64, grad_output)
    plain, leaves_plain = run_reference(tensors, segments, case, dtype, keep, dropout_p)
    grads_plain = grads_of(plain, leaves_plain, grad_output.to(dtype))
    # The same float64 computation on |inputs| bounds the sum of |terms| of every output entry: where the terms
    # cancel (a 2-entry dscale, say), rounding errors scale with it, not with the small result.
    magnitude = {n: t.abs() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for n, t in tensors.items()}
    abs64, abs_leaves64 = run_reference(magnitude, segments, case, torch.float64, keep, dropout_p)
    magnitudes = {"output": abs64, **grads_of(abs64, abs_leaves64, grad_output.abs())}

    assert_within_pytorch_error(backend, dtype, out, plain, ref64, grads, grads_plain, grads64, magnitudes)
    return tensors, grads


MATRIX = [
    pytest.param(backend, case_name, dtype, id=f"{backend}-{case_name}-{str(dtype).split('.')[-1]}")
    for backend in BACKENDS for case_name in CASES for dtype in DTYPES + EXTRA_DTYPES.get(backend, [])
]


@pytest.mark.parametrize("backend, case_name, dtype", MATRIX)
def test_matches_fp64_reference(backend, case_name, dtype):
    case = CASES[case_name]
    tensors, grads = check_against_fp64(case, backend, dtype)
    for adapter, rank in enumerate(case.ranks):  # columns past an adapter's rank get exactly zero gradient
        if "lora_a" in grads:
            assert (grads["lora_a"][adapter, rank:] == 0).all()
            assert (grads["lora_b"][adapter, :, rank:] == 0).all()
    unused = set(range(len(case.ranks))) - {a for a, n in zip(case.adapter_ids, case.lengths) if n > 0}
    for adapter in unused:  # adapters that own no rows get zero gradients, not garbage
        assert (grads["lora_a"][adapter] == 0).all() and (grads["lora_b"][adapter] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case_name", ["ragged_empty", "separate_input_residual"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_gradients_follow_the_mask_used(backend, case_name, dtype):
    """Output and every gradient equal the reference run with the backend's own mask for that seed."""
    check_against_fp64(CASES[case_name], backend, dtype, dropout_p=0.3, seed=1234 + len(case_name))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_same_seed_same_result_other_seed_differs(backend):
    case = CASES["ragged_empty"]
    tensors, segments = make_tensors(case, torch.float32, kernel_device(backend))
    first = run_op(tensors, segments, case, backend, dropout_p=0.25, seed=7)
    again = run_op(tensors, segments, case, backend, dropout_p=0.25, seed=7)
    other = run_op(tensors, segments, case, backend, dropout_p=0.25, seed=8)
    no_dropout = run_op(tensors, segments, case, backend)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert not torch.allclose(first, no_dropout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_mask_statistics(backend, p):
    rows, cols = 192, 160
    keep = dropout_keep_mask(99, rows, cols, p, kernel_device(backend), backend=backend).cpu()
    assert keep.dtype == torch.bool and keep.shape == (rows, cols)
    n = rows * cols
    kept = keep.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept - (1 - p)) < 5 * sigma, f"kept fraction {kept:.4f}, expected {1 - p}"
    # no structure along rows or columns: every row and column keeps roughly 1 - p
    for axis_mean, count in ((keep.float().mean(1), cols), (keep.float().mean(0), rows)):
        assert (axis_mean - (1 - p)).abs().max().item() < 6 * (p * (1 - p) / count) ** 0.5 + 1e-9
    assert not torch.equal(keep, dropout_keep_mask(100, rows, cols, p, kernel_device(backend), backend=backend).cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_adapters_and_large_ranks(backend):
    """64 adapters, ranks from 1 to 128 (R_BLOCK 128), short ragged segments."""
    generator = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
    num_adapters = 64
    ranks = [1 + (i * 37) % 128 for i in range(num_adapters)]
    ranks[0] = 128
    lengths = torch.randint(0, 4, (70,), generator=generator).tolist()
    ids = torch.randint(-1, num_adapters, (70,), generator=generator).tolist()
    case = Case(lengths, ids, 24, 20, ranks, trainable=("input", "lora_a", "lora_b", "scale"))
    check_against_fp64(case, backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_without_dropout(backend):
    case = CASES["separate_input_residual"]
    tensors, segments = make_tensors(case, torch.float32, kernel_device(backend))
    out = run_op(tensors, segments, case, backend)
    cpu_tensors = {n: None if t is None else t.detach().cpu() for n, t in tensors.items()}
    other = run_op(cpu_tensors, segments.to("cpu"), case, "torch")
    torch.testing.assert_close(out.cpu(), other, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_give_the_contiguous_result(backend):
    device = kernel_device(backend)
    case = CASES["ragged_empty"]
    tensors, segments = make_tensors(case, torch.float32, device)
    expected = run_op(tensors, segments, case, backend)
    strided = dict(tensors)
    strided["input"] = tensors["input"].detach().t().contiguous().t()  # column-major [M, K]
    strided["weight"] = tensors["weight"].detach().t().contiguous().t()
    strided["lora_a"] = tensors["lora_a"].detach().transpose(1, 2).contiguous().transpose(1, 2)
    strided["lora_b"] = tensors["lora_b"].detach()[:, :, :].transpose(0, 1).contiguous().transpose(0, 1)
    wide = torch.randn(2, tensors["scale"].numel(), device=device)
    wide[0] = tensors["scale"].detach()
    strided["scale"] = wide[0]
    assert not strided["input"].is_contiguous() and not strided["weight"].is_contiguous()
    torch.testing.assert_close(run_op(strided, segments, case, backend), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    device = kernel_device(backend)
    x = torch.randn(0, 5, 8, device=device, requires_grad=True)
    weight = torch.randn(6, 8, device=device)
    lora_a = torch.randn(2, 4, 8, device=device, requires_grad=True)
    lora_b = torch.randn(2, 6, 4, device=device, requires_grad=True)
    scale = torch.ones(2, device=device, requires_grad=True)
    out = multi_lora_linear(x, weight, None, lora_a, lora_b, scale, [], backend=backend)
    assert out.shape == (0, 5, 6)
    out.sum().backward()
    assert x.grad.shape == x.shape and (lora_a.grad == 0).all() and (scale.grad == 0).all()


@pytest.mark.skipif(not (torch.cuda.is_available() or interpreter_active()), reason="needs the Triton kernels")
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_grouped_outer_product_with_row_splits(num_splits, dropout_p):
    """The dA/dB kernel, its parallel row splits included, against float64 on segments that the splits
    cut unevenly (lengths not multiples of the split count, empty segments, an adapter used twice)."""
    from monkey_kernels._triton.multi_lora import segmented_outer

    device = kernel_device("triton")
    lengths, ids = [10, 0, 7, 31, 2], [1, 0, 1, -1, 2]
    segments = SegmentInfo.from_indptr([0] + list(itertools.accumulate(lengths)), ids, device=device)
    num_adapters, width, rank, r_block = 4, 45, 5, 16
    x = torch.randn(segments.num_rows, width, device=device)
    y = torch.randn(segments.num_rows, r_block, device=device)
    scale = torch.rand(num_adapters, device=device) + 0.5
    out = torch.full((num_adapters, width, rank), float("nan"), device=device)
    segmented_outer(x, y, segments, out, scale=scale, dropout_p=dropout_p, seed=11, num_splits=num_splits)

    keep = dropout_keep_mask(11, segments.num_rows, width, dropout_p, device, backend="triton")
    x64 = torch.where(keep, x.double() / (1 - dropout_p), 0.0) if dropout_p else x.double()
    expected = torch.zeros(num_adapters, width, rank, dtype=torch.float64)
    row_adapter = segments.row_adapter.cpu()
    for adapter in range(num_adapters):
        rows = row_adapter == adapter
        expected[adapter] = scale[adapter].double().cpu() * x64.cpu()[rows].t() @ y.double().cpu()[rows, :rank]
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not (torch.cuda.is_available() or interpreter_active()), reason="needs the Triton kernels")
def test_grouped_outer_product_never_walks_segments_past_the_rows():
    """The dA/dB kernel bounds its segment loop by the segments that start before ``num_rows`` (a binary search
    on the device; the static segments of ``SegmentInfo.from_row_mask`` end in up to ``M`` empty ones at offset
    ``M``). Shown with metadata no valid ``SegmentInfo`` has: a tail segment that starts at ``num_rows`` and
    reaches into extra rows of ``x`` (huge values). A kernel walking it would add them; this one matches the
    float64 sum over the real rows, with empty segments of real adapters before and inside the tail."""
    from types import SimpleNamespace

    from monkey_kernels._triton.multi_lora import segmented_outer

    device = kernel_device("triton")
    num_rows, extra = 29, 6
    offsets = [0, 4, 4, 11, 20, num_rows, num_rows, num_rows, num_rows + extra]
    ids = [0, 1, -1, 1, 0, 0, 1, 0]  # segments 5.. start at num_rows; the last one would cover the extra rows
    segments = SimpleNamespace(
        seg_indptr=torch.tensor(offsets, dtype=torch.int32, device=device),
        adapter_ids=torch.tensor(ids, dtype=torch.int32, device=device),
        num_segments=len(ids), num_rows=num_rows,
    )
    width, rank = 9, 4
    x = torch.randn(num_rows + extra, width, device=device)
    x[num_rows:] = 1e6
    y = torch.randn(num_rows + extra, rank, device=device)
    out = torch.full((2, width, rank), float("nan"), device=device)
    segmented_outer(x, y, segments, out, num_splits=1)
    expected = torch.zeros(2, width, rank, dtype=torch.float64)
    for g, adapter in enumerate(ids[:5]):
        if adapter >= 0:
            rows = slice(offsets[g], offsets[g + 1])
            expected[adapter] += x.double().cpu()[rows].t() @ y.double().cpu()[rows]
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)
