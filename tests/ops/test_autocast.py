"""Both ops under ``torch.autocast`` (CPU bf16 and fp16 here; the Triton kernels under the interpreter; CUDA on a
GPU), against their unpatched references run under the same autocast.

The policy (``monkey_kernels/ops/autocast.py``, README "Mixed precision"): ``multi_lora_linear`` casts what
``F.linear`` casts (input, LoRA input, weight, bias, A, B), keeps ``scale`` and the residual in their dtypes and
returns the autocast dtype promoted with the residual's; ``slp_embed`` keeps the table's dtype and rounds the box
rows to the autocast dtype (the reference's ``nn.Linear(4, H)`` output). Judged like every low-precision test
(``helpers/accuracy.py``): the error against float64 may be a small factor of the reference's own autocast error.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import available_backends, kernel_device
from helpers.accuracy import assert_within_pytorch_error, non_finite_pattern
from monkey_kernels import SegmentInfo, dropout_keep_mask, multi_lora_linear, multi_lora_linear_ref, slp_embed

BACKENDS = available_backends()
AMP_DTYPES = [torch.bfloat16, torch.float16]


def _id(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


# ------------------------------------------------------------------------------------------------------------
# multi_lora_linear
# ------------------------------------------------------------------------------------------------------------
CASES = {
    # Monkey's attn.in_proj: no residual, ragged segments, a base-only segment, mixed ranks
    "plain": dict(lengths=[9, 0, 14, 6], ids=[1, 0, -1, 2], K=24, N=20, ranks=[4, 3, 2], residual=None),
    # Monkey's mlp_lora: a separate LoRA input and an fp32 residual stream (output promoted to fp32)
    "residual_fp32": dict(lengths=[8, 12, 5], ids=[0, -1, 1], K=20, N=16, ranks=[5, 5], residual=torch.float32,
                          lora_in=12),
    # LoRA dropout, a half residual of the other half type (bf16 + fp16 promote to fp32)
    "dropout_half_residual": dict(lengths=[10, 7, 9], ids=[1, 0, 1], K=18, N=22, ranks=[3, 6], residual="other_half",
                                  dropout=0.2),
}


def make_problem(case: dict, amp: torch.dtype, device: torch.device):
    """fp32 master tensors (all trainable) and the segments of ``case``."""
    lengths, K, N, ranks = case["lengths"], case["K"], case["N"], case["ranks"]
    M, A, R, k_lora = sum(lengths), len(ranks), max(ranks), case.get("lora_in") or case["K"]

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).float().to(device).requires_grad_()

    residual_dtype = case["residual"]
    if residual_dtype == "other_half":
        residual_dtype = torch.float16 if amp == torch.bfloat16 else torch.bfloat16
    tensors = dict(
        input=rand(M, K), weight=rand(N, K, scale=K**-0.5), bias=rand(N), lora_a=rand(A, R, k_lora, scale=k_lora**-0.5),
        lora_b=rand(A, N, R, scale=R**-0.5),
        scale=(torch.rand(A, dtype=torch.float64) + 0.5).float().to(device).requires_grad_(),
        lora_input=rand(M, k_lora) if case.get("lora_in") else None,
        residual=None if residual_dtype is None else rand(M, N).detach().to(residual_dtype).requires_grad_(),
    )
    indptr = [0] + list(itertools.accumulate(lengths))
    return tensors, SegmentInfo.from_indptr(indptr, case["ids"], device=device)


def op_call(t, segments, case, backend, seed=None, **kwargs):
    return multi_lora_linear(t["input"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scale"], segments,
                             ranks=case["ranks"], lora_input=t["lora_input"], residual=t["residual"],
                             dropout_p=case.get("dropout", 0.0), seed=seed, backend=backend, **kwargs)


def reference_call(t, segments, case, keep):
    return multi_lora_linear_ref(t["input"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scale"],
                                 segments, ranks=case["ranks"], lora_input=t["lora_input"], residual=t["residual"],
                                 keep_mask=keep, dropout_p=case.get("dropout", 0.0))


def leaves_like(tensors, dtype=None):
    return {n: None if t is None else t.detach().cpu().to(dtype or t.dtype).requires_grad_() for n, t in
            tensors.items()}


def grads_of(out, leaves, grad_output):
    names = [n for n, t in leaves.items() if t is not None]
    return dict(zip(names, torch.autograd.grad(out, [leaves[n] for n in names], grad_output)))


@pytest.mark.parametrize("amp", AMP_DTYPES, ids=_id)
@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_lora_under_autocast_matches_the_reference_under_autocast(backend, case_name, amp):
    case, device = CASES[case_name], kernel_device(backend)
    tensors, segments = make_problem(case, amp, device)
    seed = 4321 if case.get("dropout") else None
    keep = None
    if seed is not None:
        width = (tensors["lora_input"] if tensors["lora_input"] is not None else tensors["input"]).shape[-1]
        keep = dropout_keep_mask(seed, segments.num_rows, width, case["dropout"], device, backend=backend).cpu()
    with torch.autocast(device.type, dtype=amp):
        out = op_call(tensors, segments, case, backend, seed=seed)
    plain_leaves = leaves_like(tensors)
    with torch.autocast("cpu", dtype=amp):
        plain = reference_call(plain_leaves, segments.to("cpu"), case, keep)
    # the reference's dtype: F.linear's autocast dtype, promoted with the residual's
    assert out.dtype == plain.dtype
    assert torch.isfinite(out).all()
    grad_output = torch.randn(out.shape, dtype=torch.float64).to(out.dtype)
    grads = grads_of(out, tensors, grad_output.to(device))
    grads_plain = grads_of(plain, plain_leaves, grad_output)
    leaves64 = leaves_like(tensors, torch.float64)
    ref64 = reference_call(leaves64, segments.to("cpu"), case, keep)
    grads64 = grads_of(ref64, leaves64, grad_output.double())
    # every gradient reaches its master tensor in that tensor's dtype: fp32 Parameters, the scale, the residual
    for name, grad in grads.items():
        assert grad.dtype == tensors[name].dtype, name
    magnitude = {n: None if t is None else t.detach().abs() for n, t in tensors.items()}
    abs_leaves = leaves_like(magnitude, torch.float64)
    abs64 = reference_call(abs_leaves, segments.to("cpu"), case, keep)
    magnitudes = {"output": abs64, **grads_of(abs64, abs_leaves, grad_output.double().abs())}
    assert_within_pytorch_error(backend, amp, out, plain, ref64, grads, grads_plain, grads64, magnitudes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_dtype_and_the_dtype_rules_outside_autocast(backend):
    """``out_dtype`` sets the output's dtype (the fp32 output of Monkey's ``in_proj + lora * lora_scale``);
    outside autocast every operand but ``scale`` must still have the input's dtype."""
    case, device = CASES["plain"], kernel_device(backend)
    tensors, segments = make_problem(case, torch.bfloat16, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        promoted = op_call(tensors, segments, case, backend, out_dtype=torch.float32)
        rounded = op_call(tensors, segments, case, backend)
    assert promoted.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    # the same fp32 accumulator, rounded once or not at all (the interpreter rounds bf16 toward zero)
    if backend != "triton":
        torch.testing.assert_close(promoted.to(torch.bfloat16), rounded, rtol=0, atol=0)
    assert ((promoted - rounded.float()).abs() <= rounded.float().abs() * 2**-7).all()
    promoted.sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for n, t in tensors.items() if t is not None)
    # outside autocast: today's dtype rules
    half = {n: None if t is None else t.detach().to(torch.bfloat16) for n, t in tensors.items()}
    half["scale"] = tensors["scale"].detach()  # any float dtype
    assert op_call(half, segments, case, backend).dtype == torch.bfloat16
    assert op_call(half, segments, case, backend, out_dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="weight has dtype torch.float32, expected torch.bfloat16"):
        op_call(dict(half, weight=tensors["weight"].detach()), segments, case, backend)
    residual = torch.zeros(segments.num_rows, case["N"], device=device)
    with pytest.raises(ValueError, match="residual has dtype torch.float32, expected torch.bfloat16"):
        op_call(dict(half, residual=residual), segments, case, backend)
    with pytest.raises(ValueError, match="out_dtype must be"):
        op_call(half, segments, case, backend, out_dtype=torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_residual_under_autocast(backend):
    """``F.linear(...) + residual`` with a float64 residual is float64: the CPU backends write it, the Triton
    kernels (no float64) refuse it by name."""
    case, device = CASES["plain"], kernel_device(backend)
    tensors, segments = make_problem(case, torch.bfloat16, device)
    tensors["residual"] = torch.randn(segments.num_rows, case["N"], dtype=torch.float64, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        if backend == "triton":
            with pytest.raises(ValueError, match="out_dtype torch.float64"):
                op_call(tensors, segments, case, backend)
            return
        out = op_call(tensors, segments, case, backend)
        ref = reference_call(leaves_like(tensors), segments, case, None)
    assert out.dtype == ref.dtype == torch.float64
    assert (out - ref).abs().max() <= 4 * 2**-8 * ref.abs().max()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])  # the Triton kernels have no float64
def test_float64_inputs_are_not_autocast(backend):
    """Autocast leaves float64 tensors alone (as it does for ``F.linear``): a float64 call stays exact."""
    case = CASES["residual_fp32"]
    tensors, segments = make_problem(case, torch.bfloat16, torch.device("cpu"))
    tensors = {n: None if t is None else t.detach().double() for n, t in tensors.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op_call(tensors, segments, case, backend)
    expected = reference_call(tensors, segments, case, None)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def _custom_op_arguments(t, segments, case):
    ranks = torch.tensor(case["ranks"], dtype=torch.int32)
    rows = segments.num_rows
    return (t["input"].reshape(rows, -1), None if t["lora_input"] is None else t["lora_input"].reshape(rows, -1),
            t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scale"],
            None if t["residual"] is None else t["residual"].reshape(rows, -1), ranks, segments.seg_indptr,
            segments.adapter_ids, segments.row_segment, segments.row_adapter, -1, 16, 0.0,
            torch.tensor(0, dtype=torch.int64), "torch")


@pytest.mark.parametrize("case_name", ["plain", "residual_fp32"])
def test_custom_op_called_directly_gets_the_same_casts(case_name):
    """``torch.ops.monkey_kernels.multi_lora_linear_fwd`` in an autocast region: its registered autocast kernel
    applies the policy (``scale`` kept, residual promoted), so a direct call equals the public function."""
    case = CASES[case_name]
    tensors, segments = make_problem(case, torch.bfloat16, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = op_call(tensors, segments, case, "torch")
        y, h = torch.ops.monkey_kernels.multi_lora_linear_fwd(*_custom_op_arguments(tensors, segments, case))
    assert y.dtype == expected.dtype and h.dtype == torch.float32
    torch.testing.assert_close(y, expected.reshape(y.shape), rtol=0, atol=0)
    y.float().sum().backward()
    assert tensors["scale"].grad.dtype == torch.float32 and tensors["weight"].grad.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_fullgraph_under_autocast_equals_eager(backend):
    """``torch.compile(fullgraph=True)`` of a call in an autocast region: the casts are in the graph, the output
    and every gradient equal the eager run's."""
    case, device = CASES["residual_fp32"], kernel_device(backend)
    tensors, segments = make_problem(case, torch.bfloat16, device)

    def step(fn):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = fn(tensors["input"], tensors["weight"], tensors["lora_a"], tensors["lora_b"], tensors["scale"])
        names = [n for n, t in tensors.items() if t is not None]
        return out, torch.autograd.grad(out.square().sum(), [tensors[n] for n in names])

    def op(x, w, a, b, s):
        return multi_lora_linear(x, w, tensors["bias"], a, b, s, segments, ranks=case["ranks"],
                                 lora_input=tensors["lora_input"], residual=tensors["residual"], backend=backend)

    torch._dynamo.reset()
    out_eager, grads_eager = step(op)
    out_comp, grads_comp = step(torch.compile(op, fullgraph=True, backend="aot_eager"))
    assert out_comp.dtype == out_eager.dtype == torch.float32
    torch.testing.assert_close(out_comp, out_eager, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads_comp, grads_eager):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# fp16 overflows and GradScaler
# ------------------------------------------------------------------------------------------------------------
def monkey_lora_reference(x, weight, bias, lora_a, lora_b, scale, segments):
    """Monkey's layer as it runs unpatched, per segment: ``F.linear`` plus ``lora_b(lora_a(x)) * lora_scale`` with
    the learnable fp32 ``[1]`` scale (so the LoRA term, and the sum, are fp32 under autocast)."""
    base = F.linear(x, weight, bias)
    pieces = []
    indptr = segments.seg_indptr.tolist()
    for g, adapter in enumerate(segments.adapter_ids.tolist()):
        rows = slice(indptr[g], indptr[g + 1])
        piece = base[rows].float()
        if adapter >= 0:
            piece = piece + F.linear(F.linear(x[rows], lora_a[adapter]), lora_b[adapter]) * scale[adapter:adapter + 1]
        pieces.append(piece)
    return torch.cat(pieces)


def _overflow_problem(device, huge: str):
    """fp32 masters where fp16 overflows in the LoRA intermediate of adapter 0 only: ``H = x A^T`` (forward,
    ``huge="a"``) or ``dH = s dY B`` (backward, ``huge="b"``), far past 65504 there and far below it elsewhere."""
    lengths, ids, K, N, R = [6, 5, 4, 3], [0, 1, -1, 0], 16, 24, 4
    M = sum(lengths)
    g = torch.Generator().manual_seed(torch.initial_seed() % 2**31)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device).requires_grad_()

    x, weight, bias = rand(M, K), rand(N, K, scale=K**-0.5), rand(N)
    lora_a = torch.randn(2, R, K, generator=g) * K**-0.5
    lora_b = torch.randn(2, N, R, generator=g) * 0.1
    if huge == "a":
        # every entry of A[0] (6000) and of x (1 to 2) fits fp16, H = x A[0]^T >= 16 * 6000 does not
        x = (torch.rand(M, K, generator=g) + 1.0).to(device).requires_grad_()
        lora_a[0] = 6000.0
    else:
        lora_b[0] *= 3e3  # |dY B| ~ 1e3 * 3e2 * 5 on adapter 0's rows: inf in fp16; B itself fits
    tensors = dict(input=x, weight=weight, bias=bias, lora_a=lora_a.to(device).requires_grad_(),
                   lora_b=lora_b.to(device).requires_grad_(),
                   scale=torch.tensor([1.0, 0.75], device=device).requires_grad_())
    indptr = [0] + list(itertools.accumulate(lengths))
    return tensors, SegmentInfo.from_indptr(indptr, ids, device=device), [R, R]


@pytest.mark.parametrize("huge", ["a", "b"], ids=["forward_H", "backward_dH"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_overflow_pattern_and_grad_scaler_skip_match_the_reference(backend, huge):
    """Under fp16 autocast with ``GradScaler``: where the reference's fp16 LoRA intermediate overflows, the op's
    outputs and gradients are non-finite in exactly the same entries (NaN / +inf / -inf), never hidden by the
    fp32 accumulation, and the scaler skips the step in both runs."""
    device = kernel_device(backend)
    tensors, segments, ranks = _overflow_problem(device, huge)
    leaves = leaves_like(tensors)
    # dL/dY ~ 2^-6 N(0, 1): with the scaler's 2^16 the scaled dY is ~1e3, finite in fp16
    weights = torch.randn(segments.num_rows, tensors["weight"].shape[0]) * 2**-6
    results = []
    for params, run, dev in (
        (tensors, lambda t: multi_lora_linear(t["input"], t["weight"], t["bias"], t["lora_a"], t["lora_b"],
                                              t["scale"], segments, ranks=ranks, out_dtype=torch.float32,
                                              backend=backend), device),
        (leaves, lambda t: monkey_lora_reference(t["input"], t["weight"], t["bias"], t["lora_a"], t["lora_b"],
                                                 t["scale"], segments.to("cpu")), torch.device("cpu")),
    ):
        scaler = torch.amp.GradScaler(dev.type)
        optimizer = torch.optim.SGD(list(params.values()), lr=0.1)
        with torch.autocast(dev.type, dtype=torch.float16):
            out = run(params)
        loss = (out * weights.to(dev)).sum()
        scaler.scale(loss).backward()
        before = {n: t.detach().clone() for n, t in params.items()}
        scaler.step(optimizer)
        scaler.update()
        skipped = all(torch.equal(before[n], t.detach()) for n, t in params.items())
        results.append((out.detach().cpu(), {n: t.grad.cpu() for n, t in params.items()}, skipped,
                        scaler.get_scale()))
    (out, grads, skipped, new_scale), (ref_out, ref_grads, ref_skipped, ref_scale) = results
    assert out.dtype == ref_out.dtype == torch.float32
    assert torch.equal(non_finite_pattern(out), non_finite_pattern(ref_out)), "output"
    for name, ref_grad in ref_grads.items():
        assert grads[name].dtype == ref_grad.dtype == torch.float32
        assert torch.equal(non_finite_pattern(grads[name]), non_finite_pattern(ref_grad)), name
    # the reference overflows: H (then Y and dB = dY^T H) or dH (then dA = dH^T x and dx)
    overflowed = [ref_out, ref_grads["lora_b"]] if huge == "a" else [ref_grads["lora_a"], ref_grads["input"]]
    assert not any(torch.isfinite(t).all() for t in overflowed), "the reference must overflow"
    assert torch.isfinite(ref_grads["weight"]).all() == torch.isfinite(grads["weight"]).all()
    assert skipped and ref_skipped and new_scale == ref_scale == 2.0**15


# ------------------------------------------------------------------------------------------------------------
# slp_embed
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amp", AMP_DTYPES, ids=_id)
@pytest.mark.parametrize("case_name", ["laytext_pixels", "normalized_with_images"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_slp_under_autocast_matches_the_reference_under_autocast(backend, case_name, amp):
    """The embedding output keeps the table's dtype (the lookup is not autocast), the box rows are the
    reference's ``nn.Linear`` output in the autocast dtype, every gradient reaches its fp32 master."""
    from test_slp import CASES as SLP_CASES, grads_of as slp_grads, make_inputs, run_op, run_reference

    case, device = SLP_CASES[case_name], kernel_device(backend)
    tensors, extra = make_inputs(case, torch.float32, device)
    with torch.autocast(device.type, dtype=amp):
        out = run_op(tensors, extra, case, backend)
        plain, leaves_plain = run_reference(tensors, extra, case, torch.float32)
    assert out.dtype == plain.dtype == torch.float32
    grad_output = torch.randn(out.shape, dtype=torch.float64).float()
    grads = slp_grads(out, tensors, grad_output.to(device))
    grads_plain = slp_grads(plain, leaves_plain, grad_output)
    ref64, leaves64 = run_reference(tensors, extra, case, torch.float64)
    grads64 = slp_grads(ref64, leaves64, grad_output.double())
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
    # box rows carry the autocast dtype's rounding (as the reference's), text rows are exact copies
    box_rows = (extra["input_ids"] == 0).cpu()
    assert torch.equal(out.detach().cpu()[box_rows].to(amp).float(), out.detach().cpu()[box_rows])
    assert_within_pytorch_error(backend, amp, out, plain, ref64, grads, grads_plain, grads64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_slp_compiled_fullgraph_under_autocast_equals_eager(backend):
    from test_slp import CASES as SLP_CASES, make_inputs, run_op

    case, device = SLP_CASES["laytext_pixels"], kernel_device(backend)
    tensors, extra = make_inputs(case, torch.float32, device)

    def step(fn):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = fn(tensors["table"], tensors["weight"], tensors["bias"], tensors["boxes"])
        names = [n for n, t in tensors.items() if t is not None and t.requires_grad]
        return out, torch.autograd.grad(out.square().sum(), [tensors[n] for n in names])

    def op(table, weight, bias, boxes):
        return run_op(dict(tensors, table=table, weight=weight, bias=bias, boxes=boxes), extra, case, backend)

    torch._dynamo.reset()
    out_eager, grads_eager = step(op)
    out_comp, grads_comp = step(torch.compile(op, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(out_comp, out_eager, rtol=0, atol=0)
    for got, want in zip(grads_comp, grads_eager):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# the modules
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_under_autocast_follow_the_ops(backend):
    """``MultiLoRALinear`` and ``FusedSLPEmbedding`` with fp32 Parameters in an autocast region: the op's policy
    (outputs bf16 / the table's dtype), fp32 gradients on every Parameter, the reference's outputs for the SLP."""
    from helpers.slp_models import slp_inputs
    from monkey_kernels import FusedSLPEmbedding, MultiLoRALinear
    from monkey_kernels.ops.slp.reference import SLPEmbeddingRef, SpatialLayoutProjector

    device = kernel_device(backend)
    layer = MultiLoRALinear(16, 12, num_adapters=3, rank=4, backend=backend).to(device)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(3, 5, 16, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = layer(x, [2, -1, 0])
        expected = multi_lora_linear(x, layer.weight, layer.bias, layer.lora_a, layer.lora_b, layer.lora_scale,
                                     [2, -1, 0], backend=backend)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())

    reference = SLPEmbeddingRef(torch.nn.Embedding(12, 8), SpatialLayoutProjector(8), 0, 11).to(device)
    fused = FusedSLPEmbedding(reference.embed_tokens, reference.projector, 0, 11, backend=backend)
    inputs = slp_inputs(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = fused(inputs["input_ids"], inputs["boxes"], None, inputs["image_features"])
        want = reference(inputs["input_ids"], inputs["boxes"], None, inputs["image_features"])
    assert got.dtype == want.dtype == torch.float32
    # the interpreter rounds fp32 -> bf16 toward zero: one bf16 unit on the box rows there
    tolerance = 2**-7 if backend == "triton" else 0.0
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
    got.square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fused.parameters())
