"""Backends of the segmented multi-LoRA primitives and the rule that picks one.

Every backend implements the same three primitives (see ``triton_kernels.multi_lora`` for the math):
``shrink``, ``fused_gemm`` and ``outer``, plus ``dropout_keep_mask``. The autograd function in
``monkey_kernels.multi_lora`` is written once against them.

- ``triton``: the Triton kernels. CUDA tensors run them compiled; with ``TRITON_INTERPRET=1`` (set before
  import) the same kernels run on CPU tensors through Triton's interpreter.
- ``native``: the C++ extension (``csrc/multi_lora_cpu.cpp``, loaded lazily by
  :mod:`monkey_kernels._native`) for CPU tensors: row chunks in parallel (``at::parallel_for``), the base
  GEMM and the LoRA terms of a chunk back to back with ATen GEMMs, bias and residual fused.
- ``torch``: a vectorized pure-PyTorch path for CPU tensors (and any device): batched GEMMs over
  equal-length segments (no loop, no host read), else one GEMM per adapter on its rows; never a Python loop
  over tokens or segments.

Choice: the ``backend=`` argument, else the ``MONKEY_KERNELS_BACKEND`` environment variable, else
``triton`` for CUDA tensors or under ``TRITON_INTERPRET=1``; CPU tensors otherwise get ``native`` when the
extension loads and ``torch`` when it does not. The first automatic choice for each device type is logged
once (logger ``monkey_kernels``), with the reason.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Optional, Sequence

import torch

from triton_kernels.env import interpreter_active
from triton_kernels.segments import SegmentInfo

from . import _native  # the loader only: the extension itself loads on first use
from ._checks import accumulation_dtype

BACKENDS = ("triton", "native", "torch")
ENV_BACKEND = "MONKEY_KERNELS_BACKEND"

logger = logging.getLogger("monkey_kernels")
_logged_device_types: set = set()
_log_lock = threading.Lock()


def _triton_module():
    import triton_kernels.multi_lora as kernels  # imported lazily: a CPU user without Triton still works

    return kernels


def _log_choice_once(device_type: str, backend: str, why: str, level: int = logging.INFO) -> None:
    """One line per process and device type, the first time a backend is chosen automatically."""
    with _log_lock:
        if device_type in _logged_device_types:
            return
        _logged_device_types.add(device_type)
    names = {"native": "the native C++ backend", "torch": "the pure-PyTorch backend", "triton": "the Triton backend"}
    logger.log(level, "monkey-kernels: %s tensors use %s (%s)", device_type.upper(), names[backend], why)


def _auto_backend(device: torch.device) -> str:
    if device.type == "cuda":
        _log_choice_once("cuda", "triton", "CUDA tensors")
        return "triton"
    if interpreter_active():
        _log_choice_once(device.type, "triton", "TRITON_INTERPRET=1: the kernels run in Triton's interpreter")
        return "triton"
    if device.type == "cpu":
        if _native.available():
            origin = {"prebuilt": "prebuilt extension", "jit": "extension JIT-built from csrc/"}
            _log_choice_once("cpu", "native", origin.get(_native.status(), _native.status()))
            return "native"
        reason = _native.status()
        # A user who switched the extension off chose this; anything else is a build problem worth a warning.
        level = logging.INFO if reason.startswith("disabled") else logging.WARNING
        _log_choice_once("cpu", "torch", f"native extension unavailable: {reason}", level)
        return "torch"
    _log_choice_once(device.type, "torch", f"no fused backend for {device.type} tensors")
    return "torch"


def resolve_backend(backend: Optional[str], device: torch.device,
                    native_device_types: Sequence[str] = ("cpu",)) -> str:
    """The backend that runs for tensors on ``device``; raises ``ValueError`` for an impossible choice.

    ``device``: a ``torch.device`` or anything ``torch.device()`` accepts (``"cpu"``, ``"cuda:0"``).
    ``native_device_types``: device types the op's native implementation serves (the multi-LoRA op: CPU).
    """
    if not isinstance(device, torch.device):
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device must be a torch.device or a device string, got {device!r}") from error
    chosen = backend if backend is not None else (os.environ.get(ENV_BACKEND) or None)
    source = "backend" if backend is not None else ENV_BACKEND
    if chosen is None or chosen == "auto":
        return _auto_backend(device)
    if chosen not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS + ('auto',)}, got {chosen!r}")
    if chosen == "triton" and device.type != "cuda" and not interpreter_active():
        raise ValueError(
            f"{source}='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before import to run the "
            f"kernels on {device.type} tensors through the Triton interpreter"
        )
    if chosen == "native":
        if device.type not in native_device_types:
            raise ValueError(f"{source}='native' runs on {'/'.join(native_device_types)} tensors, got {device.type} tensors")
        if not _native.available():
            raise ValueError(f"{source}='native' is unavailable: {_native.status()}")
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


def _uniform_split(segments: SegmentInfo):
    """``(G, L)`` when the rows are ``G`` segments of ``L`` rows each (then batched GEMMs over segments
    do exactly the FLOPs of the LoRA), else ``None`` (ragged: one GEMM per adapter, see :func:`_adapter_rows`)."""
    length = segments.segment_length
    if not length or segments.num_segments * length != segments.num_rows:
        return None
    return segments.num_segments, length


def _segment_weights(weight, segments, ranks, scale, dtype) -> torch.Tensor:
    """Each segment's adapter slice of ``weight [num_adapters, R, X]`` as ``[G, R, X]`` in ``dtype``, with
    rows past the rank, and every row of base-only segments, set to zero and the adapter's scale applied.

    Zeros are selected (``torch.where``), never multiplied in: a NaN or inf past an adapter's rank, or in the
    adapter that id -1 is clamped to, must not turn into ``0 * NaN = NaN``."""
    ids = segments.adapter_ids.to(torch.int64)
    index = ids.clamp(min=0)
    R = weight.shape[1]
    used = (torch.arange(R, device=ids.device)[None, :] < ranks.to(torch.int64)[index][:, None]) & (ids >= 0)[:, None]
    weights = weight[index].to(dtype)
    if scale is not None:
        weights = weights * scale.to(dtype)[index][:, None, None]
    return torch.where(used[:, :, None], weights, 0.0)


def _adapter_rows(segments: SegmentInfo):
    """``[(adapter, rows)]``: the row indices (int64, ascending) of every adapter that owns rows; base-only
    rows are in none. Ragged layouts run one GEMM per adapter on these rows: exact FLOPs, and a NaN or inf
    can only reach the rows of its own adapter (a block-structured GEMM over all adapters multiplies every
    row with the other adapters' zero blocks, and ``0 * NaN`` leaks).

    Reads the per-adapter row counts back to the host (free on CPU, a synchronisation on CUDA, which is why
    it is refused during CUDA-graph capture: the Triton backend serves CUDA)."""
    device = segments.device
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise ValueError("the torch backend needs the row count of each adapter on the host for ragged segments, "
                         "which a CUDA-graph capture forbids; use backend='triton' (or equal-length segments)")
    row_adapter = segments.row_adapter
    counts = torch.bincount(row_adapter + 1, minlength=1).tolist()
    order = torch.argsort(row_adapter, stable=True)
    groups, start = [], counts[0]  # slot 0: the base-only rows (id -1) sort first
    for adapter, count in enumerate(counts[1:]):
        if count:
            groups.append((adapter, order[start:start + count]))
        start += count
    return groups


class TorchPrimitives:
    """The primitives in vectorized PyTorch (any device). Equal-length segments (``segment_length`` known):
    batched GEMMs over segments, no host read. Ragged segments: one GEMM per adapter on its rows
    (:func:`_adapter_rows`). fp32 accumulation for half dtypes, fp64 for fp64."""

    name = "torch"
    dropout_keep_mask = staticmethod(_torch_keep_mask)

    @staticmethod
    def shrink(x, weight, segments, ranks, r_block, dropout_p=0.0, seed=0):
        num_adapters, R, K = weight.shape
        M = x.shape[0]
        dtype = accumulation_dtype(x.dtype)
        x = _dropout(x, dropout_p, seed, _torch_keep_mask)
        uniform = _uniform_split(segments)
        if uniform is not None:
            G, L = uniform
            weights = _segment_weights(weight, segments, ranks, None, dtype)
            h = torch.bmm(x.view(G, L, K).to(dtype), weights.transpose(1, 2)).view(M, R)
            # An inf in a base-only row (or past the rank) times the zero weights is NaN: select zeros there.
            h = torch.where(_row_rank_mask(segments, ranks, R), h, 0.0)
            return torch.nn.functional.pad(h, (0, r_block - R))  # zero columns up to r_block, as the kernel's H
        h = torch.zeros((M, r_block), device=x.device, dtype=dtype)
        host_ranks = ranks.tolist()
        for adapter, rows in _adapter_rows(segments):
            rank = host_ranks[adapter]
            if rank:
                h[rows, :rank] = x[rows].to(dtype) @ weight[adapter, :rank].to(dtype).t()
        return h

    @staticmethod
    def fused_gemm(x, weight, bias, h, expand, scale, residual, segments, ranks, *,
                   out_features, out_dtype, lora_dropout_p=0.0, seed=0):
        M, N = segments.num_rows, int(out_features)
        # fp32/fp64 accumulate in place in the output (no extra [M, N] buffers); half dtypes accumulate
        # in an fp32 copy and round once, like the kernels.
        acc_dtype = accumulation_dtype(out_dtype)
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
        keep = None
        if h is not None and lora_dropout_p > 0.0:
            keep = _torch_keep_mask(seed, M, N, lora_dropout_p, acc.device)
        if h is not None and uniform is not None:
            G, L = uniform
            R = expand.shape[2]
            weights = _segment_weights(expand.transpose(1, 2), segments, ranks, scale, acc_dtype)  # [G, R, N]
            rows = h[:, :R].to(acc_dtype).view(G, L, R)
            if keep is not None:
                lora = torch.bmm(rows, weights).view(M, N)
                acc += torch.where(keep, lora / (1.0 - lora_dropout_p), 0.0)
            else:
                acc.view(G, L, N).baddbmm_(rows, weights)
        elif h is not None:
            host_ranks = ranks.tolist()
            for adapter, rows in _adapter_rows(segments):
                rank = host_ranks[adapter]
                if not rank:
                    continue
                term = h[rows, :rank].to(acc_dtype) @ expand[adapter, :, :rank].to(acc_dtype).t()
                if scale is not None:
                    term = term * scale[adapter].to(acc_dtype)
                if keep is not None:
                    term = torch.where(keep[rows], term / (1.0 - lora_dropout_p), 0.0)
                acc.index_add_(0, rows, term)
        if residual is not None:
            acc += residual
        return acc.to(out_dtype)

    @staticmethod
    def outer(x, y, segments, out, scale=None, dropout_p=0.0, seed=0):
        num_adapters, N, R = out.shape
        dtype = accumulation_dtype(x.dtype)
        x = _dropout(x, dropout_p, seed, _torch_keep_mask)
        uniform = _uniform_split(segments)
        result = torch.zeros((num_adapters, N, R), device=x.device, dtype=dtype)
        if uniform is not None:
            G, L = uniform
            ids = segments.adapter_ids.to(torch.int64)
            per_segment = torch.bmm(x.view(G, L, N).to(dtype).transpose(1, 2), y[:, :R].to(dtype).view(G, L, R))
            # base-only segments are added to adapter 0's slot below: select zeros, never multiply by 0
            per_segment = torch.where((ids >= 0)[:, None, None], per_segment, 0.0)
            result.index_add_(0, ids.clamp(min=0), per_segment)
        else:
            for adapter, rows in _adapter_rows(segments):
                result[adapter] = x[rows].to(dtype).t() @ y[rows, :R].to(dtype)
        if scale is not None:
            result = result * scale.to(dtype).view(num_adapters, 1, 1)
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


# ---------------------------------------------------------------------------------------------------------
# Native (C++) primitives
# ---------------------------------------------------------------------------------------------------------
def _optional_keep(seed: int, rows: int, cols: int, p: float, device) -> Optional[torch.Tensor]:
    # The torch backend's masks: a seed draws the same mask on both CPU backends.
    return _torch_keep_mask(seed, rows, cols, p, device) if p > 0.0 else None


class NativePrimitives:
    """The primitives of :class:`TorchPrimitives`, run by the C++ ops ``torch.ops.monkey_kernels_native.*``
    (CPU tensors; any strides; float32/64, float16, bfloat16 with fp32 accumulation)."""

    name = "native"
    dropout_keep_mask = staticmethod(_torch_keep_mask)

    @staticmethod
    def shrink(x, weight, segments, ranks, r_block, dropout_p=0.0, seed=0):
        """fp32 (fp64 for fp64 ``x``) ``[M, r_block]``: ``drop(x) @ weight[a][:rank]^T`` per row, zeros past
        the rank and on base-only rows. ``x [M, K]``, ``weight [A, R, K]`` (any strides)."""
        keep = _optional_keep(seed, x.shape[0], x.shape[1], dropout_p, x.device)
        return _native.ops().multi_lora_shrink(
            x, weight, segments.seg_indptr, segments.adapter_ids, ranks, int(r_block), keep, float(dropout_p))

    @staticmethod
    def fused_gemm(x, weight, bias, h, expand, scale, residual, segments, ranks, *,
                   out_features, out_dtype, lora_dropout_p=0.0, seed=0):
        """``[M, out_features]`` of ``out_dtype``: ``x @ weight^T + bias + drop(scale[a] * h[:, :R] @
        expand[a]^T) + residual``; any of them may be ``None`` (see :class:`TorchPrimitives`)."""
        M = segments.num_rows
        keep = _optional_keep(seed, M, int(out_features), lora_dropout_p, segments.device) if h is not None else None
        return _native.ops().multi_lora_fused_gemm(
            x, weight, bias, h, expand, scale, residual, segments.seg_indptr, segments.adapter_ids, ranks,
            M, int(out_features), out_dtype, keep, float(lora_dropout_p))

    # Mean segment length from which merged_linear pays off: shorter segments mean one BLAS call per few
    # rows, where the row-chunked fused_gemm keeps every thread busy with one call per thread.
    merge_min_segment_rows = 32

    @classmethod
    def merge_worthwhile(cls, segments) -> bool:
        return segments.num_rows >= cls.merge_min_segment_rows * max(segments.num_segments, 1)

    @staticmethod
    def merged_linear(x, weight, bias, down, up, scale, residual, segments, ranks, *, out_dtype):
        """``[M, N]``: ``x @ (weight + scale[a] * up[a][:, :rank] @ down[a][:rank])^T + bias + residual`` per row
        (no dropout, the LoRA reads ``x``): an adapter with enough rows gets its merged weight and ONE GEMM
        (``csrc/multi_lora_cpu.cpp``, ``multi_lora_merged_gemm``). ``x [M, K]``, ``weight [N, K]``,
        ``down [A, R, K]``, ``up [A, N, R]`` (any strides)."""
        return _native.ops().multi_lora_merged_gemm(
            x, weight, bias, down, up, scale, residual, segments.seg_indptr, segments.adapter_ids, ranks, out_dtype)

    @staticmethod
    def outer(x, y, segments, out, scale=None, dropout_p=0.0, seed=0):
        """Writes ``out[a] = (scale[a] *) sum over rows of a of drop(x)^T @ y[:, :R]`` into ``out [A, N, R]``
        (any strides); deterministic (a fixed work split and summation order)."""
        num_adapters, _, R = out.shape
        keep = _optional_keep(seed, x.shape[0], x.shape[1], dropout_p, x.device)
        result = _native.ops().multi_lora_outer(
            x, y, segments.seg_indptr, segments.adapter_ids, scale, keep, float(dropout_p), num_adapters, R,
            out.dtype)
        out.copy_(result)
        return out


def get_primitives(name: str):
    return {"triton": TritonPrimitives, "native": NativePrimitives, "torch": TorchPrimitives}[name]


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device, backend: Optional[str] = None):
    """The bool keep-mask ``[rows, cols]`` that ``backend`` applies to the LoRA input for ``(seed, p)``.

    Masks are a pure function of the seed (regenerated in backward, never stored); ``native`` and ``torch``
    draw the same mask for a seed, ``triton`` a different (equally distributed) one. ``seed`` in
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
    return get_primitives(resolve_backend(backend, device)).dropout_keep_mask(seed, rows, cols, float(p), device)
