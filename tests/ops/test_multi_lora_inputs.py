"""Bad and edge inputs of ``multi_lora_linear`` and ``dropout_keep_mask``, every backend: bad input gives a
``ValueError`` whose message names the bad argument, edge input a correct result (float64 reference).

Covered here: wrong shapes and ranks, non-float / complex / bool / mixed dtypes, the ``meta`` device as "another
device", adapter ids out of range (also ids that would wrap in int32), seeds and ``dropout_p`` out of range, wrong
``segments`` types; empty batches and zero-length segments, expanded (stride-0) inputs, NaN / inf that must stay in
their own rows and segments (forward and gradients).

Cases that expose a bug outside the test files are marked ``xfail(strict=True)`` with the bug in the reason: they
fail loudly (XPASS) once fixed, so the marker cannot outlive the bug.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from helpers.accuracy import non_finite_pattern
from conftest import available_backends, kernel_device
from monkey_kernels import SegmentInfo, dropout_keep_mask, multi_lora_linear, multi_lora_linear_ref

BACKENDS = available_backends()


def xfail_if(condition: bool, reason: str):
    return [pytest.mark.xfail(strict=True, reason=reason)] if condition else []


# ---------------------------------------------------------------------------------------------------------
# Argument tables
# ---------------------------------------------------------------------------------------------------------
K, N, NUM_ADAPTERS, R_MAX = 8, 5, 2, 3


def op_args(device="cpu", dtype=torch.float32, rows=6):
    """A valid problem: ``rows`` rows of width ``K`` in two segments (adapter 1, then base only)."""
    return dict(
        input=torch.randn(rows, K, device=device, dtype=dtype),
        weight=torch.randn(N, K, device=device, dtype=dtype),
        bias=torch.randn(N, device=device, dtype=dtype),
        lora_a=torch.randn(NUM_ADAPTERS, R_MAX, K, device=device, dtype=dtype),
        lora_b=torch.randn(NUM_ADAPTERS, N, R_MAX, device=device, dtype=dtype),
        scale=torch.rand(NUM_ADAPTERS, device=device) + 0.5,
        segments=SegmentInfo.from_indptr([0, 2, 6], [1, -1], device=device),
    )


def call_op(backend, args, **kwargs):
    return multi_lora_linear(args["input"], args["weight"], args["bias"], args["lora_a"], args["lora_b"],
                             args["scale"], args["segments"], backend=backend, **kwargs)


_KEYWORDS = ("ranks", "lora_input", "residual", "dropout_p", "seed")


def call(backend="torch", **overrides):
    """The op on :func:`op_args` with some arguments (positional or keyword) replaced."""
    args = op_args()
    kwargs = {k: overrides.pop(k) for k in list(overrides) if k in _KEYWORDS}
    args.update(overrides)
    return call_op(backend, args, **kwargs)


def meta(t):
    return t.to("meta")


# multi_lora_linear: (overrides, pattern naming the argument)
@pytest.mark.parametrize(
    "overrides, name",
    [
        ({"weight": torch.randn(5, 7)}, "weight"),
        ({"weight": torch.randn(5)}, "weight"),
        ({"bias": torch.randn(4)}, "bias"),
        ({"lora_a": torch.randn(2, 3, 7)}, "lora_a"),
        ({"lora_b": torch.randn(2, 5, 4)}, "lora_b"),
        ({"lora_b": torch.randn(3, 5, 3)}, "lora_b"),
        ({"scale": torch.ones(3)}, "scale"),
        ({"scale": torch.ones(2, dtype=torch.int64)}, "scale"),
        ({"weight": torch.randn(5, 8, dtype=torch.float64)}, "weight"),
        ({"lora_a": torch.randn(2, 3, 8, dtype=torch.bfloat16)}, "lora_a"),
        ({"residual": torch.randn(6, 4)}, "residual"),
        ({"residual": torch.randn(6, 5, dtype=torch.float16)}, "residual"),
        ({"lora_input": torch.randn(5, 8)}, "lora_input"),
        ({"lora_input": torch.randn(6, 9)}, "lora_a"),
        ({"segments": SegmentInfo.from_indptr([0, 2, 7], [1, -1])}, "rows"),
        ({"segments": SegmentInfo.from_indptr([0, 2, 6], [2, 0])}, "adapter id 2"),
        ({"ranks": [3, 4]}, "r_max"),
        ({"ranks": [3, -1]}, "ranks"),
        ({"ranks": [3]}, "ranks"),
        ({"ranks": torch.tensor([1.0, 2.0])}, "ranks"),
        ({"dropout_p": 1.0}, "dropout_p"),
        ({"dropout_p": -0.1}, "dropout_p"),
        ({"seed": -3}, "seed"),
        ({"input": torch.ones(6, 8, dtype=torch.int32)}, "input"),
        ({"input": torch.randn(6, 8, device="meta")}, "device"),
        ({"weight": [[1.0]]}, "weight"),
    ],
)
@pytest.mark.parametrize("backend", available_backends())
def test_bad_arguments_raise_value_error_naming_them(backend, overrides, name):
    with pytest.raises(ValueError, match=name):
        call(backend=backend, **overrides)


def test_adapter_ids_shorthand_needs_batch_layout():
    args = op_args()
    with pytest.raises(ValueError, match="batch, seq, K"):
        call(segments=torch.tensor([0, 1]))
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="one adapter id per batch row"):
        multi_lora_linear(x, args["weight"], None, args["lora_a"], args["lora_b"], args["scale"], [0, 1, 0])
    out = multi_lora_linear(x, args["weight"], None, args["lora_a"], args["lora_b"], args["scale"], [0, -1])
    assert out.shape == (2, 3, 5)


def test_segments_on_another_device_are_rejected():
    args = op_args()
    with pytest.raises(ValueError, match="segments are on"):
        call(input=args["input"].to("meta"), weight=args["weight"].to("meta"), bias=args["bias"].to("meta"),
             lora_a=args["lora_a"].to("meta"), lora_b=args["lora_b"].to("meta"), scale=args["scale"].to("meta"))


def test_triton_backend_rejects_float64():
    args = op_args(dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        multi_lora_linear(args["input"], args["weight"], args["bias"], args["lora_a"], args["lora_b"],
                          args["scale"].double(), args["segments"], backend="triton")


# (positional overrides, keyword arguments, pattern naming the argument)
OP_ERRORS = {
    "input_0d": ({"input": torch.tensor(1.0)}, {}, "input must have at least 1"),
    "input_bool": ({"input": torch.ones(6, K, dtype=torch.bool)}, {}, "input must be float"),
    "input_complex": ({"input": torch.ones(6, K, dtype=torch.complex64)}, {}, "input must be float"),
    "weight_3d": ({"weight": torch.randn(1, N, K)}, {}, "weight must be 2-D"),
    "lora_a_2d": ({"lora_a": torch.randn(R_MAX, K)}, {}, "lora_a must be 3-D"),
    "lora_b_4d": ({"lora_b": torch.randn(1, NUM_ADAPTERS, N, R_MAX)}, {}, "lora_b must be 3-D"),
    "scale_0d": ({"scale": torch.tensor(1.0)}, {}, "scale must be 1-D"),
    "scale_2d": ({"scale": torch.ones(1, NUM_ADAPTERS)}, {}, "scale must be 1-D"),
    "bias_2d": ({"bias": torch.randn(1, N)}, {}, "bias must be 1-D"),
    "bias_int": ({"bias": torch.ones(N, dtype=torch.int32)}, {}, "bias has dtype torch.int32"),
    "weight_int": ({"weight": torch.ones(N, K, dtype=torch.int64)}, {}, "weight has dtype torch.int64"),
    "lora_b_fp16": ({"lora_b": torch.randn(NUM_ADAPTERS, N, R_MAX, dtype=torch.float16)}, {}, "lora_b has dtype"),
    "scale_complex": ({"scale": torch.ones(NUM_ADAPTERS, dtype=torch.complex64)}, {}, "scale must be a float"),
    "scale_bool": ({"scale": torch.ones(NUM_ADAPTERS, dtype=torch.bool)}, {}, "scale must be a float"),
    "lora_input_fp64": ({}, {"lora_input": torch.randn(6, K, dtype=torch.float64)}, "lora_input has dtype"),
    "residual_bf16": ({}, {"residual": torch.randn(6, N, dtype=torch.bfloat16)}, "residual has dtype"),
    "weight_meta": ({"weight": "meta"}, {}, "weight is on meta"),
    "bias_meta": ({"bias": "meta"}, {}, "bias is on meta"),
    "lora_a_meta": ({"lora_a": "meta"}, {}, "lora_a is on meta"),
    "lora_b_meta": ({"lora_b": "meta"}, {}, "lora_b is on meta"),
    "scale_meta": ({"scale": "meta"}, {}, "scale is on meta"),
    "lora_input_meta": ({}, {"lora_input": torch.randn(6, K, device="meta")}, "lora_input is on meta"),
    "residual_meta": ({}, {"residual": torch.randn(6, N, device="meta")}, "residual is on meta"),
    "segments_meta": ({"segments": SegmentInfo.from_indptr(torch.tensor([0, 2, 6], device="meta"),
                                                           torch.tensor([1, -1], device="meta"),
                                                           num_rows=6, validate=False)}, {}, "segments are on meta"),
    "ranks_meta": ({}, {"ranks": torch.tensor([1, 2], device="meta")}, "ranks is on meta"),
    "ranks_bool": ({}, {"ranks": torch.tensor([True, True])}, "ranks must be a 1-D integer"),
    "ranks_2d": ({}, {"ranks": torch.tensor([[1, 2]])}, "ranks must be a 1-D integer"),
    "ranks_str": ({}, {"ranks": "12"}, "ranks"),
    "ranks_int": ({}, {"ranks": 3}, "ranks must be a sequence"),
    "dropout_nan": ({}, {"dropout_p": float("nan")}, "dropout_p"),
    "dropout_inf": ({}, {"dropout_p": float("inf")}, "dropout_p"),
    "dropout_str": ({}, {"dropout_p": "0.1"}, "dropout_p"),
    "dropout_bool": ({}, {"dropout_p": True}, "dropout_p"),
    "dropout_tensor": ({}, {"dropout_p": torch.tensor(0.1)}, "dropout_p"),
    "seed_2_31": ({}, {"dropout_p": 0.1, "seed": 2**31}, "seed"),
    "seed_huge": ({}, {"dropout_p": 0.1, "seed": 2**70}, "seed"),
    "seed_float": ({}, {"dropout_p": 0.1, "seed": 3.0}, "seed"),
    "seed_bool": ({}, {"dropout_p": 0.1, "seed": True}, "seed"),
    "seed_tensor_negative": ({}, {"dropout_p": 0.1, "seed": torch.tensor(-5)}, "seed must be in"),
    "seed_tensor_huge": ({}, {"dropout_p": 0.1, "seed": torch.tensor(2**40)}, "seed must be in"),
    "seed_tensor_float": ({}, {"dropout_p": 0.1, "seed": torch.tensor(3.0)}, "seed must be an int"),
    "seed_tensor_two": ({}, {"dropout_p": 0.1, "seed": torch.tensor([1, 2])}, "seed must be an int"),
    "seed_tensor_meta": ({}, {"dropout_p": 0.1, "seed": torch.tensor(3, device="meta")}, "seed must be a CPU"),
    "backend_unknown": ({}, {"backend": "cuda-magic"}, "backend must be one of"),
    "backend_int": ({}, {"backend": 3}, "backend must be one of"),
    "segments_none": ({"segments": None}, {}, "segments must be a SegmentInfo"),
    "segments_str": ({"segments": "01"}, {}, "segments must be a SegmentInfo"),
    "segments_float": ({"segments": 1.5}, {}, "segments must be a SegmentInfo"),
    "segments_dict": ({"segments": {0: 1}}, {}, "segments must be a SegmentInfo"),
    "segments_set": ({"segments": {0, 1}}, {}, "segments must be a SegmentInfo"),
    "unvalidated_rows_mismatch": ({"segments": SegmentInfo.from_indptr([0, 2, 7], [1, -1], num_rows=7,
                                                                       validate=False)}, {}, "rows"),
}


@pytest.mark.parametrize("name", list(OP_ERRORS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_lora_linear_bad_arguments(backend, name):
    overrides, kwargs, pattern = OP_ERRORS[name]
    kwargs = dict(kwargs)
    args = op_args()
    for key, value in overrides.items():
        args[key] = meta(args[key]) if value == "meta" else value
    if "backend" in kwargs:
        backend = kwargs.pop("backend")
    with pytest.raises(ValueError, match=pattern):
        call_op(backend, args, **kwargs)


# Adapter ids given as the [batch] shorthand for a [batch, seq, K] input
ID_ERRORS = {
    "id_equal_num_adapters": ([0, NUM_ADAPTERS], "adapter id 2, out of range for num_adapters=2"),
    "id_far_out_of_range": ([0, 1000], "adapter id 1000"),
    "id_minus_two": ([-2, 0], r"adapter_ids\[0\]=-2"),
    "id_wraps_int32": ([0, 2**32 + 1], "adapter_ids must fit in int32"),  # would silently become adapter 1
    "id_float": ([0, 0.5], "adapter_ids must be a 1-D sequence of ints"),  # would silently become adapter 0
    "id_bool": ([True, False], "adapter_ids must be a 1-D sequence of ints"),
    "id_tensor_float": (torch.tensor([0.0, 1.0]), "adapter_ids must be an integer tensor"),
    "id_tensor_complex": (torch.tensor([0j, 1j]), "adapter_ids must be an integer tensor"),
    "id_tensor_2d": (torch.tensor([[0, 1]]), "adapter_ids must be 1-D"),
    "id_tensor_wraps": (torch.tensor([0, 2**33], dtype=torch.int64), "adapter_ids must fit in int32"),
    "id_count": ([0, 1, 0], "one adapter id per batch row"),
}


@pytest.mark.parametrize("name", list(ID_ERRORS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_id_shorthand_out_of_range(backend, name):
    ids, pattern = ID_ERRORS[name]
    args = op_args()
    args["input"] = args["input"].view(2, 3, K)
    args["segments"] = ids
    with pytest.raises(ValueError, match=pattern):
        call_op(backend, args)


def test_unvalidated_segments_are_not_checked_against_num_adapters_but_valid_ones_run():
    """``validate=False`` (CUDA-graph capture) skips the host read: ``max_adapter_id`` is unknown, which the op
    accepts as documented; with valid ids the result is the validated one."""
    args = op_args()
    expected = call_op("torch", args)
    args["segments"] = SegmentInfo.from_indptr([0, 2, 6], [1, -1], num_rows=6, validate=False)
    assert args["segments"].max_adapter_id is None
    torch.testing.assert_close(call_op("torch", args), expected)

# ---------------------------------------------------------------------------------------------------------
# multi_lora_linear: correct results on edge inputs (float64 reference)
# ---------------------------------------------------------------------------------------------------------
def reference64(args, segments, ranks=None, **kwargs):
    cast = {k: (v.detach().double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    extra = {k: v.detach().double().cpu() for k, v in kwargs.items() if v is not None}
    return multi_lora_linear_ref(cast["input"], cast["weight"], cast["bias"], cast["lora_a"], cast["lora_b"],
                                 cast["scale"], segments.to("cpu"), ranks=ranks, **extra)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_float_scale_dtype_and_integer_ranks_tensor(backend):
    """``scale`` may have any float dtype (fp64 next to fp32 activations); ranks as an int16 tensor."""
    device = kernel_device(backend)
    args = op_args(device)
    args["scale"] = args["scale"].double()
    ranks = torch.tensor([1, 3], dtype=torch.int16)
    out = call_op(backend, args, ranks=ranks)
    torch.testing.assert_close(out.double().cpu(), reference64(args, args["segments"], ranks=ranks.tolist()),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches_and_zero_length_segments(backend):
    device = kernel_device(backend)
    args = op_args(device, rows=0)
    # M = 0 with zero, one and three (all empty) segments, and a [3, 0, K] batch of zero-length sequences
    for segments in (SegmentInfo.from_indptr([0], [], device=device),
                     SegmentInfo.from_indptr([0, 0], [1], device=device),
                     SegmentInfo.from_batch([0, 1, -1], 0, device=device)):
        args["segments"] = segments
        out = call_op(backend, args)
        assert out.shape == (0, N)
    x = torch.randn(3, 0, K, device=device, requires_grad=True)
    args["input"] = x
    out = call_op(backend, args | {"segments": [0, 1, -1]})
    assert out.shape == (3, 0, N)
    out.sum().backward()
    assert x.grad.shape == x.shape
    # zero-length segments between non-empty ones, first and last included
    args = op_args(device, rows=7)
    args["segments"] = SegmentInfo.from_indptr([0, 0, 3, 3, 3, 7, 7], [1, 0, -1, 1, 0, 1], device=device)
    torch.testing.assert_close(call_op(backend, args).double().cpu(), reference64(args, args["segments"]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_stride_zero_inputs_forward_and_backward(backend):
    """Every tensor argument as a stride-0 ``expand`` of a smaller leaf: same output and gradients as the
    materialised tensors (float64 reference)."""
    device = kernel_device(backend)
    leaves = {
        "input": torch.randn(1, K, device=device), "weight": torch.randn(1, K, device=device),
        "bias": torch.randn(1, device=device), "lora_a": torch.randn(1, R_MAX, K, device=device),
        "lora_b": torch.randn(NUM_ADAPTERS, N, 1, device=device), "scale": torch.rand(1, device=device) + 0.5,
        "residual": torch.randn(1, 1, device=device),
    }
    shapes = {"input": (6, K), "weight": (N, K), "bias": (N,), "lora_a": (NUM_ADAPTERS, R_MAX, K),
              "lora_b": (NUM_ADAPTERS, N, R_MAX), "scale": (NUM_ADAPTERS,), "residual": (6, N)}
    segments = SegmentInfo.from_indptr([0, 2, 2, 6], [1, 0, -1], device=device)

    def run(make, dtype):
        tensors = {k: v.detach().to(dtype).requires_grad_() for k, v in leaves.items()}
        used = {k: make(t, shapes[k]) for k, t in tensors.items()}
        if dtype == torch.float64:
            out = multi_lora_linear_ref(used["input"], used["weight"], used["bias"], used["lora_a"], used["lora_b"],
                                        used["scale"], segments.to("cpu"), residual=used["residual"])
        else:
            assert all(used[k].stride().count(0) > 0 for k in used)  # really stride 0
            out = multi_lora_linear(used["input"], used["weight"], used["bias"], used["lora_a"], used["lora_b"],
                                    used["scale"], segments, residual=used["residual"], backend=backend)
        grad = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=dtype).view_as(out)
        out.backward(grad)
        return out.detach(), {k: t.grad for k, t in tensors.items()}

    out, grads = run(lambda t, shape: t.expand(shape), torch.float32)
    ref_out, ref_grads = run(lambda t, shape: t.cpu().expand(shape).contiguous(), torch.float64)
    torch.testing.assert_close(out.double().cpu(), ref_out, rtol=1e-4, atol=1e-4)
    for name in leaves:
        torch.testing.assert_close(grads[name].double().cpu(), ref_grads[name], rtol=1e-4, atol=1e-4,
                                   msg=lambda m, name=name: f"grad {name}: {m}")


# NaN / inf: a non-finite value must reach exactly the entries it reaches in the float64 loop reference, never
# the rows of other segments.
LAYOUTS = {
    "uniform": ([0, 3, 6, 9, 12], [0, -1, 2, 1]),  # segment_length set: the batched path
    "ragged": ([0, 2, 7, 7, 12], [0, -1, 2, 1]),  # with an empty segment: the per-adapter path
}


def _nan_case(name, args):
    """Mutates ``args`` (6 adapters wide enough for every case) in place; returns the ranks to use."""
    nan, inf = float("nan"), float("inf")
    ranks = [2, 4, 3, 4]
    if name == "input_nan":
        args["input"][1, 3] = nan  # segment 0 (adapter 0)
    elif name == "input_inf_adapter_row":
        # segment 3 (adapter 1, full rank); positive weights make the reference row exactly +inf, not NaN
        for key in ("input", "weight"):
            args[key].abs_()
        args["lora_a"][1].abs_()
        args["lora_b"][1].abs_()
        args["input"][10, 2] = inf
    elif name == "input_inf_base_row":
        args["input"][4, 2] = -inf  # segment 1 (base only) in both layouts
    elif name == "residual_nan":
        args["residual"][8, 0] = nan
    elif name == "weight_nan":
        args["weight"][2, 5] = nan  # one output column of every row
    elif name == "lora_a_nan_one_adapter":
        args["lora_a"][0, 0, 0] = nan  # reaches only the rows of adapter 0
    elif name == "lora_b_nan_unused_adapter":
        args["lora_b"][3, 1, 1] = nan  # adapter 3 is used by no segment
    elif name == "scale_nan_unused_adapter":
        args["scale"][3] = nan
    elif name == "nan_past_rank":
        args["lora_a"][0, 3, 1] = nan  # adapter 0 has rank 2: columns 2.. contribute nothing
        args["lora_b"][0, 2, 3] = nan
    return ranks


NAN_CASES = {
    # name: backends (and layouts) with a known bug
    "input_nan": {},
    "input_inf_adapter_row": {},
    "input_inf_base_row": {},
    "residual_nan": {},
    "weight_nan": {},
    "lora_a_nan_one_adapter": {},
    "lora_b_nan_unused_adapter": {},
    "scale_nan_unused_adapter": {},
    "nan_past_rank": {},
}


def _nan_params():
    for backend, layout, case in itertools.product(BACKENDS, LAYOUTS, NAN_CASES):
        reason = NAN_CASES[case].get((backend, layout))
        yield pytest.param(backend, layout, case, marks=xfail_if(reason is not None, reason or ""),
                           id=f"{backend}-{layout}-{case}")


@pytest.mark.parametrize("backend, layout, case", list(_nan_params()))
def test_nan_and_inf_propagate_like_the_reference(backend, layout, case):
    device = kernel_device(backend)
    indptr, ids = LAYOUTS[layout]
    segments = SegmentInfo.from_indptr(indptr, ids, device=device)
    adapters, rank, rows = 4, 4, indptr[-1]
    args = dict(input=torch.randn(rows, K), weight=torch.randn(N, K), bias=torch.randn(N),
                lora_a=torch.randn(adapters, rank, K), lora_b=torch.randn(adapters, N, rank),
                scale=torch.rand(adapters) + 0.5, residual=torch.randn(rows, N))
    ranks = _nan_case(case, args)
    args = {k: v.to(device) for k, v in args.items()}
    residual = args.pop("residual")
    out = multi_lora_linear(args["input"], args["weight"], args["bias"], args["lora_a"], args["lora_b"],
                            args["scale"], segments, ranks=ranks, residual=residual, backend=backend).cpu()
    expected = reference64(args, segments, ranks=ranks, residual=residual)
    bad_rows = (~torch.isfinite(out)).any(1).nonzero().flatten().tolist()
    expected_rows = (~torch.isfinite(expected)).any(1).nonzero().flatten().tolist()
    assert bad_rows == expected_rows, f"non-finite rows {bad_rows}, reference {expected_rows}"
    assert torch.equal(non_finite_pattern(out), non_finite_pattern(expected)), "NaN/inf entries differ"
    finite = torch.isfinite(expected)
    torch.testing.assert_close(out.double()[finite], expected[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("where", ["input", "grad_output"])
@pytest.mark.parametrize("backend, layout", [
    pytest.param(b, layout, id=f"{b}-{layout}") for b in BACKENDS for layout in LAYOUTS
])
def test_nan_row_does_not_leak_into_other_adapters_gradients(backend, layout, where):
    """A NaN in one row of segment 0 (input or output gradient): every gradient has NaN exactly where the
    float64 reference has it (``dA``/``dB`` of adapter 0 within its rank, ``dW``, ...), never in other adapters'
    gradients, never past an adapter's rank; adapter 3 owns no rows and has a NaN scale: zero gradients."""
    device = kernel_device(backend)
    indptr, ids = LAYOUTS[layout]
    segments = SegmentInfo.from_indptr(indptr, ids, device=device)
    rows, adapters = indptr[-1], 4
    ranks = [1, R_MAX, 2, R_MAX]  # adapter 0 (the NaN row's) below R_MAX: its columns past rank 1 stay 0
    base = dict(input=torch.randn(rows, K), weight=torch.randn(N, K), bias=torch.randn(N),
                lora_a=torch.randn(adapters, R_MAX, K), lora_b=torch.randn(adapters, N, R_MAX),
                scale=torch.rand(adapters) + 0.5)
    base["scale"][3] = float("nan")
    grad_out = torch.randn(rows, N)
    if where == "input":
        base["input"][0, 1] = float("nan")
    else:
        grad_out[0, 2] = float("nan")

    def grads(dtype, dev, fn):
        leaves = {k: v.detach().to(dev, dtype).requires_grad_() for k, v in base.items()}
        out = fn(leaves)
        out.backward(grad_out.to(dev, dtype))
        return {k: v.grad.cpu() for k, v in leaves.items()}

    got = grads(torch.float32, device, lambda t: multi_lora_linear(
        t["input"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scale"], segments, ranks=ranks,
        backend=backend))
    expected = grads(torch.float64, "cpu", lambda t: multi_lora_linear_ref(
        t["input"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scale"], segments.to("cpu"), ranks=ranks))
    assert expected["lora_a"][0].isnan().any() and not expected["lora_a"][0, 1:].isnan().any()
    assert (got["lora_a"][3] == 0).all() and (got["lora_b"][3] == 0).all() and got["scale"][3] == 0
    for name in base:
        assert torch.equal(got[name].isnan(), expected[name].isnan()), f"grad {name}: NaN entries differ"
        finite = torch.isfinite(expected[name])
        torch.testing.assert_close(got[name].double()[finite], expected[name][finite], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# dropout_keep_mask
# ---------------------------------------------------------------------------------------------------------
KEEP_MASK_ERRORS = {
    "p_above_one": (dict(p=1.5), "p"),
    "p_nan": (dict(p=float("nan")), "p"),
    "seed_negative": (dict(seed=-1), "seed"),
    "seed_huge": (dict(seed=2**40), "seed"),
    "rows_negative": (dict(rows=-1), "rows"),
    "cols_float": (dict(cols=3.0), "cols"),
    "device_meta": (dict(device="meta"), "device"),
}


@pytest.mark.parametrize("name", list(KEEP_MASK_ERRORS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_keep_mask_bad_arguments(backend, name):
    changes, pattern = KEEP_MASK_ERRORS[name]
    args = dict(seed=7, rows=4, cols=5, p=0.3, device=kernel_device(backend)) | changes
    with pytest.raises((ValueError, TypeError), match=pattern):
        dropout_keep_mask(args["seed"], args["rows"], args["cols"], args["p"], args["device"], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_keep_mask_valid_edges(backend):
    device = kernel_device(backend)
    mask = dropout_keep_mask(2**31 - 1, 33, 7, 0.25, device, backend=backend)
    assert mask.shape == (33, 7) and mask.dtype == torch.bool
    assert torch.equal(mask, dropout_keep_mask(2**31 - 1, 33, 7, 0.25, device, backend=backend))
    assert dropout_keep_mask(0, 5, 3, 0.0, device, backend=backend).all()
    assert dropout_keep_mask(1, 0, 3, 0.5, device, backend=backend).shape == (0, 3)
