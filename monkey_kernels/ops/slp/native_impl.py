"""The SLP embedding assembly on the C++ ops of the native extension (the ``native`` backend).

``torch.ops.monkey_kernels_native.slp_embed_forward`` (``csrc/slp_cpu.cpp`` on CPU; ``csrc/cuda/`` in CUDA
builds) and ``slp_embed_backward`` (CPU: all six gradients in one op, the table gradient by a counting sort of
the text tokens, deterministic). On CUDA tensors the backward is the shared PyTorch one. The ops' fake
implementations are registered here, when this module is imported (after the library was loaded).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from monkey_kernels.ops import alloc
from monkey_kernels.ops.layout import KIND_BOX

from ... import _native
from ..registry import register_backend
from .torch_impl import source_rows, torch_backward

__all__ = ["NativeSLP", "IMPLEMENTATION", "has_cuda_kernel"]

_NS = _native.OP_NAMESPACE


def has_cuda_kernel() -> bool:
    """Whether the loaded extension registered the CUDA kernel of ``slp_embed_forward`` (CUDA builds)."""
    _native.ops()
    return torch._C._dispatch_has_kernel_for_dispatch_key("monkey_kernels_native::slp_embed_forward", "CUDA")


def native_forward(kind, src, table, boxes, page_sizes, weight, bias, image_features, box_dtype=None) -> torch.Tensor:
    T, H = kind.shape[0], table.shape[1]
    # NaN-poisoned under the tests, like the Triton launchers' outputs; one spare row T absorbs unused box slots
    full = alloc.empty((T + 1, H), device=table.device, dtype=table.dtype)
    out = full[:T]
    _native.ops().slp_embed_forward.out(kind, src, table, boxes, page_sizes, weight, bias, image_features, out=out)
    if box_dtype is not None:
        # the box rows rounded to the reference's nn.Linear output dtype (autocast): O(N H), no host read
        rows = source_rows(kind, src, KIND_BOX, boxes.shape[0] * boxes.shape[1])
        full.index_copy_(0, rows, full.index_select(0, rows).to(box_dtype).to(table.dtype))
    return out


def native_backward(dy, kind, src, boxes, page_sizes, weight, num_embeddings: int, padding_idx: int, n_image: int,
                    needs: List[bool], box_dtype=None) -> List[Optional[torch.Tensor]]:
    if dy.device.type != "cpu":  # the CUDA kernel is forward only
        return torch_backward(dy, kind, src, boxes, page_sizes, weight, num_embeddings, padding_idx, n_image, needs,
                              box_dtype)
    if box_dtype is None or not any(needs[1:5]):
        return list(_native.ops().slp_embed_backward(dy, kind, src, boxes, page_sizes, weight, num_embeddings,
                                                     padding_idx, n_image, list(needs)))
    # Rounded box gradients (autocast): the projection's four from the PyTorch backward (O(N H)), the table and
    # image rows from the C++ op as usual.
    box_needs = [False, *needs[1:5], False]
    grads = torch_backward(dy, kind, src, boxes, page_sizes, weight, num_embeddings, padding_idx, n_image, box_needs,
                           box_dtype)
    if needs[0] or needs[5]:
        rest = _native.ops().slp_embed_backward(dy, kind, src, boxes, page_sizes, weight, num_embeddings,
                                                padding_idx, n_image, [needs[0], False, False, False, False, needs[5]])
        grads[0], grads[5] = rest[0], rest[5]
    return grads


class NativeSLP:
    name = "native"
    forward = staticmethod(native_forward)
    backward = staticmethod(native_backward)


def _register_fakes() -> None:
    """Fake (meta) implementations of the C++ ops, for torch.compile; registered once the library is loaded."""

    @torch.library.register_fake(f"{_NS}::slp_embed_forward")
    def _slp_forward_fake(kind, src, table, boxes, page_sizes, weight, bias, image_features):
        return table.new_empty((kind.shape[0], table.shape[1]))

    @torch.library.register_fake(f"{_NS}::slp_embed_forward.out")
    def _slp_forward_out_fake(kind, src, table, boxes, page_sizes, weight, bias, image_features, *, out):
        return None  # writes into out, returns nothing

    @torch.library.register_fake(f"{_NS}::slp_embed_backward")
    def _slp_backward_fake(grad_out, kind, src, boxes, page_sizes, weight, num_embeddings, padding_idx, n_image,
                           output_mask):
        H = grad_out.shape[1]
        B, N, _ = boxes.shape
        shapes = [
            ((num_embeddings, H), grad_out.dtype), ((H, 4), weight.dtype), ((H,), weight.dtype),
            ((B, N, 4), boxes.dtype), ((B, 2), page_sizes.dtype if page_sizes is not None else boxes.dtype),
            ((B * n_image, H), grad_out.dtype),
        ]
        return tuple(grad_out.new_empty(shape, dtype=dtype) if wanted else None
                     for wanted, (shape, dtype) in zip(output_mask, shapes))


IMPLEMENTATION = register_backend("slp", "native", NativeSLP)


if _native.available():  # importing this module loads the extension (it is imported when native is chosen)
    _register_fakes()
