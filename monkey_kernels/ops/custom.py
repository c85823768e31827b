"""The one pattern every op follows: a PyTorch custom op pair (forward, backward) with fake implementations and
a registered autograd formula, plus an eager twin of the same functions.

Why a twin: an eager call through ``torch.library``'s dispatch costs about 0.1-0.2 ms on CPU (measured on the
multi-LoRA op, as much as a whole small layer), so eager calls run the very same forward / backward functions
as a plain ``torch.autograd.Function``; ``torch.compile`` and fake / meta tensors go through the custom ops,
which Dynamo keeps whole (see :func:`through_custom_op`).

Second derivatives: the backward formulas are not differentiable (they run the backends' kernels), so a backward
run with ``create_graph=True`` returns gradients that carry a node raising a ``RuntimeError`` (naming
``create_graph``) the moment anything differentiates through them (:func:`refuse_second_derivative`), on both
paths.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

__all__ = ["through_custom_op", "eager_function", "refuse_second_derivative", "second_derivative_message"]


def through_custom_op(tensor: torch.Tensor) -> bool:
    """Whether a call must go through the custom op (traced by torch.compile, or tensors without values)."""
    return torch.compiler.is_compiling() or tensor.is_meta or torch._subclasses.fake_tensor.is_fake(tensor)


def second_derivative_message(name: str) -> bytes:
    return (f"{name} has no second derivative: its backward is not differentiable (a backward with "
            "create_graph=True gives exact first-order gradients, but differentiating them again through "
            f"{name} is not supported)").encode()


def refuse_second_derivative(grads: Sequence, depends_on: Iterable, message: bytes) -> tuple:
    """``grads`` (the tensors and ``None`` s a backward formula returns) as outputs of one node that raises
    ``message`` when a second derivative passes through it.

    A backward formula's results depend on the gradient it was given and on the saved inputs of its forward
    (``depends_on``: both, whatever requires grad). With ``create_graph=True`` PyTorch would record the formula's
    plain PyTorch ops and nothing of its kernels, so a second derivative would come out silently incomplete
    (missing terms, or ``None`` for "does not depend"). The node here takes every one of those tensors as an
    input: whichever of them a second derivative is taken with respect to, the path goes through it and raises.
    A backward without ``create_graph`` (grad mode off inside the formula) returns ``grads`` unchanged."""
    grads = tuple(grads)
    if not torch.is_grad_enabled():
        return grads
    sources = [t for t in depends_on if isinstance(t, torch.Tensor) and t.requires_grad]
    if not sources:  # nothing to differentiate with respect to: the gradients are constants
        return grads
    real = [g for g in grads if isinstance(g, torch.Tensor)]
    if not real:
        return grads
    error = torch._C._functions.DelayedError(message, len(real) + len(sources))
    # The node returns its inputs' values; only the gradients' are kept (detached: their values, a new node).
    wrapped = iter(error(*[g.detach() for g in real], *sources)[:len(real)])
    return tuple(next(wrapped) if isinstance(g, torch.Tensor) else g for g in grads)


def eager_function(name: str, forward: Callable, setup_context: Callable, backward: Callable,
                   num_user_outputs: int = 1):
    """An ``autograd.Function`` running ``forward(*inputs)`` (the custom op's implementation: a tensor or a tuple),
    ``setup_context(ctx, inputs, outputs)`` and ``backward(ctx, *grads)`` (the registered autograd formula, called
    with the gradients of the user-facing outputs; it must not go through the custom backward op, so that the
    twin skips the dispatcher both ways). Only the first ``num_user_outputs`` outputs are returned.

    With ``create_graph=True`` the gradients come out marked by :func:`refuse_second_derivative` (their
    dependence on the incoming gradients and on every saved tensor)."""
    message = second_derivative_message(name)

    class EagerFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            outputs = forward(*inputs)
            setup_context(ctx, inputs, outputs)
            if isinstance(outputs, torch.Tensor):
                return outputs
            return outputs[0] if num_user_outputs == 1 else tuple(outputs[:num_user_outputs])

        @staticmethod
        def backward(ctx, *grads):
            create_graph = torch.is_grad_enabled()
            with torch.no_grad():
                result = backward(ctx, *grads)
            if create_graph:
                return refuse_second_derivative(result, tuple(grads) + tuple(ctx.saved_tensors), message)
            return result

    EagerFunction.__name__ = EagerFunction.__qualname__ = f"Eager_{name}"
    return EagerFunction
