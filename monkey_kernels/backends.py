"""Backends of the segmented multi-LoRA primitives and the rule that picks one.

Every backend implements the same three primitives (see ``triton_kernels.multi_lora`` for the math):
``shrink``, ``fused_gemm`` and ``outer``, plus ``dropout_keep_mask``. The autograd function in
``monkey_kernels.multi_lora`` is written once against them.

- ``triton``: the Triton kernels. CUDA tensors run them compiled; with ``TRITON_INTERPRET=1`` (set before
  import) the same kernels run on CPU tensors through Triton's interpreter.
- ``torch``: a vectorized pure-PyTorch path for CPU tensors (and any device). Adapters are handled by
  block-diagonal dense GEMMs over all adapters at once: no Python loop over tokens, segments or adapters.

Choice: the ``backend=`` argument, else the ``MONKEY_KERNELS_BACKEND`` environment variable, else
``triton`` for CUDA tensors or under ``TRITON_INTERPRET=1``, ``torch`` otherwise.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from triton_kernels.env import interpreter_active
from triton_kernels.segments import SegmentInfo

BACKENDS = ("triton", "torch")
ENV_BACKEND = "MONKEY_KERNELS_BACKEND"


def _triton_module():
    import triton_kernels.multi_lora as kernels  # imported lazily: a CPU user without Triton still works

    return kernels


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The backend that runs for tensors on ``device``; raises ``ValueError`` for an impossible choice."""
    chosen = backend if backend is not None else (os.environ.get(ENV_BACKEND) or None)
    source = "backend" if backend is not None else ENV_BACKEND
    if chosen is None or chosen == "auto":
        return "triton" if device.type == "cuda" or interpreter_active() else "torch"
    if chosen not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS + ('auto',)}, got {chosen!r}")
    if chosen == "triton" and device.type != "cuda" and not interpreter_active():
        raise ValueError(
            f"{source}='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before import to run the "
            f"kernels on {device.type} tensors through the Triton interpreter"
        )
    return chosen


# ---------------------------------------------------------------------------------------------------------
# Pure PyTorch primitives
# ---------------------------------------------------------------------------------------------------------
def _torch_keep_mask(seed: int, rows: int, cols: int, p: float, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return torch.rand((rows, cols), generator=generator, device=device) >= p


def _dropout(x: torch.Tensor, p: float, seed: int, keep_mask) -> torch.Tensor:
    if p <= 0.0:
        return x
    keep = keep_mask(seed, x.shape[0], x.shape[1], p, x.device)
    return torch.where(keep, x.float() / (1.0 - p), 0.0).to(x.dtype)


def _row_rank_mask(segments: SegmentInfo, ranks: torch.Tensor, width: int) -> torch.Tensor:
    """bool ``[M, width]``: column ``r`` of row ``i`` belongs to its adapter (``r < rank``, id ≠ -1)."""
    active = segments.row_adapter >= 0
    row_rank = torch.where(active, ranks.to(torch.int64)[segments.row_adapter.clamp(min=0)], 0)
    return torch.arange(width, device=row_rank.device)[None, :] < row_rank[:, None]


def _scatter_blocks(values: torch.Tensor, segments: SegmentInfo, num_adapters: int) -> torch.Tensor:
    """``[M, R]`` → ``[M, num_adapters * R]`` with each row's values in its adapter's block (zeros
    elsewhere, all zeros for base-only rows)."""
    M, R = values.shape
    blocks = values.new_zeros((M, num_adapters, R))
    index = segments.row_adapter.clamp(min=0).view(M, 1, 1).expand(M, 1, R)
    active = (segments.row_adapter >= 0).view(M, 1, 1)
    blocks.scatter_(1, index, values.view(M, 1, R) * active)
    return blocks.view(M, num_adapters * R)


class TorchPrimitives:
    name = "torch"
    dropout_keep_mask = staticmethod(_torch_keep_mask)

    @staticmethod
    def shrink(x, weight, segments, ranks, r_block, dropout_p=0.0, seed=0):
        num_adapters, R, K = weight.shape
        M = x.shape[0]
        x = _dropout(x, dropout_p, seed, _torch_keep_mask)
        all_adapters = x.float() @ weight.reshape(num_adapters * R, K).float().t()
        index = segments.row_adapter.clamp(min=0).view(M, 1, 1).expand(M, 1, R)
        h = all_adapters.view(M, num_adapters, R).gather(1, index).view(M, R)
        h = h * _row_rank_mask(segments, ranks, R)
        out = h.new_zeros((M, r_block))
        out[:, :R] = h
        return out

    @staticmethod
    def fused_gemm(x, weight, bias, h, expand, scale, residual, segments, ranks, *,
                   out_features, out_dtype, lora_dropout_p=0.0, seed=0):
        M, N = segments.num_rows, int(out_features)
        if x is not None and x.shape[1] > 0:
            out = torch.nn.functional.linear(x, weight, bias)
        elif bias is not None:
            out = bias.expand(M, N)
        else:
            out = torch.zeros((M, N), device=segments.device, dtype=out_dtype)
        if h is None and residual is None:
            return out.to(out_dtype).contiguous()
        acc = out.float()
        if h is not None:
            num_adapters, _, R = expand.shape
            rows = h[:, :R] * _row_rank_mask(segments, ranks, R)
            if scale is not None:
                rows = rows * scale.float()[segments.row_adapter.clamp(min=0)][:, None]
            lora = _scatter_blocks(rows, segments, num_adapters) @ expand.transpose(1, 2).reshape(
                num_adapters * R, N
            ).float()
            if lora_dropout_p > 0.0:
                keep = _torch_keep_mask(seed, M, N, lora_dropout_p, lora.device)
                lora = torch.where(keep, lora / (1.0 - lora_dropout_p), 0.0)
            acc = acc + lora
        if residual is not None:
            acc = acc + residual.float()
        return acc.to(out_dtype)

    @staticmethod
    def outer(x, y, segments, out, scale=None, dropout_p=0.0, seed=0):
        num_adapters, N, R = out.shape
        x = _dropout(x, dropout_p, seed, _torch_keep_mask)
        blocks = _scatter_blocks(y[:, :R], segments, num_adapters)  # [M, A*R]
        result = (x.float().t() @ blocks).view(N, num_adapters, R).permute(1, 0, 2)
        if scale is not None:
            result = result * scale.float().view(num_adapters, 1, 1)
        out.copy_(result)
        return out


class TritonPrimitives:
    name = "triton"

    @staticmethod
    def shrink(*args, **kwargs):
        return _triton_module().segmented_shrink(*args, **kwargs)

    @staticmethod
    def fused_gemm(*args, **kwargs):
        return _triton_module().fused_lora_gemm(*args, **kwargs)

    @staticmethod
    def outer(*args, **kwargs):
        return _triton_module().segmented_outer(*args, **kwargs)

    @staticmethod
    def dropout_keep_mask(seed, rows, cols, p, device):
        return _triton_module().dropout_keep_mask(seed, rows, cols, p, device)


def get_primitives(name: str):
    return {"triton": TritonPrimitives, "torch": TorchPrimitives}[name]


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device, backend: Optional[str] = None):
    """The bool keep-mask ``[rows, cols]`` that ``backend`` applies to the LoRA input for ``(seed, p)``.

    Masks are a pure function of the seed (regenerated in backward, never stored); the two backends draw
    different (equally distributed) masks for the same seed.
    """
    device = torch.device(device)
    return get_primitives(resolve_backend(backend, device)).dropout_keep_mask(seed, rows, cols, p, device)
