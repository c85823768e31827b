"""CUDA-graph capture of a patched model's inference forward.

The fused ops never read device values back on the host while a graph is captured: segment metadata and
ranks skip their host checks during capture (``SegmentInfo`` validation, ``normalize_ranks``), the patched
Monkey forward builds its adapter ids with device ops, and dropout seeds are CPU tensors. What capture does
need is a warm-up with the same shapes first, so that Triton has compiled and autotuned every kernel (an
autotuner's timing runs cannot be captured).
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["GraphedForward", "capture_forward"]


class GraphedForward:
    """A forward captured in a CUDA graph: ``graphed(x)`` copies ``x`` into the static input, replays the
    graph and returns the static output (overwritten by the next call: clone it to keep it).

    Attributes: ``static_input`` (the captured input buffer), ``static_output``, ``graph``.
    """

    def __init__(self, graph: torch.cuda.CUDAGraph, static_input: torch.Tensor, static_output) -> None:
        self.graph = graph
        self.static_input = static_input
        self.static_output = static_output

    def __call__(self, x: torch.Tensor):
        if x.shape != self.static_input.shape or x.dtype != self.static_input.dtype or x.device != self.static_input.device:
            raise ValueError(
                f"x must match the captured input ({tuple(self.static_input.shape)}, {self.static_input.dtype}, "
                f"{self.static_input.device}), got ({tuple(x.shape)}, {x.dtype}, {x.device})"
            )
        if x.data_ptr() != self.static_input.data_ptr():
            self.static_input.copy_(x)
        self.graph.replay()
        return self.static_output


def capture_forward(fn: Callable[[torch.Tensor], object], example: torch.Tensor, warmup: int = 3) -> GraphedForward:
    """Captures ``fn(example)`` (no autograd) in a CUDA graph after ``warmup`` eager runs on a side stream.

    Args:
        fn: e.g. a patched model in eval mode; it must not synchronise with the host (the patched modules
            of this package do not).
        example: a CUDA tensor with the shape and dtype of every later input.
        warmup: eager runs before capture (compile and autotune the kernels for these shapes).
    Raises:
        ValueError: ``example`` is not a CUDA tensor or ``warmup < 1``.
    """
    if not isinstance(example, torch.Tensor) or example.device.type != "cuda":
        raise ValueError("example must be a CUDA tensor: CUDA graphs capture CUDA work only")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
    static_input = example.clone()
    side = torch.cuda.Stream(device=example.device)
    side.wait_stream(torch.cuda.current_stream(example.device))
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(warmup):
            fn(static_input)
    torch.cuda.current_stream(example.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_output = fn(static_input)
    return GraphedForward(graph, static_input, static_output)
