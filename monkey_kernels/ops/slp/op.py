r"""The SLP embedding assembly as a PyTorch custom op pair with fake implementations and a registered autograd
formula (``torch.ops.monkey_kernels.slp_embed_fwd`` / ``_bwd``), and its eager twin.

Both ops take flattened tokens (validated inputs and the built :class:`~.checks.TokenIndex`) and run the
backend's implementation (:func:`monkey_kernels.ops.backends.implementation`).

Forward: ``Y[t]`` as in :mod:`monkey_kernels._triton.slp`. Backward, with ``dY [T, H]``:

.. math::
    d\mathrm{table}[v] = \sum_{t:\,\mathrm{text},\ \mathrm{id}_t = v} dY_t \quad (\text{row } v =
    \text{padding\_idx excluded, as in } \texttt{nn.Embedding}),

    g_s = dY_{p(s)} \text{ for the token } p(s) \text{ that used box slot } s \;(0 \text{ if none}),\quad
    dW = \sum_s g_s c_s^\top,\quad db = \sum_s g_s,\quad dc_s = W^\top g_s,

    d\mathrm{boxes}_s = dc_s \oslash (w, h, w, h)_b,\quad
    dw_b = -\sum_{k} \frac{dc_{s,0}\, x_1 + dc_{s,2}\, x_2}{w_b^2},\quad
    dh_b = -\sum_{k} \frac{dc_{s,1}\, y_1 + dc_{s,3}\, y_2}{h_b^2},

    d\mathrm{features}[b, j] = dY_{p(b, j)} \;(0 \text{ for rows no placeholder used}).

The table gradient is ATen's ``embedding_dense_backward`` (the kernel ``nn.Embedding`` uses) on ``dY``
with non-text rows zeroed: the same numerics and determinism as the reference's ``nn.Embedding`` (on
CUDA a sort-based segment reduction), where a Triton kernel would need float atomics (run-to-run
non-deterministic, and contended in bf16 on hot rows such as frequent tokens). The box and
image gradients gather only the placeholder rows of ``dY`` (``O((N + n_image) H)``), then a ``[n, H] x
[H, 4]`` product in fp32 (float64 for a float64 table, as the forward projection); the triton and torch
backends share this backward.

The ``native`` backend on CPU computes the same six gradients in one C++ op (``slp_embed_backward``):
the table gradient by a counting sort of the text tokens (each table row the ordered sum of its tokens'
rows, fp32 accumulation (float64 for a float64 table), deterministic), the box / projection reductions in
float64.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..autocast import autocast_excluded, cast_for_autocast, register_autocast
from ..backends import implementation
from ..custom import eager_function, refuse_second_derivative, second_derivative_message
from .reference import normalize_boxes

__all__ = ["slp_embed_fwd", "slp_embed_bwd", "EagerSLPEmbed", "autocast_projection"]

def _forward(table: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], boxes: torch.Tensor,
             page_sizes: Optional[torch.Tensor], image_features: Optional[torch.Tensor], kind: torch.Tensor,
             src: torch.Tensor, padding_idx: int, backend: str, box_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``[T, H]`` in the table's dtype (shapes in :mod:`.torch_impl`; ``padding_idx`` -1 for none, used by the
    backward only). ``box_dtype``: the box rows are rounded to it (autocast; ``None``: not rounded)."""
    with autocast_excluded():
        return implementation("slp", backend).forward(kind, src, table, boxes, page_sizes, weight, bias,
                                                      image_features, box_dtype=box_dtype)


slp_embed_fwd = torch.library.custom_op("monkey_kernels::slp_embed_fwd", mutates_args=())(_forward)


@slp_embed_fwd.register_fake
def _(table, weight, bias, boxes, page_sizes, image_features, kind, src, padding_idx, backend, box_dtype=None):
    return table.new_empty((kind.shape[0], table.shape[1]))


def _backward(grad_out: torch.Tensor, kind: torch.Tensor, src: torch.Tensor, boxes: torch.Tensor,
              page_sizes: Optional[torch.Tensor], weight: torch.Tensor, num_embeddings: int, padding_idx: int,
              n_image: int, backend: str, needs: List[bool], box_dtype: Optional[torch.dtype] = None,
              ) -> List[torch.Tensor]:
    """The gradients of ``table, weight, bias, boxes, page_sizes, image rows [B * n_image, H]`` that ``needs``
    asks for, in that order (an empty placeholder for the others: op outputs cannot be None). ``box_dtype``: the
    box rows of ``grad_out`` are rounded to it first (the gradient of the reference's ``nn.Linear`` output)."""
    with autocast_excluded():
        grads = implementation("slp", backend).backward(grad_out.contiguous(), kind, src, boxes, page_sizes, weight,
                                                        num_embeddings, padding_idx, n_image, needs,
                                                        box_dtype=box_dtype)
    return [g if g is not None else grad_out.new_empty(0) for g in grads]


slp_embed_bwd = torch.library.custom_op("monkey_kernels::slp_embed_bwd", mutates_args=())(_backward)


@slp_embed_bwd.register_fake
def _(grad_out, kind, src, boxes, page_sizes, weight, num_embeddings, padding_idx, n_image, backend, needs,
      box_dtype=None):
    H = grad_out.shape[1]
    B, N, _ = boxes.shape
    shapes = [((num_embeddings, H), grad_out.dtype), ((H, 4), weight.dtype), ((H,), weight.dtype),
              ((B, N, 4), boxes.dtype), ((B, 2), page_sizes.dtype if page_sizes is not None else boxes.dtype),
              ((B * n_image, H), grad_out.dtype)]
    return [grad_out.new_empty(shape, dtype=dtype) if want else grad_out.new_empty(0)
            for want, (shape, dtype) in zip(needs, shapes)]


def _setup_context(ctx, inputs, output):
    table, weight, bias, boxes, page_sizes, image_features, kind, src, padding_idx, backend, box_dtype = inputs
    ctx.save_for_backward(kind, src, boxes, page_sizes, weight)
    ctx.options = (backend, table.shape[0], padding_idx, box_dtype)
    ctx.image = None if image_features is None else (tuple(image_features.shape), image_features.dtype)


def _gradients(ctx, grad_out, backward_op):
    kind, src, boxes, page_sizes, weight = ctx.saved_tensors
    backend, num_embeddings, padding_idx, box_dtype = ctx.options
    needs = list(ctx.needs_input_grad[:6])
    grads = [None] * 6
    if any(needs):
        n_image = 0 if ctx.image is None else ctx.image[0][1]
        computed = backward_op(grad_out, kind, src, boxes, page_sizes, weight, num_embeddings, padding_idx,
                               n_image, backend, needs, box_dtype)
        grads = [g if want else None for want, g in zip(needs, computed)]
    if grads[5] is not None:
        shape, dtype = ctx.image
        grads[5] = grads[5].view(shape).to(dtype)
    return tuple(grads) + (None,) * 5


_SECOND_DERIVATIVE = second_derivative_message("slp_embed")


def _autograd_backward(ctx, grad_out):
    create_graph = torch.is_grad_enabled()
    with torch.no_grad():
        grads = _gradients(ctx, grad_out, slp_embed_bwd)
    if create_graph:
        return refuse_second_derivative(grads, (grad_out,) + tuple(ctx.saved_tensors), _SECOND_DERIVATIVE)
    return grads


slp_embed_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


def autocast_projection(weight: torch.Tensor, bias: Optional[torch.Tensor], boxes: torch.Tensor,
                        page_sizes: Optional[torch.Tensor], dtype: torch.dtype, device_type: str):
    """``(weight, bias, boxes, page_sizes, box_dtype)`` the op runs with under autocast: what the reference's
    ``nn.Linear(4, H)`` computes there. The boxes are normalized as the reference does (in their own dtype,
    before the linear), then the boxes, ``weight`` and ``bias`` are cast to ``dtype`` like the linear's operands
    (differentiably; ``page_sizes`` becomes ``None``: already applied), and the box rows are rounded to the
    linear's output dtype (``box_dtype``) before they are written into the table's dtype. The table and the image
    features are not autocast (an embedding lookup and copies)."""
    weight = cast_for_autocast(weight, dtype, device_type)
    bias = cast_for_autocast(bias, dtype, device_type)
    boxes = cast_for_autocast(normalize_boxes(boxes, page_sizes), dtype, device_type)
    box_dtype = weight.dtype if weight.dtype == dtype else None  # a float64 weight is not autocast
    return weight, bias, boxes, None, box_dtype


def _autocast_arguments(args: tuple, dtype: torch.dtype, device_type: str) -> tuple:
    """The autocast policy (:func:`autocast_projection`) for a direct call of the forward custom op."""
    table, weight, bias, boxes, page_sizes, image_features, kind, src, padding_idx, backend = args[:10]
    box_dtype = args[10] if len(args) > 10 else None
    if box_dtype is None:
        weight, bias, boxes, page_sizes, box_dtype = autocast_projection(weight, bias, boxes, page_sizes, dtype,
                                                                         device_type)
    return (table, weight, bias, boxes, page_sizes, image_features, kind, src, padding_idx, backend, box_dtype)


register_autocast(slp_embed_fwd, _autocast_arguments)

#: The eager twin of the op pair (see :mod:`monkey_kernels.ops.custom`).
EagerSLPEmbed = eager_function("slp_embed", _forward, _setup_context,
                               lambda ctx, grad_out: _gradients(ctx, grad_out, _backward))

