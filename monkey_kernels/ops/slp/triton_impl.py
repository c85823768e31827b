"""The SLP embedding assembly on the Triton kernel (``triton_kernels/slp.py``; the ``triton`` backend): forward
by the kernel, backward by the shared PyTorch one (gathers, and ATen's ``embedding_dense_backward`` for the
table: deterministic, where a Triton kernel would need float atomics). Importing this module imports Triton."""
from monkey_kernels._triton.slp import slp_embed_forward

from ..registry import register_backend
from .torch_impl import torch_backward

__all__ = ["TritonSLP", "IMPLEMENTATION"]


class TritonSLP:
    name = "triton"
    forward = staticmethod(slp_embed_forward)
    backward = staticmethod(torch_backward)


IMPLEMENTATION = register_backend("slp", "triton", TritonSLP)
