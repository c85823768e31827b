"""Robustness of every public entry point (issue 7): bad input gives a ``ValueError`` / ``TypeError`` whose message
names the bad argument, or a correct result (checked against a float64 reference).

Covered here and not in the per-op test files: wrong ranks, non-float / complex / bool / mixed dtypes, the ``meta``
device as "another device", adapter ids out of range (also ids that would wrap in int32), NaN / inf that must stay in
their own rows and segments (forward and gradients), empty batches and zero-length segments, expanded (stride-0)
inputs, seeds and ``dropout_p`` out of range, wrong ``segments`` types; hypothesis fuzzing of malformed segment
offsets; ``patch_model`` / ``unpatch_model`` round trips of the Monkey encoder, a PEFT tower and an SLP model.

Cases that expose a bug outside the files this module's author may edit are marked ``xfail(strict=True)`` with the
bug in the reason: they fail loudly (XPASS) once fixed, so the marker cannot outlive the bug.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import available_backends, kernel_device
from monkey_kernels import (
    FusedSLPEmbedding, MultiLoRALinear, SegmentInfo, adapter_selection, dropout_keep_mask, multi_lora_linear,
    multi_lora_linear_ref, patch_model, resolve_backend, set_adapter_rows, slp_embed, unpatch_model,
)
from monkey_kernels.models import prepare_images, tile_grid
from monkey_kernels.models.slp import SLPEmbeddingRef, SpatialLayoutProjector, assemble_inputs_embeds_ref
from monkey_kernels.patching import is_patched
from test_patching import make_model, views

BACKENDS = available_backends()


def xfail_if(condition: bool, reason: str):
    return [pytest.mark.xfail(strict=True, reason=reason)] if condition else []


# ---------------------------------------------------------------------------------------------------------
# multi_lora_linear: argument table
# ---------------------------------------------------------------------------------------------------------
K, N, NUM_ADAPTERS, R_MAX = 8, 5, 2, 3


def op_args(device="cpu", dtype=torch.float32, rows=6):
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


def meta(t):
    return t.to("meta")


# (positional overrides, keyword arguments, pattern naming the argument); not in tests/test_validation.py
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


def non_finite_pattern(t: torch.Tensor) -> torch.Tensor:
    return torch.stack([t.isnan(), t.isposinf(), t.isneginf()])


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
# MultiLoRALinear
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_bad_calls_and_empty_training_batch(backend):
    device = kernel_device(backend)
    layer = MultiLoRALinear(K, N, NUM_ADAPTERS, [2, 3], lora_dropout=0.2, backend=backend).to(device).train()
    x = torch.randn(2, 3, K, device=device)
    with pytest.raises(ValueError, match="segments must be a SegmentInfo"):
        layer(x, None)
    with pytest.raises(ValueError, match="seed"):
        layer(x, [0, 1], seed=-1)
    with pytest.raises(ValueError, match="seed"):
        layer(x, [0, 1], seed=2**31)
    with pytest.raises(ValueError, match=r"weight must be \[N, K=7\]"):
        layer(torch.randn(2, 3, 7, device=device), [0, 1])
    with pytest.raises(ValueError, match="weight has dtype"):
        layer(x.double(), [0, 1])
    with pytest.raises(ValueError, match="lora_input must have the leading dims"):
        layer(x, [0, 1], lora_input=torch.randn(3, 2, K, device=device))
    # the largest valid seed, and an empty batch in training mode with dropout on
    assert layer(x, [0, 1], seed=2**31 - 1).shape == (2, 3, N)
    empty = torch.randn(0, 3, K, device=device, requires_grad=True)
    out = layer(empty, [])
    assert out.shape == (0, 3, N)
    out.sum().backward()
    assert layer.lora_a.grad is not None and (layer.lora_a.grad == 0).all()
    with pytest.raises(ValueError, match="weight is on meta"):
        copy.deepcopy(layer).to("meta")(x, [0, 1])


def test_module_constructor_rejects_nan_dropout():
    with pytest.raises(ValueError, match="lora_dropout"):
        MultiLoRALinear(K, N, 2, 2, lora_dropout=float("nan"))


# ---------------------------------------------------------------------------------------------------------
# SegmentInfo: types, devices, empty metadata, and fuzzed malformed offsets
# ---------------------------------------------------------------------------------------------------------
SEGMENT_ERRORS = {
    "batch_ids_none": (lambda: SegmentInfo.from_batch(None, 3), "adapter_ids must be a 1-D sequence"),
    "batch_ids_str": (lambda: SegmentInfo.from_batch("01", 3), "adapter_ids must be a 1-D sequence"),
    "batch_ids_nested": (lambda: SegmentInfo.from_batch([[0, 1]], 3), "adapter_ids must be 1-D"),
    "batch_ids_ragged": (lambda: SegmentInfo.from_batch([[0], [1, 2]], 3), "adapter_ids must be a 1-D"),
    "batch_ids_float": (lambda: SegmentInfo.from_batch([0.5], 3), "adapter_ids must be a 1-D sequence of ints"),
    "batch_ids_overflow": (lambda: SegmentInfo.from_batch([10**30], 3), "adapter_ids must be a 1-D sequence"),
    "batch_ids_wrap": (lambda: SegmentInfo.from_batch([2**31], 3), "adapter_ids must fit in int32"),
    "batch_ids_bool_tensor": (lambda: SegmentInfo.from_batch(torch.tensor([True]), 3), "adapter_ids must be an int"),
    "batch_ids_meta": (lambda: SegmentInfo.from_batch(torch.tensor([0], device="meta"), 3),
                       "adapter_ids is on the meta device"),
    "batch_seq_len_bool": (lambda: SegmentInfo.from_batch([0], True), "seq_len"),
    "batch_seq_len_float": (lambda: SegmentInfo.from_batch([0], 3.0), "seq_len"),
    "batch_seq_len_none": (lambda: SegmentInfo.from_batch([0], None), "seq_len"),
    "indptr_none": (lambda: SegmentInfo.from_indptr(None, [0]), "seg_indptr must be a 1-D sequence"),
    "indptr_empty": (lambda: SegmentInfo.from_indptr([], []), r"seg_indptr must have len\(adapter_ids\) \+ 1"),
    "indptr_2d": (lambda: SegmentInfo.from_indptr(torch.tensor([[0, 2]]), [0]), "seg_indptr must be 1-D"),
    "indptr_float_list": (lambda: SegmentInfo.from_indptr([0, 2.5], [0]), "seg_indptr must be a 1-D sequence of ints"),
    "indptr_wrap": (lambda: SegmentInfo.from_indptr([0, 2**32], [0]), "seg_indptr must fit in int32"),
    "indptr_meta": (lambda: SegmentInfo.from_indptr(torch.tensor([0, 2], device="meta"), [0], num_rows=2),
                    "seg_indptr is on the meta device"),
    "num_rows_bool": (lambda: SegmentInfo.from_indptr([0, 1], [0], num_rows=True), "num_rows"),
    "num_rows_float": (lambda: SegmentInfo.from_indptr([0, 1], [0], num_rows=1.0), "num_rows"),
    "num_rows_negative": (lambda: SegmentInfo.from_indptr([0, 1], [0], num_rows=-1), "num_rows"),
}


@pytest.mark.parametrize("name", list(SEGMENT_ERRORS))
def test_segment_info_bad_input(name):
    build, pattern = SEGMENT_ERRORS[name]
    with pytest.raises(ValueError, match=pattern):
        build()


def test_segment_info_empty_and_meta_without_validation():
    empty = SegmentInfo.from_batch([], 4)
    assert (empty.num_rows, empty.num_segments, empty.max_adapter_id) == (0, 0, -1)
    zero_length = SegmentInfo.from_batch([2, -1], 0)
    assert zero_length.num_rows == 0 and zero_length.seg_indptr.tolist() == [0, 0, 0]
    none = SegmentInfo.from_indptr([0], [])
    assert none.num_rows == 0 and none.row_adapter.numel() == 0
    # meta metadata can be built (e.g. for shape propagation) when nothing has to be read back
    info = SegmentInfo.from_batch(torch.tensor([0, 1], device="meta"), 3, validate=False)
    assert info.device.type == "meta" and info.num_rows == 6 and info.max_adapter_id is None
    # the largest int32 values still pass
    assert SegmentInfo.from_batch([2**31 - 1], 1).max_adapter_id == 2**31 - 1


MUTATIONS = ["not_at_zero", "decreasing", "negative", "last_not_num_rows", "float_tensor", "bool_tensor",
             "length_mismatch", "float_list"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=8), mutation=st.sampled_from(MUTATIONS),
       where=st.integers(0, 100), amount=st.integers(1, 5))
def test_fuzzed_malformed_indptr_is_rejected_naming_it(lengths, mutation, where, amount):
    indptr = [0] + list(itertools.accumulate(lengths))
    ids = [i % 3 - 1 for i in range(len(lengths))]
    num_rows = None
    if mutation == "not_at_zero":
        indptr = [v + amount for v in indptr]
        pattern = "seg_indptr must start at 0"
    elif mutation == "decreasing":
        i = 1 + where % len(lengths)  # an inner or the last entry drops below its predecessor
        indptr[i] = indptr[i - 1] - amount
        pattern = "seg_indptr must be (non-decreasing|non-negative)"
    elif mutation == "negative":
        i = 1 + where % len(lengths)
        indptr[i] = -amount
        pattern = "seg_indptr must be non-negative"
    elif mutation == "last_not_num_rows":
        num_rows = indptr[-1] + amount
        pattern = rf"seg_indptr\[-1\]={indptr[-1]} does not match num_rows={num_rows}"
    elif mutation == "float_tensor":
        indptr = torch.tensor(indptr, dtype=torch.float32)
        pattern = "seg_indptr must be an integer tensor"
    elif mutation == "bool_tensor":
        indptr = torch.tensor(indptr) > 0
        pattern = "seg_indptr must be an integer tensor"
    elif mutation == "length_mismatch":
        ids = ids + [0] * amount if where % 2 else ids[:-1]
        pattern = r"seg_indptr must have len\(adapter_ids\) \+ 1"
    else:
        indptr = [float(v) + 0.5 for v in indptr]
        pattern = "seg_indptr must be a 1-D sequence of ints"
    with pytest.raises(ValueError, match=pattern):
        SegmentInfo.from_indptr(indptr, ids, num_rows=num_rows)


# ---------------------------------------------------------------------------------------------------------
# slp_embed / FusedSLPEmbedding
# ---------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------
# dropout_keep_mask / resolve_backend
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


def test_resolve_backend_arguments():
    cpu = torch.device("cpu")
    assert resolve_backend("torch", cpu) == "torch" and resolve_backend("auto", cpu) in BACKENDS
    for bad in (3, "", "TORCH", "triton "):
        with pytest.raises(ValueError, match="backend must be one of"):
            resolve_backend(bad, cpu)


def test_resolve_backend_accepts_a_device_string():
    assert resolve_backend(None, "cpu") == resolve_backend(None, torch.device("cpu"))
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="device must be"):
        resolve_backend("torch", "no-such-device")


# ---------------------------------------------------------------------------------------------------------
# prepare_images / tile_grid / MonkeyVisionModel.forward
# ---------------------------------------------------------------------------------------------------------
IMAGE_ERRORS = {
    "images_none": (dict(images=None), "images must be a"),
    "images_int": (dict(images=3), "images must be a"),
    "images_bool": (dict(images=torch.zeros(1, 3, 8, 8, dtype=torch.bool)), r"images\[0\] must be a float"),
    "images_complex": (dict(images=torch.zeros(1, 3, 8, 8, dtype=torch.complex64)), r"images\[0\] must be a float"),
    "images_5d": (dict(images=torch.zeros(1, 1, 3, 8, 8)), r"images must be \[B, C, H, W\]"),
    "images_list_with_int": (dict(images=[torch.rand(3, 8, 8), 5]), r"images\[1\] must be a \[C, H, W\]"),
    "images_empty_batch": (dict(images=torch.zeros(0, 3, 8, 8)), "at least one image"),
    "images_zero_width": (dict(images=torch.zeros(1, 3, 8, 0)), r"images\[0\] is empty"),
    "resolution_float": (dict(resolution=(56.0, 56)), "width must be a positive int"),
    "resolution_negative": (dict(resolution=(56, -56)), "height must be a positive int"),
    "resolution_triple": (dict(resolution=(56, 56, 3)), "resolution must be a"),
    "resolution_str": (dict(resolution="56x56"), "resolution must be a"),
    "tile_size_zero": (dict(tile_size=0), "tile_size must be a positive int"),
    "num_channels_zero": (dict(num_channels=0), "num_channels must be a positive int"),
    "num_channels_bool": (dict(num_channels=True), "num_channels must be a positive int"),
    "mean_short": (dict(mean=(0.5,)), "mean and std must have 3 entries"),
    "std_zero": (dict(std=(0.2, 0.0, 0.2)), "std finite and non-zero"),
    "std_nan": (dict(std=(0.2, float("nan"), 0.2)), "std finite and non-zero"),
    "config_wrong_type": (dict(config=object()), "config must be a MonkeyVisionConfig"),
}


@pytest.mark.parametrize("name", list(IMAGE_ERRORS))
def test_prepare_images_bad_arguments(name):
    args = dict(images=torch.rand(1, 3, 8, 8), resolution=(56, 56), tile_size=56) | IMAGE_ERRORS[name][0]
    if "config" in args:
        args.pop("tile_size")
    with pytest.raises(ValueError, match=IMAGE_ERRORS[name][1]):
        prepare_images(args.pop("images"), args.pop("resolution"), **args)


@pytest.mark.parametrize("bad, pattern", [
    (dict(width=True), "width"), (dict(height=None), "height"), (dict(tokens_per_view=0), "tokens_per_view"),
    (dict(tile_size=-14), "tile_size"), (dict(config="release"), "config must be a MonkeyVisionConfig"),
])
def test_tile_grid_bad_arguments(bad, pattern):
    args = dict(width=448, height=448) | bad
    with pytest.raises(ValueError, match=pattern):
        tile_grid(args.pop("width"), args.pop("height"), **args)


def test_prepare_images_nan_stays_in_its_image_and_expanded_input_is_exact():
    images = torch.rand(2, 3, 30, 40)
    images[0, 1, 5, 5] = float("nan")
    out, grid = prepare_images(images, (112, 56), tile_size=56)
    assert out.shape == (2, grid.num_views, 3, 56, 56)
    assert out[0].isnan().any() and not out[1].isnan().any()
    flat = torch.rand(3, 1, 1)
    expanded, _ = prepare_images(flat.expand(3, 30, 40), (112, 56), tile_size=56)
    contiguous, _ = prepare_images(flat.expand(3, 30, 40).contiguous(), (112, 56), tile_size=56)
    assert torch.equal(expanded, contiguous)
    meta_out, _ = prepare_images(torch.rand(1, 3, 30, 40, device="meta"), (112, 56), tile_size=56)
    assert meta_out.device.type == "meta" and meta_out.shape == (1, 3, 3, 56, 56)


@pytest.mark.parametrize("patched", [False, True])
def test_monkey_model_forward_bad_input(patched):
    model = make_model("cpu").eval()
    if patched:
        patch_model(model, backend="torch")
    cfg = model.config
    with pytest.raises(ValueError, match="pixel_values must hold at least one image"):
        model(views(0, 4, cfg, "cpu"))
    with pytest.raises(ValueError, match="pixel_values is on meta"):
        model(views(1, 4, cfg, "cpu").to("meta"))
    with pytest.raises(ValueError, match="pixel_values must hold 2 to"):
        model(views(1, 0, cfg, "cpu"))
    with pytest.raises(ValueError, match="pixel_values must be a 5-D"):
        model(views(1, 4, cfg, "cpu").tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_monkey_model_nan_in_one_image_stays_in_that_image(backend):
    """A NaN pixel in one tile of image 0: after the batched fused pass, exactly the reference's rows are NaN
    (that tile's queries and nothing of image 1)."""
    device = kernel_device(backend)
    model = make_model(device, layers=1).eval()
    pixel_values = views(2, 2, model.config, device)
    pixel_values[0, 1, 0, 3, 3] = float("nan")
    with torch.no_grad():
        expected = model(pixel_values)
        patch_model(model, backend=backend)
        out = model(pixel_values)
    assert not expected[1].isnan().any() and expected[0].isnan().any()
    assert torch.equal(out.isnan(), expected.isnan())
    finite = torch.isfinite(expected)
    torch.testing.assert_close(out[finite], expected[finite], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# patch_model / unpatch_model round trips (Monkey, PEFT, SLP)
# ---------------------------------------------------------------------------------------------------------
class LayoutModel(nn.Module):
    """A LayTextLLM-like model: the reference SLP embedding layer, then a head."""

    def __init__(self):
        super().__init__()
        self.embed = SLPEmbeddingRef(nn.Embedding(V, H), SpatialLayoutProjector(H), BOX_ID, IMAGE_ID)
        self.head = nn.Linear(H, 3)

    def forward(self, input_ids, boxes, image_features):
        return self.head(self.embed(input_ids, boxes, None, image_features))


def build_monkey():
    model = make_model("cpu")
    pixel_values = views(2, 3, model.config, "cpu")
    return model, lambda m: m(pixel_values), 1


def build_peft():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415
    from transformers import SiglipVisionConfig, SiglipVisionModel  # noqa: PLC0415

    tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=28, patch_size=14,
                                                 vision_use_head=False))
    model = get_peft_model(tower, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"],
                                             init_lora_weights=False), adapter_name="red")
    model.add_adapter("blue", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "fc2"],
                                         init_lora_weights=False))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    pixel_values = torch.randn(3, 3, 28, 28)

    def forward(m):
        with adapter_selection(m, ["red", "__base__", "blue"]):
            return m(pixel_values=pixel_values.to(next(m.parameters()).dtype)).last_hidden_state

    return model, forward, 12


def build_slp():
    model = LayoutModel()
    model.embed.embed_tokens.weight.requires_grad_(False)  # a frozen table keeps its flag
    inputs = slp_inputs()

    def forward(m):
        dtype = m.head.weight.dtype
        return m(inputs["input_ids"], inputs["boxes"].to(dtype), inputs["image_features"].to(dtype))

    return model, forward, 1


MODELS = {"monkey": build_monkey, "peft": build_peft, "slp": build_slp}


def snapshot(model):
    return {
        "params": dict(model.named_parameters()),
        "values": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "flags": {n: (p.requires_grad, p.dtype) for n, p in model.named_parameters()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
    }


def assert_same_weights(model, before, *, same_types=True, clean=None):
    state = model.state_dict()
    assert list(state) == list(before["values"]), "state-dict keys changed"
    for key, value in state.items():
        assert value.dtype == before["values"][key].dtype and torch.equal(value, before["values"][key]), key
    params = dict(model.named_parameters())
    assert params.keys() == before["params"].keys()
    for name, p in params.items():
        assert p is before["params"][name], f"{name} is a new Parameter object"
        assert (p.requires_grad, p.dtype) == before["flags"][name], name
    if same_types:
        assert [(n, type(m)) for n, m in model.named_modules()] == before["types"]
    if clean if clean is not None else same_types:
        leftovers = [(n, k) for n, m in model.named_modules() for k in m.__dict__
                     if k == "forward" or k.startswith("_monkey_kernels")]
        assert not leftovers, f"patching state left behind: {leftovers}"


@pytest.mark.parametrize("name", list(MODELS))
def test_patch_unpatch_twice_loses_no_weight(name):
    model, forward, _ = MODELS[name]()
    before = snapshot(model)
    with torch.no_grad():
        expected = forward(model.eval())
    for _ in range(2):
        report = patch_model(model, backend="torch")
        assert report.total > 0 and is_patched(model)
        assert_same_weights(model, before, same_types=False)
        with torch.no_grad():
            torch.testing.assert_close(forward(model), expected, rtol=1e-5, atol=1e-5)
        unpatch_model(model)
        assert not is_patched(model)
        assert_same_weights(model, before)


@pytest.mark.parametrize("name", list(MODELS))
def test_adamw_step_while_patched_then_unpatch(name):
    """One AdamW step on the patched model: its gradients are the reference's, the Parameters it updated are
    the ones the unpatched model holds, and the unpatched model gives the patched model's output."""
    model, forward, _ = MODELS[name]()
    model.train()
    twin = copy.deepcopy(model)
    before = snapshot(model)
    patch_model(model, backend="torch")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    forward(model).square().mean().backward()
    forward(twin).square().mean().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        if p.requires_grad and q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"grad {n}: {m}")
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before["values"][n])]
    assert changed and all(before["flags"][n][0] for n in changed), "frozen weights moved or nothing trained"
    model.eval()
    with torch.no_grad():
        patched_out = forward(model)
    unpatch_model(model)
    assert all(p is before["params"][n] for n, p in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(forward(model), patched_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_to_dtype_after_patching(name):
    model, forward, _ = MODELS[name]()
    model.eval()
    reference = copy.deepcopy(model).double()
    patch_model(model, backend="torch")
    model.to(torch.float64)
    params = dict(model.named_parameters())
    with torch.no_grad():
        out = forward(model)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, forward(reference), rtol=1e-10, atol=1e-10)
    unpatch_model(model)
    assert all(p is params[n] and p.dtype == torch.float64 for n, p in model.named_parameters())
    assert all(t.dtype == torch.float64 for t in model.state_dict().values() if t.is_floating_point())
    with torch.no_grad():
        torch.testing.assert_close(forward(model), forward(reference), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(MODELS))
def test_double_patch_warns_unpatch_of_unpatched_warns_and_bad_calls_raise(name):
    model, _, _ = MODELS[name]()
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_model(model, backend="cuda-magic")
    assert not is_patched(model), "a rejected backend must leave the model unpatched"
    with pytest.warns(UserWarning, match="not patched"):
        assert unpatch_model(model).total == 0
    patch_model(model, backend="torch")
    before = snapshot(model)
    with pytest.warns(UserWarning, match="already patched"):
        assert patch_model(model).already_patched
    assert_same_weights(model, before, clean=False)
    unpatch_model(model)
    for bad in (None, torch.zeros(2), "model"):
        with pytest.raises(ValueError, match="model must be an nn.Module"):
            unpatch_model(bad)
        with pytest.raises(ValueError, match="model must be an nn.Module"):
            patch_model(bad)


# ---------------------------------------------------------------------------------------------------------
# adapter_selection / set_adapter_rows
# ---------------------------------------------------------------------------------------------------------
def test_adapter_selection_bad_rows_and_empty_batch():
    model, _, _ = build_peft()
    patch_model(model, backend="torch")
    cases = [
        (None, "rows must be a sequence"), ({"red": 0}, "rows must be a sequence"), ("red", "rows must be a sequence"),
        ([True], r"rows\[0\] must be an adapter name"), ([0.5], r"rows\[0\] must be an adapter name"),
        ([2], r"rows\[0\]=2 is not an adapter id"), ([-2], r"rows\[0\]=-2 is not an adapter id"),
        (["red", "purple"], r"rows\[1\]='purple' is not a loaded adapter"),
        (torch.tensor([[0]]), "rows as a tensor must be 1-D"), (torch.tensor([0.0]), "rows as a tensor must be 1-D"),
        (torch.tensor([0], device="meta"), "rows is a tensor on the meta device"),
    ]
    for rows, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            set_adapter_rows(model, rows)
        with pytest.raises(ValueError, match=pattern):
            with adapter_selection(model, rows):
                pass
    for bad in (None, "model"):
        with pytest.raises(ValueError, match="model must be an nn.Module"):
            set_adapter_rows(bad, [0])
        with pytest.raises(ValueError, match="model must be an nn.Module"):
            with adapter_selection(bad, [0]):
                pass
    # an empty selection for an empty batch, straight through one fused layer (the towers reject batch 0)
    layer = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    with adapter_selection(model, []):
        assert layer(torch.randn(0, 4, 32)).shape == (0, 4, 32)
    with adapter_selection(model, ["red", "blue"]):
        with pytest.raises(ValueError, match="input has 3 batch rows"):
            layer(torch.randn(3, 4, 32))


def test_peft_nan_image_stays_in_its_row():
    model, forward, _ = build_peft()
    model.eval()
    pixel_values = torch.randn(3, 3, 28, 28)
    pixel_values[1, 0, 0, 0] = float("nan")
    rows = ["red", "blue", "__base__"]
    with torch.no_grad(), adapter_selection(model, rows):
        expected = model(pixel_values=pixel_values).last_hidden_state
    patch_model(model, backend="torch")
    with torch.no_grad(), adapter_selection(model, rows):
        out = model(pixel_values=pixel_values).last_hidden_state
    assert torch.equal(out.isnan(), expected.isnan()) and not out[[0, 2]].isnan().any()
    finite = torch.isfinite(expected)
    torch.testing.assert_close(out[finite], expected[finite], rtol=1e-4, atol=1e-5)
