"""Validation of the multi-LoRA linear's arguments: one checker that returns the problem's sizes and the
flattened, normalised operands (every failure a ``ValueError`` naming the argument)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from monkey_kernels.ops.layout import rank_block
from monkey_kernels.ops.segments import SegmentInfo

from ..checks import FLOAT_DTYPES, KERNEL_DTYPES, check_device, check_dtype, check_tensor

__all__ = ["MultiLoRAProblem", "validate_multi_lora", "check_backend_dtype", "normalize_ranks", "seed_tensor"]


@dataclass(frozen=True)
class MultiLoRAProblem:
    """A validated multi-LoRA call: ``M`` rows of width ``K`` (``u [M, K]``), ``N`` outputs, ``num_adapters``
    adapters of rank ``<= r_max`` reading ``K_lora`` wide rows (``v [M, K_lora]`` or ``None`` for ``V = U``);
    ``lead`` the leading dims of the caller's input (the output is ``[*lead, N]`` of ``out_dtype``)."""

    u: torch.Tensor
    v: Optional[torch.Tensor]
    out_dtype: torch.dtype
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: torch.Tensor
    residual: Optional[torch.Tensor]
    segments: SegmentInfo
    ranks: torch.Tensor
    dropout_p: float
    seed: torch.Tensor
    lead: Tuple[int, ...]
    M: int
    N: int
    K: int
    K_lora: int
    num_adapters: int
    r_max: int
    r_block: int


def seed_tensor(seed, dropout_p: float) -> torch.Tensor:
    """The dropout seed as the int64 0-dim CPU tensor the ops take (drawn when ``None`` and dropout is on)."""
    if seed is None:
        if dropout_p > 0.0:
            return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
        return torch.zeros((), dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        if seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool or seed.numel() != 1:
            raise ValueError(f"seed must be an int or a one-element integer tensor, got {seed.dtype} "
                             f"{tuple(seed.shape)}")
        if seed.device.type != "cpu":
            raise ValueError(f"seed must be a CPU tensor (read on the host by the ops), got one on {seed.device}")
        seed = seed.reshape(()).to(torch.int64)
        if not torch.compiler.is_compiling() and not 0 <= int(seed) < 2**31:
            raise ValueError(f"seed must be in [0, 2**31), got {int(seed)}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
    return torch.tensor(seed, dtype=torch.int64)


def normalize_ranks(ranks, num_adapters: int, r_max: int, device: torch.device, checked: bool = False) -> torch.Tensor:
    """Validated int32 ``[num_adapters]`` ranks on ``device``. ``None`` = every adapter has rank ``r_max``.

    ``checked=True`` skips reading the values back (for ranks validated before, e.g. by a module)."""
    if ranks is None:
        return torch.full((num_adapters,), r_max, dtype=torch.int32, device=device)
    if isinstance(ranks, torch.Tensor):
        if ranks.dtype.is_floating_point or ranks.dtype == torch.bool or ranks.dim() != 1:
            raise ValueError(f"ranks must be a 1-D integer tensor, got {ranks.dtype} {tuple(ranks.shape)}")
        values = ranks
    else:
        try:
            entries = list(ranks)
        except TypeError:
            raise ValueError(f"ranks must be a sequence of ints or an integer tensor, got {type(ranks).__name__}") from None
        bad = [r for r in entries if isinstance(r, bool) or not isinstance(r, int)]
        if bad:  # a float rank would be truncated silently
            raise ValueError(f"ranks must be ints, got {bad[0]!r} in {entries!r}")
        values = torch.tensor(entries, dtype=torch.int64)
    if values.numel() != num_adapters:
        raise ValueError(f"ranks must have num_adapters={num_adapters} entries, got {values.numel()}")
    capturing = values.is_cuda and torch.cuda.is_current_stream_capturing()
    # Reading values back is illegal inside CUDA-graph capture and a graph break under torch.compile.
    if not (checked or capturing or torch.compiler.is_compiling()):
        host = values.cpu()
        if (host < 0).any():
            raise ValueError(f"ranks must be >= 0, got {host.tolist()}")
        if (host > r_max).any():
            raise ValueError(f"ranks must be <= r_max={r_max} (lora_a.shape[1]), got {host.tolist()}")
    return values.to(device=device, dtype=torch.int32).contiguous()


def validate_multi_lora(
    input, weight, bias, lora_a, lora_b, scale, segments, *, ranks=None, lora_input=None, residual=None,
    dropout_p: float = 0.0, seed=None, out_dtype=None, autocast: bool = False, ranks_checked: bool = False,
) -> MultiLoRAProblem:
    """Checks the arguments of :func:`~monkey_kernels.multi_lora_linear` (same names) and returns the
    :class:`MultiLoRAProblem`; builds the :class:`SegmentInfo` when ``segments`` are adapter ids.

    ``autocast``: the call runs under autocast (its operands already cast by the caller): the residual may then
    have any float dtype, and the default output dtype is the input's promoted with the residual's."""
    lead, K, N, num_adapters, r_max, k_lora = _check_shapes(input, weight, bias, lora_a, lora_b, scale, lora_input,
                                                            residual)
    _check_dtypes_and_devices(input, weight, bias, lora_a, lora_b, scale, lora_input, residual, autocast)
    out_dtype = _output_dtype(out_dtype, input.dtype, residual, autocast)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    dropout_p = float(dropout_p)
    seed = seed_tensor(seed, dropout_p)
    M = math.prod(lead)
    segments = _check_segments(segments, input, M, num_adapters)
    if isinstance(ranks, torch.Tensor) and ranks.is_meta and not input.is_meta:
        raise ValueError(f"ranks is on meta (no values), expected {input.device} (the device of input) or the CPU")
    ranks_t = normalize_ranks(ranks, num_adapters, r_max, input.device, checked=ranks_checked)

    # The kernels index bias and scale as dense vectors (no stride argument): an expanded (stride-0) or
    # strided bias / scale gave wrong sums. Both are tiny, so a copy when needed costs nothing.
    return MultiLoRAProblem(
        u=input.reshape(M, K), out_dtype=out_dtype, v=lora_input.reshape(M, k_lora) if lora_input is not None else None,
        weight=weight, bias=bias.contiguous() if bias is not None else None, lora_a=lora_a, lora_b=lora_b,
        scale=scale.contiguous(), residual=residual.reshape(M, N) if residual is not None else None,
        segments=segments, ranks=ranks_t, dropout_p=dropout_p, seed=seed, lead=lead, M=M, N=N, K=K,
        K_lora=k_lora, num_adapters=num_adapters, r_max=r_max, r_block=rank_block(max(r_max, 1)),
    )


def _check_shapes(input, weight, bias, lora_a, lora_b, scale, lora_input, residual):
    """Every operand a tensor of the right shape; ``(lead, K, N, num_adapters, r_max, K_lora)``."""
    check_tensor("input", input)
    check_tensor("weight", weight, 2)
    check_tensor("lora_a", lora_a, 3)
    check_tensor("lora_b", lora_b, 3)
    check_tensor("scale", scale, 1)
    if input.dim() < 1:
        raise ValueError("input must have at least 1 dimension")
    if input.dtype not in FLOAT_DTYPES:
        raise ValueError(f"input must be float32, float16, bfloat16 or float64, got {input.dtype}")
    K, N = input.shape[-1], weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"weight must be [N, K={K}] (K = input.shape[-1]), got {tuple(weight.shape)}")
    num_adapters, r_max, k_lora = lora_a.shape
    lead = tuple(input.shape[:-1])
    k_expected = K
    if lora_input is not None:
        check_tensor("lora_input", lora_input)
        if tuple(lora_input.shape[:-1]) != lead:
            raise ValueError(
                f"lora_input must have the leading dims {lead} of input, got shape {tuple(lora_input.shape)}"
            )
        k_expected = lora_input.shape[-1]
    if k_lora != k_expected:
        raise ValueError(
            f"lora_a must be [num_adapters, r_max, {k_expected}] (the LoRA input width), got {tuple(lora_a.shape)}"
        )
    if tuple(lora_b.shape) != (num_adapters, N, r_max):
        raise ValueError(
            f"lora_b must be [num_adapters={num_adapters}, N={N}, r_max={r_max}], got {tuple(lora_b.shape)}"
        )
    if scale.shape[0] != num_adapters:
        raise ValueError(f"scale must be [num_adapters={num_adapters}], got {tuple(scale.shape)}")
    if not scale.dtype.is_floating_point:
        raise ValueError(f"scale must be a float tensor, got {scale.dtype}")
    if bias is not None:
        check_tensor("bias", bias, 1)
        if bias.shape[0] != N:
            raise ValueError(f"bias must be [N={N}], got {tuple(bias.shape)}")
    if residual is not None:
        check_tensor("residual", residual)
        if tuple(residual.shape) != lead + (N,):
            raise ValueError(f"residual must have shape {lead + (N,)}, got {tuple(residual.shape)}")
    return lead, K, N, num_adapters, r_max, k_lora


def _check_dtypes_and_devices(input, weight, bias, lora_a, lora_b, scale, lora_input, residual, autocast) -> None:
    """Every operand in the dtype of ``input`` (``scale``: any float dtype; under autocast ``residual`` too) and
    on its device."""
    named = [("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)]
    named += [(n, t) for n, t in (("bias", bias), ("lora_input", lora_input)) if t is not None]
    for name, tensor in named:
        check_dtype(name, tensor, input.dtype, "input")
    if residual is not None:
        if not autocast:
            check_dtype("residual", residual, input.dtype, "input")
        elif residual.dtype not in FLOAT_DTYPES:
            raise ValueError(f"residual must be float32, float16, bfloat16 or float64, got {residual.dtype}")
        named.append(("residual", residual))
    for name, tensor in named + [("scale", scale)]:
        check_device(name, tensor, input.device, "input")


def _output_dtype(out_dtype, compute_dtype: torch.dtype, residual, autocast: bool) -> torch.dtype:
    """``out_dtype`` checked, or its default: the compute dtype, promoted with the residual's under autocast (what
    ``F.linear(...) + residual`` gives there)."""
    if out_dtype is None:
        if autocast and residual is not None:
            return torch.promote_types(compute_dtype, residual.dtype)
        return compute_dtype
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be None or torch.float32, float16, bfloat16 or float64, got {out_dtype!r}")
    return out_dtype


def _check_segments(segments, input, M: int, num_adapters: int) -> SegmentInfo:
    """The :class:`SegmentInfo` of the call (built from adapter ids ``[batch]`` for a ``[batch, seq, K]`` input),
    checked against the input's rows, device and the number of adapters."""
    device = input.device
    if not isinstance(segments, SegmentInfo):
        # Unordered or scalar containers would be misread as ids (a dict iterates its keys).
        if isinstance(segments, (str, bytes, dict, set)) or not hasattr(segments, "__iter__"):
            raise ValueError(f"segments must be a SegmentInfo or adapter ids [batch] (a list or an integer tensor), "
                             f"got {type(segments).__name__}")
        if input.dim() != 3:
            raise ValueError(
                "segments given as adapter ids needs input of shape [batch, seq, K]; "
                f"got input of shape {tuple(input.shape)} (pass a SegmentInfo for other layouts)"
            )
        segments = SegmentInfo.from_batch(segments, input.shape[1], device=device)
        if segments.num_segments != input.shape[0]:
            raise ValueError(f"segments must give one adapter id per batch row ({input.shape[0]}), "
                             f"got {segments.num_segments}")
    if segments.device != device:
        raise ValueError(f"segments are on {segments.device}, expected {device} (the device of input)")
    if segments.num_rows != M:
        raise ValueError(f"segments cover {segments.num_rows} rows but input has {M} rows ({tuple(input.shape[:-1])})")
    if segments.max_adapter_id is not None and segments.max_adapter_id >= num_adapters:
        raise ValueError(
            f"segments use adapter id {segments.max_adapter_id}, out of range for num_adapters={num_adapters}"
        )
    return segments


def check_backend_dtype(backend: str, dtype: torch.dtype, out_dtype: Optional[torch.dtype] = None) -> None:
    """The dtypes the chosen backend runs: the Triton kernels compute and write float32, float16 and bfloat16."""
    if backend == "triton" and dtype not in KERNEL_DTYPES:
        raise ValueError(f"the triton backend supports float32, float16 and bfloat16 inputs, got {dtype}")
    if backend == "triton" and out_dtype is not None and out_dtype not in KERNEL_DTYPES:
        raise ValueError(f"the triton backend writes float32, float16 and bfloat16 outputs, got out_dtype {out_dtype} "
                         "(a float64 residual under autocast promotes the output to float64)")
