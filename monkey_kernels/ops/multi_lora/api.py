"""``multi_lora_linear``: validate -> resolve the backend -> call the op; and the dropout masks a backend uses."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from monkey_kernels.ops.segments import SegmentInfo

from ..autocast import autocast_dtype, cast_for_autocast
from ..backends import implementation, resolve_backend
from ..custom import through_custom_op
from .checks import check_backend_dtype, validate_multi_lora
from .op import NO_LENGTH, EagerMultiLoRALinear, multi_lora_linear_fwd

__all__ = ["multi_lora_linear", "dropout_keep_mask"]


def multi_lora_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor,
    segments: Union[SegmentInfo, torch.Tensor, Sequence[int]],
    *,
    ranks: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    lora_input: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: Optional[Union[int, torch.Tensor]] = None,
    out_dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
    ranks_checked: bool = False,
) -> torch.Tensor:
    r"""Linear layer with one LoRA adapter per segment of rows, fused with the base GEMM.

    For the rows of segment ``g`` using adapter ``a = adapter_ids[g]``::

        Y = U @ W^T + bias + scale[a] * (dropout(V) @ A[a][:rank[a]]^T) @ B[a][:, :rank[a]]^T (+ residual)

    Args:
        input: ``U``, ``[..., K]``; the leading dims flatten row-major to ``M`` rows.
        weight: ``W``, ``[N, K]``.
        bias: ``[N]`` or ``None``.
        lora_a: ``A``, ``[num_adapters, r_max, K_lora]``.
        lora_b: ``B``, ``[num_adapters, N, r_max]``.
        scale: ``[num_adapters]``, any float dtype; may require grad (Monkey's learnable ``lora_scale``).
        segments: a :class:`SegmentInfo` with ``num_rows == M``; or adapter ids ``[batch]`` for an input
            ``[batch, seq, K]`` (one adapter per batch row). Id ``-1`` = base only.
        ranks: ``[num_adapters]`` ints ``<= r_max``; entries past an adapter's rank contribute nothing.
            ``None``: all ``r_max``.
        lora_input: ``V``, ``[..., K_lora]`` with the same leading dims as ``input``; ``None``: ``V = U``.
        residual: ``[..., N]`` added in the same pass, or ``None``.
        dropout_p: LoRA dropout probability on ``V`` (pass 0 in eval). Masks are a function of ``seed``.
        seed: dropout seed, an int in ``[0, 2**31)`` or a one-element integer CPU tensor holding one (what a
            compiled graph can draw without a graph break); ``None`` draws one from PyTorch's default CPU
            generator (so ``torch.manual_seed`` makes runs repeatable).
        out_dtype: the dtype of the output (float32, float16, bfloat16; float64 on the CPU backends), written
            from the fp32 accumulator; ``None``: the compute dtype (the input's), or under autocast that dtype
            promoted with the residual's (what ``F.linear(...) + residual`` returns there). The backward rounds
            the incoming gradient to the compute dtype, as the reference's ``F.linear`` receives it.
        backend: ``"triton"``, ``"native"``, ``"torch"`` or ``None``/``"auto"`` (see :mod:`monkey_kernels.ops.backends`).
        ranks_checked: ``ranks`` was validated before (``MultiLoRALinear`` does it once); skips reading a
            device tensor back, which would synchronise with the device on every call.
    Returns:
        ``[..., N]`` in ``out_dtype``: by default the dtype of ``input`` (of the autocast dtype under autocast,
        promoted with the residual's dtype when there is a residual).
    Raises:
        ValueError: naming the argument, for bad shapes, dtypes, devices, ids, ranks or segments.

    Autocast (``torch.autocast`` enabled for the input's device type, CPU or CUDA): ``input``, ``lora_input``,
    ``weight``, ``bias``, ``lora_a`` and ``lora_b`` are cast to the autocast dtype as ``F.linear`` casts its
    operands (float64 tensors excepted); ``scale`` keeps its dtype (its gradient too) and ``residual`` its own
    (added to the fp32 accumulator; the output takes the promoted dtype). Outside autocast every tensor operand
    but ``scale`` must have the input's dtype. With half inputs (fp16 / bf16, under autocast or not) the LoRA
    intermediate ``H = drop(V) A^T`` and its gradient ``s dY B`` are rounded to that dtype, where a reference
    LoRA module in that dtype rounds them (so an fp16 overflow there gives inf / NaN gradients, as GradScaler
    expects), while every product accumulates in fp32.
    """
    amp = autocast_dtype(input.device.type) if isinstance(input, torch.Tensor) else None
    if amp is not None:
        device_type = input.device.type
        input, lora_input, weight, bias, lora_a, lora_b = (
            cast_for_autocast(t, amp, device_type) for t in (input, lora_input, weight, bias, lora_a, lora_b))
    problem = validate_multi_lora(
        input, weight, bias, lora_a, lora_b, scale, segments, ranks=ranks, lora_input=lora_input,
        residual=residual, dropout_p=dropout_p, seed=seed, out_dtype=out_dtype, autocast=amp is not None,
        ranks_checked=ranks_checked,
    )
    backend = resolve_backend(backend, input.device, "multi_lora")
    check_backend_dtype(backend, input.dtype, problem.out_dtype)
    p, segments = problem, problem.segments
    u, v, res = p.u, p.v, p.residual
    if backend == "triton":
        # The kernels take any strides, but row-major inputs keep their loads coalesced.
        u = u.contiguous()
        v = v.contiguous() if v is not None else None
        res = res.contiguous() if res is not None else None
    # H serves dB and dscale only; inference (and frozen B and scale) need not keep it.
    need_h = torch.is_grad_enabled() and (lora_b.requires_grad or p.scale.requires_grad)
    op_inputs = (
        u, v, p.weight, p.bias, p.lora_a, p.lora_b, p.scale, res, p.ranks, segments.seg_indptr,
        segments.adapter_ids, segments.row_segment, segments.row_adapter,
        NO_LENGTH if segments.segment_length is None else segments.segment_length,
        p.r_block, p.dropout_p, p.seed, backend, need_h, p.out_dtype,
    )
    if through_custom_op(u):
        y, _ = multi_lora_linear_fwd(*op_inputs)
    else:
        y = EagerMultiLoRALinear.apply(*op_inputs)
    return y.view(*p.lead, p.N)


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device, backend: Optional[str] = None):
    """The bool keep-mask ``[rows, cols]`` that ``backend`` applies to the LoRA input for ``(seed, p)``.

    Masks are a pure function of the seed (regenerated in backward, never stored); each backend has its own
    stream (``native``: a counter-based hash in C++, ``torch``: ``torch.rand`` from a generator seeded with
    ``seed``, ``triton``: Philox), equally distributed, so one seed gives different masks on different
    backends. ``seed`` in
    ``[0, 2**31)``, ``p`` in ``[0, 1)``, ``rows``, ``cols`` >= 0 (``ValueError`` otherwise).
    """
    for name, value in (("seed", seed), ("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    if rows < 0 or cols < 0:
        raise ValueError(f"rows and cols must be >= 0, got rows={rows}, cols={cols}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"p must be a float in [0, 1), got {p!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be a torch.device or a device string, got {device!r}") from error
    if device.type == "meta":
        raise ValueError("device 'meta' holds no values: a mask needs a real device")
    backend = resolve_backend(backend, device, "multi_lora")
    # a copy: the torch backend keeps the last mask for its backward, which a caller's in-place edit would corrupt
    return implementation("multi_lora", backend).dropout_keep_mask(seed, rows, cols, float(p), device).clone()
