"""The one pattern every op follows: a PyTorch custom op pair (forward, backward) with fake implementations and
a registered autograd formula, plus an eager twin of the same functions.

Why a twin: an eager call through ``torch.library``'s dispatch costs about 0.1-0.2 ms on CPU (measured on the
multi-LoRA op, as much as a whole small layer), so eager calls run the very same forward / backward functions
as a plain ``torch.autograd.Function``; ``torch.compile`` and fake / meta tensors go through the custom ops,
which Dynamo keeps whole (see :func:`through_custom_op`).
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["through_custom_op", "eager_function"]


def through_custom_op(tensor: torch.Tensor) -> bool:
    """Whether a call must go through the custom op (traced by torch.compile, or tensors without values)."""
    return torch.compiler.is_compiling() or tensor.is_meta or torch._subclasses.fake_tensor.is_fake(tensor)


def _no_second_derivative(grads, message: bytes):
    """``grads`` as outputs of a node that raises ``message`` if anything differentiates through them (what
    ``torch.autograd.function.once_differentiable`` does, with the op's own message): a backward run with
    ``create_graph=True`` works, a second derivative says plainly that it is not supported."""
    real = [g for g in grads if isinstance(g, torch.Tensor)]
    error = torch._C._functions.DelayedError(message, len(real))
    aliases = []
    for g in real:
        g = g.detach()
        g.requires_grad = True
        aliases.append(g)
    wrapped = iter(error(*aliases) if aliases else ())
    return tuple(next(wrapped) if isinstance(g, torch.Tensor) else g for g in grads)


def eager_function(name: str, forward: Callable, setup_context: Callable, backward: Callable,
                   num_user_outputs: int = 1):
    """An ``autograd.Function`` running ``forward(*inputs)`` (the custom op's implementation: a tensor or a tuple),
    ``setup_context(ctx, inputs, outputs)`` and ``backward(ctx, *grads)`` (the registered autograd formula, called
    with the gradients of the user-facing outputs; it must not go through the custom backward op, so that the
    twin skips the dispatcher both ways). Only the first ``num_user_outputs`` outputs are returned."""
    message = (f"{name} has no second derivative: its backward is not differentiable "
               "(create_graph=True gives first-order gradients only)").encode()

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
            with torch.no_grad():
                result = backward(ctx, *grads)
            if torch.is_grad_enabled() and any(isinstance(g, torch.Tensor) and g.requires_grad for g in grads):
                return _no_second_derivative(result, message)
            return result

    EagerFunction.__name__ = EagerFunction.__qualname__ = f"Eager_{name}"
    return EagerFunction
