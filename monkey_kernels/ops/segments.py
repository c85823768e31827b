"""Segment metadata shared by every kernel of the package.

A *segment* is a contiguous run of rows of a flattened ``[M, dim]`` activation that uses one adapter
(one image tile, one image, or any run of rows). ``SegmentInfo`` is built once per forward and handed to
every layer and kernel; it is the only segment type the package knows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

__all__ = ["SegmentInfo"]

IdsLike = Union[torch.Tensor, Sequence[int]]


_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _check_int32_range(name: str, tensor: torch.Tensor) -> None:
    # The metadata is stored as int32: a wider value would wrap silently (2**32 + 1 -> adapter 1).
    if tensor.dtype == torch.int64 and tensor.numel():
        low, high = int(tensor.min()), int(tensor.max())
        if low < _INT32_MIN or high > _INT32_MAX:
            raise ValueError(f"{name} must fit in int32, got values in [{low}, {high}]")


def _as_index_tensor(
    value: IdsLike, name: str, device: Optional[torch.device], check_values: bool = True
) -> torch.Tensor:
    """``value`` as a contiguous int32 1-D tensor (on ``device`` when given). ``check_values``: also read the
    values back to check they fit int32 (skipped for device tensors when host checks are off)."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got dtype {value.dtype}")
        if value.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(value.shape)}")
        if value.is_meta and check_values:
            raise ValueError(f"{name} is on the meta device (no values to validate); pass validate=False")
        if check_values and not value.is_meta:
            _check_int32_range(name, value)
        tensor = value
    else:
        if isinstance(value, (str, bytes)):
            raise ValueError(f"{name} must be a 1-D sequence of ints, got {type(value).__name__}")
        try:
            items = list(value)
            raw = torch.as_tensor(items) if items else torch.zeros(0, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError, OverflowError) as error:
            raise ValueError(f"{name} must be a 1-D sequence of ints: {error}") from None
        # as_tensor(dtype=int64) would truncate 0.5 to 0 and turn True into 1 without a word.
        if raw.dtype.is_floating_point or raw.dtype.is_complex or raw.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D sequence of ints, got {raw.dtype} values {items!r}")
        if raw.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(raw.shape)}")
        if torch.compiler.is_compiling():  # the list is a constant of the graph: check its Python values
            if any(not _INT32_MIN <= int(v) <= _INT32_MAX for v in items):
                raise ValueError(f"{name} must fit in int32, got {items!r}")
        else:
            _check_int32_range(name, raw)  # host data: free to check
        tensor = raw
    if device is not None:
        tensor = tensor.to(device)
    return tensor.to(torch.int32).contiguous()


def _host_checks_wanted(validate: Optional[bool], device: torch.device) -> bool:
    if validate is not None:
        return validate
    # Checking values needs them on the host; inside CUDA-graph capture that read is illegal, and under
    # torch.compile it would break the graph.
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return not torch.compiler.is_compiling()


@dataclass(frozen=True, eq=False)
class SegmentInfo:
    """Rows → segment → adapter map for the segmented multi-LoRA kernels.

    Attributes (all tensors on one device):
        seg_indptr:   int32 ``[G + 1]``; segment ``g`` owns rows ``seg_indptr[g] : seg_indptr[g + 1]``.
        adapter_ids:  int32 ``[G]``; adapter of each segment, ``-1`` = base weights only (no adapter).
        row_segment:  int32 ``[M]``; segment index of each row (kernels read it per row tile).
        row_adapter:  int64 ``[M]``; adapter of each row, ``-1`` for base-only rows.
        num_rows:     ``M`` as a Python int (known from shapes, never read back from the device).
        num_segments: ``G`` as a Python int.
        segment_length: the common length of all segments when it is known without reading the device
            (always for :meth:`from_batch`; for :meth:`from_indptr` when validated and all are equal),
            else ``None``. Lets the PyTorch path use batched GEMMs with exact FLOPs.
        max_adapter_id: largest adapter id as a Python int when the metadata was validated on the host,
            ``None`` when it was built without host synchronisation (``validate=False`` or during
            CUDA-graph capture); ops then cannot check ids against the number of adapters.

    Build it with :meth:`from_batch` (one adapter per batch row of a ``[batch, seq, dim]`` input) or
    :meth:`from_indptr` (ragged packed rows, empty segments allowed). Neither constructor synchronises
    with the device when ``validate=False``; by default they validate on the host except while a CUDA
    graph is being captured.
    """

    seg_indptr: torch.Tensor
    adapter_ids: torch.Tensor
    row_segment: torch.Tensor
    row_adapter: torch.Tensor
    num_rows: int
    num_segments: int
    max_adapter_id: Optional[int]
    segment_length: Optional[int] = None

    @property
    def device(self) -> torch.device:
        return self.seg_indptr.device

    @classmethod
    def from_batch(
        cls,
        adapter_ids: IdsLike,
        seq_len: int,
        *,
        device: Optional[Union[str, torch.device]] = None,
        validate: Optional[bool] = None,
    ) -> "SegmentInfo":
        """One segment of ``seq_len`` rows per batch row: rows ``b*seq_len : (b+1)*seq_len`` use
        ``adapter_ids[b]``. Matches an input of shape ``[batch, seq_len, dim]`` flattened row-major."""
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
            raise ValueError(f"seq_len must be a non-negative int, got {seq_len!r}")
        dev = torch.device(device) if device else None
        if dev is not None and dev.type == "meta" and not isinstance(adapter_ids, torch.Tensor):
            # host values for meta tensors (shape-only tracing): validated here, then moved
            return cls.from_batch(adapter_ids, seq_len, validate=validate).to(dev)
        source = adapter_ids.device if isinstance(adapter_ids, torch.Tensor) else torch.device("cpu")
        ids = _as_index_tensor(adapter_ids, "adapter_ids", dev, _host_checks_wanted(validate, source))
        dev = ids.device
        num_segments = ids.numel()
        seg_indptr = (torch.arange(num_segments + 1, device=dev, dtype=torch.int64) * seq_len).to(torch.int32)
        row_segment = torch.arange(num_segments, device=dev, dtype=torch.int32).repeat_interleave(seq_len)
        return cls._finish(seg_indptr, ids, row_segment, num_segments * seq_len, validate, seq_len)

    @classmethod
    def from_indptr(
        cls,
        seg_indptr: IdsLike,
        adapter_ids: IdsLike,
        *,
        num_rows: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
        validate: Optional[bool] = None,
    ) -> "SegmentInfo":
        """Ragged segments: segment ``g`` is rows ``seg_indptr[g]:seg_indptr[g+1]`` (``G + 1`` offsets,
        starting at 0, non-decreasing; equal neighbours make an empty segment).

        ``num_rows`` (= ``seg_indptr[-1]``) must be given to build without host synchronisation from
        device tensors; when omitted it is read from ``seg_indptr``.
        """
        dev = torch.device(device) if device else None
        if dev is not None and dev.type == "meta" and not isinstance(seg_indptr, torch.Tensor) \
                and not isinstance(adapter_ids, torch.Tensor):
            return cls.from_indptr(seg_indptr, adapter_ids, num_rows=num_rows, validate=validate).to(dev)

        def host_checks(value) -> bool:
            source = value.device if isinstance(value, torch.Tensor) else torch.device("cpu")
            return _host_checks_wanted(validate, source)

        indptr = _as_index_tensor(seg_indptr, "seg_indptr", dev, host_checks(seg_indptr))
        ids = _as_index_tensor(adapter_ids, "adapter_ids", indptr.device, host_checks(adapter_ids))
        if indptr.numel() != ids.numel() + 1:
            raise ValueError(
                f"seg_indptr must have len(adapter_ids) + 1 = {ids.numel() + 1} entries, got {indptr.numel()}"
            )
        if num_rows is None:
            num_rows = int(indptr[-1].item())
            if num_rows < 0:  # named as the offset it is, not as a num_rows the caller never passed
                raise ValueError(f"seg_indptr must be non-negative, got seg_indptr[-1]={num_rows}")
        if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
            raise ValueError(f"num_rows must be a non-negative int, got {num_rows!r}")
        lengths = (indptr[1:] - indptr[:-1]).to(torch.int64)
        segment_length = None
        if _host_checks_wanted(validate, indptr.device):
            cls._check_indptr(indptr, num_rows)
            host_lengths = lengths.cpu()
            if host_lengths.numel() and bool((host_lengths == host_lengths[0]).all()):
                segment_length = int(host_lengths[0].item())
        num_segments = ids.numel()
        row_segment = torch.repeat_interleave(
            torch.arange(num_segments, device=indptr.device, dtype=torch.int32),
            lengths.clamp(min=0),
            output_size=num_rows,
        )
        return cls._finish(indptr, ids, row_segment, num_rows, validate, segment_length)

    @classmethod
    def from_row_mask(
        cls,
        mask: torch.Tensor,
        *,
        true_adapter: int = 0,
        false_adapter: int = -1,
        trim: Optional[bool] = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> "SegmentInfo":
        """Runs of rows from a boolean row mask: every maximal run of ``True`` rows is one segment of adapter
        ``true_adapter``, every run of ``False`` rows one of ``false_adapter`` (``-1`` = base only). ``mask`` of
        any shape flattens row-major to the ``M`` rows of an input ``[*mask.shape, K]`` (e.g. InternLM-XComposer's
        ``im_mask [B, N]``: the image tokens' runs use the adapter, the text runs do not). Runs may cross the
        boundary between two batch rows: the rows are one flattened sequence.

        Built with device ops only (change points, a cumulative sum, a scatter): no host read, so it works
        under ``torch.compile(fullgraph=True)`` and inside a CUDA-graph capture. The number of runs is
        data-dependent, so without a host read the segment count is the static bound ``M``: the runs first, in
        row order, then empty segments (offset ``M``, adapter ``-1``) up to ``M`` (the kernels only visit the
        segments a row tile touches; see the PLoRA rule's notes for what each backend pays for the tail).

        Args:
            mask: bool tensor, at least 1-D; ``M = mask.numel()``.
            true_adapter: adapter id (``>= 0``) of the ``True`` runs; false_adapter: id (``>= -1``) of the others.
            trim: read the run count back (one small device-to-host read) and keep exactly the runs; ``None``
                trims when a host read is allowed (not while compiling, not while capturing a CUDA graph).
            device: where to build (default: the mask's device).
        Returns:
            ``SegmentInfo`` with ``num_rows = M``, ``num_segments`` = the run count (trimmed) or ``M``; built
            without host validation (``max_adapter_id`` is ``None``), its values are valid by construction.
        """
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor, got {got}")
        if mask.dim() < 1:
            raise ValueError("mask must have at least 1 dimension (one entry per row)")
        for name, value, low in (("true_adapter", true_adapter, 0), ("false_adapter", false_adapter, -1)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= _INT32_MAX:
                raise ValueError(f"{name} must be an int in [{low}, 2**31), got {value!r}")
        if trim is not None and not isinstance(trim, bool):
            raise ValueError(f"trim must be a bool or None, got {trim!r}")
        flat = mask.reshape(-1)
        if device is not None:
            flat = flat.to(device)
        dev = flat.device
        if trim is None:
            trim = _host_checks_wanted(None, dev)
        M = flat.numel()
        if M == 0:
            return cls._finish(torch.zeros(1, dtype=torch.int32, device=dev), torch.zeros(0, dtype=torch.int32,
                               device=dev), torch.zeros(0, dtype=torch.int32, device=dev), 0, False, None)
        # run index of every row: a new run starts at row 0 and wherever the mask changes
        starts = torch.cat([flat.new_ones(1), flat[1:] != flat[:-1]])
        run = starts.cumsum(0) - 1  # int64 [M]
        positions = torch.arange(M, device=dev, dtype=torch.int64)
        # a run's offset is the smallest row in it; slots no run reaches keep M (empty trailing segments)
        indptr = torch.full((M + 1,), M, dtype=torch.int64, device=dev)
        indptr.scatter_reduce_(0, run, positions, reduce="amin", include_self=True)
        runs = run[-1:] + 1  # [1], on the device
        live = positions < runs
        first_row = flat[indptr[:M].clamp(max=M - 1)]
        ids = torch.where(live, torch.where(first_row, true_adapter, false_adapter), -1).to(torch.int32)
        row_adapter = torch.where(flat, true_adapter, false_adapter).to(torch.int64)
        segment_length = None
        if trim:
            count = int(runs.item())
            indptr, ids = indptr[:count + 1], ids[:count]
            segment_length = M if count == 1 else None
        return cls(
            seg_indptr=indptr.to(torch.int32), adapter_ids=ids.contiguous(), row_segment=run.to(torch.int32),
            row_adapter=row_adapter, num_rows=M, num_segments=int(ids.numel()), max_adapter_id=None,
            segment_length=segment_length,
        )

    @staticmethod
    def _check_indptr(indptr: torch.Tensor, num_rows: int) -> None:
        values = indptr.cpu().to(torch.int64)
        if values[0].item() != 0:
            raise ValueError(f"seg_indptr must start at 0, got {values[0].item()}")
        if (values < 0).any():
            raise ValueError(f"seg_indptr must be non-negative, got {values.tolist()}")
        steps = values[1:] - values[:-1]
        if (steps < 0).any():
            bad = int(torch.nonzero(steps < 0)[0].item())
            raise ValueError(
                f"seg_indptr must be non-decreasing (sorted); seg_indptr[{bad}]={values[bad].item()} > "
                f"seg_indptr[{bad + 1}]={values[bad + 1].item()}"
            )
        if values[-1].item() != num_rows:
            raise ValueError(f"seg_indptr[-1]={values[-1].item()} does not match num_rows={num_rows}")

    @classmethod
    def _finish(cls, indptr, ids, row_segment, num_rows, validate, segment_length) -> "SegmentInfo":
        max_id: Optional[int] = None
        if _host_checks_wanted(validate, ids.device):
            host_ids = ids.cpu()
            if (host_ids < -1).any():
                bad = int(torch.nonzero(host_ids < -1)[0].item())
                raise ValueError(
                    f"adapter_ids[{bad}]={host_ids[bad].item()} is invalid: ids are >= 0, or -1 for base only"
                )
            max_id = int(host_ids.max().item()) if host_ids.numel() else -1
        if ids.numel():
            row_adapter = ids.to(torch.int64)[row_segment.to(torch.int64)]
        else:
            row_adapter = torch.full((num_rows,), -1, dtype=torch.int64, device=ids.device)
        return cls(
            seg_indptr=indptr,
            adapter_ids=ids,
            row_segment=row_segment,
            row_adapter=row_adapter,
            num_rows=int(num_rows),
            num_segments=int(ids.numel()),
            max_adapter_id=max_id,
            segment_length=segment_length,
        )

    def to(self, device: Union[str, torch.device]) -> "SegmentInfo":
        """The same metadata on another device (no-op when already there)."""
        device = torch.device(device)
        if self.device == device:
            return self
        return SegmentInfo(
            seg_indptr=self.seg_indptr.to(device),
            adapter_ids=self.adapter_ids.to(device),
            row_segment=self.row_segment.to(device),
            row_adapter=self.row_adapter.to(device),
            num_rows=self.num_rows,
            num_segments=self.num_segments,
            max_adapter_id=self.max_adapter_id,
            segment_length=self.segment_length,
        )

    def __repr__(self) -> str:
        return (
            f"SegmentInfo(num_rows={self.num_rows}, num_segments={self.num_segments}, "
            f"max_adapter_id={self.max_adapter_id}, device={self.device})"
        )
