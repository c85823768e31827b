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


def _uniform_split(segments: SegmentInfo):
    """``(G, L)`` when the rows are ``G`` segments of ``L`` rows each (then batched GEMMs over segments
    do exactly the FLOPs of the LoRA), else ``None`` (block-structured GEMMs over all adapters)."""
    length = segments.segment_length
    if not length or segments.num_segments * length != segments.num_rows:
        return None
    return segments.num_segments, length


def _segment_weights(weight, segments, ranks, scale, dtype) -> torch.Tensor:
    """Each segment's adapter slice of ``weight [num_adapters, R, X]`` as ``[G, R, X]`` in ``dtype``, with
    rows past the rank, and every row of base-only segments, zeroed and the adapter's scale applied."""
    ids = segments.adapter_ids.to(torch.int64)
    index = ids.clamp(min=0)
    R = weight.shape[1]
    factor = ((torch.arange(R, device=ids.device)[None, :] < ranks.to(torch.int64)[index][:, None])
              & (ids >= 0)[:, None]).to(dtype)
    if scale is not None:
        factor = factor * scale.to(dtype)[index][:, None]
    return weight[index].to(dtype) * factor[:, :, None]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class TorchPrimitives:
    name = "torch"
    dropout_keep_mask = staticmethod(_torch_keep_mask)

    @staticmethod
    def shrink(x, weight, segments, ranks, r_block, dropout_p=0.0, seed=0):
        num_adapters, R, K = weight.shape
        M = x.shape[0]
        x = _dropout(x, dropout_p, seed, _torch_keep_mask)
        uniform = _uniform_split(segments)
        if uniform is not None:
            G, L = uniform
            weights = _segment_weights(weight, segments, ranks, None, _compute_dtype(x.dtype))
            h = torch.bmm(x.view(G, L, K).to(weights.dtype), weights.transpose(1, 2)).view(M, R)
        else:
            all_adapters = x.float() @ weight.reshape(num_adapters * R, K).float().t()
            index = segments.row_adapter.clamp(min=0).view(M, 1, 1).expand(M, 1, R)
            h = all_adapters.view(M, num_adapters, R).gather(1, index).view(M, R)
            h = h * _row_rank_mask(segments, ranks, R)
        # zero columns up to r_block, as the kernel's H has
        return torch.nn.functional.pad(h, (0, r_block - R))

    @staticmethod
    def fused_gemm(x, weight, bias, h, expand, scale, residual, segments, ranks, *,
                   out_features, out_dtype, lora_dropout_p=0.0, seed=0):
        M, N = segments.num_rows, int(out_features)
        # fp32/fp64 accumulate in place in the output (no extra [M, N] buffers); half dtypes accumulate
        # in an fp32 copy and round once, like the kernels.
        acc_dtype = out_dtype if out_dtype in (torch.float32, torch.float64) else torch.float32
        uniform = _uniform_split(segments)
        if x is not None and x.shape[1] > 0:
            acc = torch.nn.functional.linear(x, weight, bias)
            if h is None and residual is None:
                return acc
            acc = acc.to(acc_dtype)
        elif bias is not None:
            acc = bias.to(acc_dtype).expand(M, N).clone()
        else:
            acc = torch.zeros((M, N), device=segments.device, dtype=acc_dtype)
        if h is not None and uniform is not None:
            G, L = uniform
            R = expand.shape[2]
            weights = _segment_weights(expand.transpose(1, 2), segments, ranks, scale, acc_dtype)  # [G, R, N]
            rows = h[:, :R].to(acc_dtype).view(G, L, R)
            if lora_dropout_p > 0.0:
                keep = _torch_keep_mask(seed, M, N, lora_dropout_p, acc.device)
                lora = torch.bmm(rows, weights).view(M, N)
                acc += torch.where(keep, lora / (1.0 - lora_dropout_p), 0.0)
            else:
                acc.view(G, L, N).baddbmm_(rows, weights)
        elif h is not None:
            num_adapters, _, R = expand.shape
            rows = h[:, :R] * _row_rank_mask(segments, ranks, R)
            if scale is not None:
                rows = rows * scale.float()[segments.row_adapter.clamp(min=0)][:, None]
            blocks = _scatter_blocks(rows, segments, num_adapters).to(acc_dtype)
            expand_rows = expand.transpose(1, 2).reshape(num_adapters * R, N).to(acc_dtype)
            if lora_dropout_p > 0.0:
                keep = _torch_keep_mask(seed, M, N, lora_dropout_p, acc.device)
                acc += torch.where(keep, (blocks @ expand_rows) / (1.0 - lora_dropout_p), 0.0)
            else:
                acc.addmm_(blocks, expand_rows)
        if residual is not None:
            acc += residual
        return acc.to(out_dtype)

    @staticmethod
    def outer(x, y, segments, out, scale=None, dropout_p=0.0, seed=0):
        num_adapters, N, R = out.shape
        x = _dropout(x, dropout_p, seed, _torch_keep_mask)
        uniform = _uniform_split(segments)
        if uniform is not None:
            G, L = uniform
            dtype = _compute_dtype(x.dtype)
            ids = segments.adapter_ids.to(torch.int64)
            per_segment = torch.bmm(x.view(G, L, N).to(dtype).transpose(1, 2), y[:, :R].to(dtype).view(G, L, R))
            per_segment = per_segment * (ids >= 0).to(dtype)[:, None, None]
            result = torch.zeros((num_adapters, N, R), device=x.device, dtype=dtype)
            result.index_add_(0, ids.clamp(min=0), per_segment)
            if scale is not None:
                result = result * scale.to(dtype).view(num_adapters, 1, 1)
            out.copy_(result)
            return out
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
