"""Second derivatives through both ops: never a silently wrong number.

The backward formulas run kernels, so they are not differentiable. A backward with ``create_graph=True`` gives
exact first-order gradients; differentiating any of them again, with respect to anything (an input, a weight,
the scale, the residual, the incoming gradient), either equals the float64 reference's second derivative or
raises a ``RuntimeError`` naming ``create_graph`` (the ops raise: ``monkey_kernels.ops.custom``). Checked on every
backend, through the eager twin and through the custom op called directly (its registered autograd formula);
a compiled graph refuses double backward itself.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import available_backends, kernel_device
from monkey_kernels import SegmentInfo, multi_lora_linear, multi_lora_linear_ref

BACKENDS = available_backends()
TRAINABLE = ("input", "lora_input", "weight", "bias", "lora_a", "lora_b", "scale", "residual")


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def _problem(backend):
    device, dtype = kernel_device(backend), _dtype(backend)
    lengths, ids, K, N, K_lora, R = [3, 4, 2], [1, -1, 0], 5, 6, 4, 3
    M = sum(lengths)
    g = torch.Generator().manual_seed(torch.initial_seed() % 2**31)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()

    tensors = dict(input=rand(M, K), lora_input=rand(M, K_lora), weight=rand(N, K), bias=rand(N),
                   lora_a=rand(2, R, K_lora), lora_b=rand(2, N, R), scale=rand(2), residual=rand(M, N))
    segments = SegmentInfo.from_indptr([0] + list(itertools.accumulate(lengths)), ids, device=device)
    return tensors, segments


def _through_public_function(t, segments, backend):
    return multi_lora_linear(t["input"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scale"], segments,
                             lora_input=t["lora_input"], residual=t["residual"], backend=backend)


def _through_custom_op(t, segments, backend):
    """The forward custom op called directly: its registered autograd formula, not the eager twin."""
    R = t["lora_a"].shape[1]
    y, _ = torch.ops.monkey_kernels.multi_lora_linear_fwd(
        t["input"], t["lora_input"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scale"], t["residual"],
        torch.full((2,), R, dtype=torch.int32, device=segments.device), segments.seg_indptr, segments.adapter_ids,
        segments.row_segment, segments.row_adapter, -1, 16, 0.0, torch.tensor(0, dtype=torch.int64), backend)
    return y


def _reference(t, segments, backend):
    return multi_lora_linear_ref(t["input"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scale"],
                                 segments.to("cpu"), lora_input=t["lora_input"], residual=t["residual"])


def _losses(y, weights):
    """A loss whose incoming gradient is a constant, and one whose incoming gradient depends on ``y``."""
    return {"linear": (y * weights).sum(), "square": (y.square() * weights).sum()}


def _second_derivatives(run, tensors, segments, backend, first, loss_name, weights, seconds):
    """``d/d q of <grad of the loss w.r.t. first, probe>`` for each ``q`` of ``seconds``: the tensors (zeros for
    "does not depend"), or the ``RuntimeError`` raised; and the first-order gradient."""
    y = run(tensors, segments, backend)
    (grad,) = torch.autograd.grad(_losses(y, weights.to(y.device, y.dtype))[loss_name], tensors[first],
                                  create_graph=True)
    if not grad.requires_grad:  # a constant: its derivatives are zero (then compared with the reference's)
        return grad, [torch.zeros_like(tensors[q]) for q in seconds]
    probe = torch.linspace(-1, 1, grad.numel(), dtype=grad.dtype, device=grad.device).view_as(grad)
    try:
        values = torch.autograd.grad((grad * probe).sum(), [tensors[q] for q in seconds], allow_unused=True)
    except RuntimeError as error:
        return grad, error
    return grad, [torch.zeros_like(tensors[q]) if v is None else v for q, v in zip(seconds, values)]


@pytest.mark.parametrize("path", ["eager", "custom_op"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_lora_second_derivatives_are_exact_or_refused(backend, path):
    run = _through_public_function if path == "eager" else _through_custom_op
    tensors, segments = _problem(backend)
    reference = {n: t.detach().cpu().double().requires_grad_() for n, t in tensors.items()}
    weights = torch.randn(segments.num_rows, tensors["weight"].shape[0], dtype=torch.float64)
    tol = dict(rtol=1e-4, atol=1e-4) if backend == "triton" else dict(rtol=1e-10, atol=1e-10)
    # every first-order gradient; the second derivatives one target at a time (with respect to all at once
    # under the slow interpreter)
    groups = [[q] for q in TRAINABLE] if backend != "triton" else [list(TRAINABLE)]
    refused = 0
    for first, seconds, loss_name in itertools.product(TRAINABLE, groups, ["linear", "square"]):
        grad, got = _second_derivatives(run, tensors, segments, backend, first, loss_name, weights, seconds)
        ref_grad, want = _second_derivatives(_reference, reference, segments, backend, first, loss_name, weights,
                                             seconds)
        torch.testing.assert_close(grad.detach().cpu().double(), ref_grad.detach(), **tol)  # first order: exact
        if isinstance(got, RuntimeError):
            assert "create_graph" in str(got) and "multi_lora_linear" in str(got), str(got)
            refused += 1
            continue
        for name, value, expected in zip(seconds, got, want):  # not refused: then the true second derivative
            torch.testing.assert_close(value.detach().cpu().double(), expected.detach(), **tol,
                                       msg=f"d/d{name} of d(loss)/d{first} ({loss_name})")
    assert refused > 0


def test_multi_lora_second_derivative_after_backward_raises():
    """The path users take for gradient penalties: ``create_graph=True``, then ``.backward()`` of a loss built
    from the gradients; every parameter is reached through the op and raises."""
    tensors, segments = _problem("torch")
    y = _through_public_function(tensors, segments, "torch")
    (grad_x,) = torch.autograd.grad(y.sum(), tensors["input"], create_graph=True)
    penalty = grad_x.square().sum()
    with pytest.raises(RuntimeError, match="create_graph"):
        penalty.backward()


def test_compiled_op_refuses_double_backward():
    tensors, segments = _problem("torch")
    compiled = torch.compile(lambda t: _through_public_function(t, segments, "torch"), fullgraph=True,
                             backend="aot_eager")
    torch._dynamo.reset()
    y = compiled(tensors)
    (grad_w,) = torch.autograd.grad(y.square().sum(), tensors["weight"], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward|create_graph"):
        torch.autograd.grad(grad_w.sum(), tensors["lora_a"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_slp_second_derivatives_are_refused(backend):
    from test_slp import CASES, make_inputs, run_op, run_reference

    case, device = CASES["laytext_pixels"], kernel_device(backend)
    tensors, extra = make_inputs(case, _dtype(backend), device)
    trainable = [n for n, t in tensors.items() if t is not None and t.requires_grad]
    refused = 0
    for first in trainable:
        out = run_op(tensors, extra, case, backend)
        ref, leaves = run_reference(tensors, extra, case, torch.float64)
        weights = torch.randn(out.shape, dtype=torch.float64)
        (grad,) = torch.autograd.grad((out.square() * weights.to(out)).sum(), tensors[first], create_graph=True)
        (ref_grad,) = torch.autograd.grad((ref.square() * weights).sum(), leaves[first], create_graph=True)
        tol = dict(rtol=1e-4, atol=1e-4) if backend == "triton" else dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grad.detach().cpu().double(), ref_grad.detach(), **tol)
        others = [tensors[n] for n in trainable]
        try:
            got = torch.autograd.grad(grad.sum(), others, allow_unused=True)
        except RuntimeError as error:
            assert "create_graph" in str(error) and "slp_embed" in str(error), str(error)
            refused += 1
            continue
        want = (torch.autograd.grad(ref_grad.sum(), [leaves[n] for n in trainable], allow_unused=True)
                if ref_grad.requires_grad else [None] * len(trainable))
        for name, g, w in zip(trainable, got, want):
            g = torch.zeros_like(tensors[name]) if g is None else g
            w = torch.zeros_like(leaves[name]) if w is None else w
            torch.testing.assert_close(g.detach().cpu().double(), w.detach(), **tol, msg=f"d/d{name} of d/d{first}")
    assert refused == len(trainable)
