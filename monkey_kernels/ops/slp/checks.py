"""Validation of ``slp_embed``'s arguments: one checker that returns the problem's sizes and the token index
(every failure a ``ValueError`` naming the argument or the sequence)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from monkey_kernels.ops.layout import KIND_BOX, KIND_IMAGE, KIND_TEXT, KIND_ZERO

from ..checks import FLOAT_DTYPES, KERNEL_DTYPES, check_device, check_tensor
from .reference import PAD_TOKEN_ID

__all__ = ["SLPProblem", "TokenIndex", "validate_slp", "check_backend", "build_token_index", "as_id_tuple"]


@dataclass
class TokenIndex:
    """Per-token routing of a flattened ``[B * S]`` batch (all on the device of ``input_ids``).

    kind: int32 ``[T]`` (``KIND_*``). src: int64 ``[T]``: the token id (text), ``b * N + k`` (box),
    ``b * n_image + j`` (image), 0 (zero row). box_count / image_count: int64 ``[B]`` placeholders per
    sequence (for validation).
    """

    kind: torch.Tensor
    src: torch.Tensor
    box_count: torch.Tensor
    image_count: torch.Tensor


def as_id_tuple(image_token_id) -> Tuple[int, ...]:
    if image_token_id is None:
        return ()
    if isinstance(image_token_id, bool):
        raise ValueError(f"image_token_id must be an int or a sequence of ints, got {image_token_id!r}")
    if isinstance(image_token_id, int):
        return (image_token_id,)
    if isinstance(image_token_id, torch.Tensor):
        return tuple(int(i) for i in image_token_id.flatten().tolist())
    try:
        return tuple(int(i) for i in image_token_id)
    except (TypeError, ValueError):
        raise ValueError(f"image_token_id must be an int or a sequence of ints, got {image_token_id!r}") from None


def build_token_index(
    input_ids: torch.Tensor,
    vocab_size: int,
    box_token_id: int,
    image_token_ids: Tuple[int, ...],
    box_limit: torch.Tensor,
    n_boxes: int,
    image_limit: torch.Tensor,
    n_image: int,
) -> TokenIndex:
    """Kind and source index of every token of ``input_ids [B, S]``, with cumsums (no host sync).

    ``box_limit`` / ``image_limit`` (int64 ``[B]``): valid boxes / feature rows per sequence; a placeholder
    whose rank reaches the limit, a padding id ``-1`` and a text id outside ``[0, vocab_size)`` become
    ``KIND_ZERO`` (the validation in :func:`slp_embed` turns all but the padding into errors first).
    """
    ids = input_ids.to(torch.int64)
    B, S = ids.shape
    batch = torch.arange(B, device=ids.device, dtype=torch.int64)[:, None]
    is_box = ids == box_token_id
    is_image = torch.zeros_like(is_box)
    for image_id in image_token_ids:  # a handful of ids at most (Monkey: one)
        is_image |= ids == image_id
    box_rank = torch.cumsum(is_box, dim=1) - 1
    image_rank = torch.cumsum(is_image, dim=1) - 1
    box_ok = is_box & (box_rank < box_limit[:, None])
    image_ok = is_image & (image_rank < image_limit[:, None])
    is_text = ~is_box & ~is_image & (ids >= 0) & (ids < vocab_size)
    kind = torch.full_like(ids, KIND_ZERO)
    kind = torch.where(is_text, KIND_TEXT, kind)
    kind = torch.where(box_ok, KIND_BOX, kind)
    kind = torch.where(image_ok, KIND_IMAGE, kind)
    src = torch.zeros_like(ids)
    src = torch.where(is_text, ids, src)
    src = torch.where(box_ok, batch * n_boxes + box_rank, src)
    src = torch.where(image_ok, batch * n_image + image_rank, src)
    return TokenIndex(
        kind=kind.to(torch.int32).reshape(-1),
        src=src.reshape(-1),
        box_count=is_box.sum(dim=1),
        image_count=is_image.sum(dim=1),
    )


@dataclass(frozen=True)
class SLPProblem:
    """A validated ``slp_embed`` call: ``B`` sequences of ``S`` tokens, a ``[V, H]`` table, ``box_slots [B, N >= 1,
    4]`` (a zero slot when there are no boxes), ``image_features [B, n_image, H]`` or ``None``, the token index,
    and ``padding_idx`` (-1 for none)."""

    B: int
    S: int
    V: int
    H: int
    n_image: int
    box_slots: torch.Tensor
    image_features: Optional[torch.Tensor]
    index: TokenIndex
    padding_idx: int


def _per_sequence_limit(name: str, value, batch: int, full: int, device) -> torch.Tensor:
    """int64 ``[B]`` counts of valid boxes / feature rows (``None``: all ``full``)."""
    if value is None:
        return torch.full((batch,), full, dtype=torch.int64, device=device)
    t = torch.as_tensor(value, device=device)
    if t.dtype.is_floating_point or t.dtype == torch.bool or tuple(t.shape) != (batch,):
        raise ValueError(f"{name} must be {batch} integers (one per sequence), got {t.dtype} {tuple(t.shape)}")
    return t.to(torch.int64)


def _first_bad(flags: torch.Tensor) -> Optional[int]:
    bad = flags.nonzero()
    return None if bad.numel() == 0 else int(bad[0, 0])


def _validate_values(
    ids, index: TokenIndex, vocab_size, box_token_id, image_ids, boxes, page_sizes, box_limit, image_limit,
    strict_boxes, image_span_unit, has_boxes, has_image,
) -> None:
    """Raise ``ValueError`` naming the first offending sequence. One device-to-host copy of small tensors."""
    B, S = ids.shape
    ids64 = ids.to(torch.int64)
    placeholder = ids64 == box_token_id
    for image_id in image_ids:
        placeholder |= ids64 == image_id
    bad_id = ~placeholder & (ids64 != PAD_TOKEN_ID) & ((ids64 < 0) | (ids64 >= vocab_size))
    N = boxes.shape[1]
    slot_valid = torch.arange(N, device=ids.device)[None, :] < box_limit[:, None]  # [B, N]
    x1, y1, x2, y2 = boxes.unbind(-1)
    bad_box = (~torch.isfinite(boxes).all(dim=-1) | (x2 < x1) | (y2 < y1)) & slot_valid
    if page_sizes is not None:
        sizes = page_sizes.to(torch.float64)
        bad_size = ~torch.isfinite(sizes).all(dim=-1) | (sizes <= 0).any(dim=-1)
    else:
        bad_size = torch.zeros(B, dtype=torch.bool, device=ids.device)
    # argmax has no answer over an empty dim (S = 0): then there is no bad id, and position 0 is never read.
    first_id = bad_id.long().argmax(dim=1) if S else torch.zeros(B, dtype=torch.long, device=ids.device)
    summary = torch.stack([
        bad_id.any(dim=1).long(), first_id, bad_box.any(dim=1).long(), bad_box.long().argmax(dim=1),
        bad_size.long(), index.box_count, index.image_count, box_limit, image_limit,
    ]).cpu()
    (has_bad_id, first_id_pos, has_bad_box, first_box, size_bad, box_count, image_count,
     box_lim, image_lim) = summary.tolist()
    host_ids = None
    for b in range(B):  # over the (host) summary of a handful of sequences, not over tokens
        if has_bad_id[b]:
            if host_ids is None:
                host_ids = ids.cpu()
            raise ValueError(
                f"input_ids: sequence {b} has id {int(host_ids[b, first_id_pos[b]])} at position {first_id_pos[b]}, "
                f"expected ids in [0, {vocab_size}) (the embedding table's rows) or {PAD_TOKEN_ID} (padding)"
            )
        if size_bad[b]:
            raise ValueError(
                f"page_sizes: sequence {b} has page size {page_sizes[b].tolist()}, expected finite (w, h) > 0"
            )
        if has_bad_box[b]:
            k = first_box[b]
            raise ValueError(
                f"boxes: sequence {b}, box {k} is {boxes[b, k].tolist()}, expected finite (x1, y1, x2, y2) "
                "with x2 >= x1 and y2 >= y1"
            )
        if box_count[b] > box_lim[b] or (strict_boxes and box_count[b] != box_lim[b]):
            what = "boxes" if has_boxes else "boxes (none were given)"
            raise ValueError(
                f"sequence {b} has {box_count[b]} box placeholders (id {box_token_id}) but {box_lim[b]} {what}; "
                f"expected {'exactly' if strict_boxes else 'at most'} {box_lim[b]} placeholders"
            )
        if image_count[b] != image_lim[b]:
            what = "image feature rows" if has_image else "image feature rows (no image_features given)"
            raise ValueError(
                f"sequence {b} has an image placeholder span of {image_count[b]} tokens (ids {list(image_ids)}) "
                f"but {image_lim[b]} {what}; expected {image_lim[b]} placeholders"
            )
    if image_span_unit is not None and image_ids:
        is_image = torch.isin(ids64, torch.tensor(image_ids, device=ids.device))
        padded = torch.nn.functional.pad(is_image, (1, 1))
        starts = (padded[:, 1:-1] & ~padded[:, :-2]).nonzero()
        ends = (padded[:, 1:-1] & ~padded[:, 2:]).nonzero()
        lengths = (ends[:, 1] - starts[:, 1] + 1).cpu()
        bad = _first_bad(lengths % image_span_unit != 0)
        if bad is not None:
            b, start = int(starts[bad, 0]), int(starts[bad, 1])
            raise ValueError(
                f"sequence {b} has an image placeholder span of {int(lengths[bad])} tokens at position {start}; "
                f"expected a multiple of {image_span_unit} ((tiles + 1) * {image_span_unit} per image)"
            )


def validate_slp(
    input_ids, embedding_weight, proj_weight, proj_bias, boxes=None, *, box_token_id=0, page_sizes=None,
    num_boxes=None, image_features=None, image_token_id=None, num_image_tokens=None, image_span_unit=None,
    strict_boxes=False, padding_idx=None, validate=True,
) -> SLPProblem:
    """Checks the arguments of :func:`~monkey_kernels.slp_embed` (same names), builds the token index and, with
    ``validate``, checks the values (one small device-to-host read; skipped under ``torch.compile``, where the
    read would break the graph: run once eagerly to validate)."""
    validate = validate and not torch.compiler.is_compiling()
    check_tensor("input_ids", input_ids, 2)
    check_tensor("embedding_weight", embedding_weight, 2)
    check_tensor("proj_weight", proj_weight, 2)
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    device = input_ids.device
    B, S = input_ids.shape
    V, H = embedding_weight.shape
    dtype = embedding_weight.dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"embedding_weight must be float32, float16, bfloat16 or float64, got {dtype}")
    if tuple(proj_weight.shape) != (H, 4):
        raise ValueError(f"proj_weight must be [H={H}, 4] (nn.Linear(4, H).weight), got {tuple(proj_weight.shape)}")
    if not proj_weight.dtype.is_floating_point:
        raise ValueError(f"proj_weight must be a float tensor, got {proj_weight.dtype}")
    if proj_bias is not None:
        check_tensor("proj_bias", proj_bias, 1)
        if proj_bias.shape[0] != H or not proj_bias.dtype.is_floating_point:
            raise ValueError(f"proj_bias must be a float [H={H}], got {proj_bias.dtype} {tuple(proj_bias.shape)}")
    if isinstance(box_token_id, bool) or not isinstance(box_token_id, int):
        raise ValueError(f"box_token_id must be an int, got {box_token_id!r}")
    image_ids = as_id_tuple(image_token_id)
    if box_token_id in image_ids:
        raise ValueError(f"box_token_id {box_token_id} is also an image_token_id {list(image_ids)}")
    if PAD_TOKEN_ID in image_ids or box_token_id == PAD_TOKEN_ID:
        raise ValueError(f"{PAD_TOKEN_ID} is the padding id; it cannot be a placeholder id")
    has_boxes = boxes is not None
    if has_boxes:
        check_tensor("boxes", boxes, 3)
        if boxes.shape[0] != B or boxes.shape[2] != 4:
            raise ValueError(f"boxes must be [B={B}, N, 4], got {tuple(boxes.shape)}")
        if not boxes.dtype.is_floating_point:
            raise ValueError(f"boxes must be a float tensor, got {boxes.dtype}")
    if page_sizes is not None:
        if not has_boxes:
            raise ValueError("page_sizes given without boxes")
        check_tensor("page_sizes", page_sizes, 2)
        if tuple(page_sizes.shape) != (B, 2):
            raise ValueError(f"page_sizes must be [B={B}, 2] (w, h), got {tuple(page_sizes.shape)}")
        if page_sizes.dtype == torch.bool or page_sizes.dtype.is_complex:
            raise ValueError(f"page_sizes must be a real tensor, got {page_sizes.dtype}")
    n_boxes = boxes.shape[1] if has_boxes else 0
    if image_features is not None:
        check_tensor("image_features", image_features, 3)
        if image_features.shape[0] != B or image_features.shape[2] != H:
            raise ValueError(f"image_features must be [B={B}, n_image, H={H}], got {tuple(image_features.shape)}")
        if not image_features.dtype.is_floating_point:
            raise ValueError(f"image_features must be a float tensor, got {image_features.dtype}")
    n_image = image_features.shape[1] if image_features is not None else 0
    if image_span_unit is not None and (isinstance(image_span_unit, bool) or not isinstance(image_span_unit, int)
                                        or image_span_unit < 1):
        raise ValueError(f"image_span_unit must be a positive int, got {image_span_unit!r}")
    if padding_idx is not None and not -V <= int(padding_idx) < V:
        raise ValueError(f"padding_idx must be in [-{V}, {V}), got {padding_idx}")
    padding_idx = None if padding_idx is None else int(padding_idx) % V
    named = [("embedding_weight", embedding_weight), ("proj_weight", proj_weight), ("proj_bias", proj_bias),
             ("boxes", boxes), ("page_sizes", page_sizes), ("image_features", image_features)]
    for name, tensor in named:
        if tensor is not None:
            check_device(name, tensor, device, "input_ids")

    box_limit = _per_sequence_limit("num_boxes", num_boxes, B, n_boxes, device)
    image_limit = _per_sequence_limit("num_image_tokens", num_image_tokens, B, n_image, device)
    if validate and ((box_limit < 0) | (box_limit > n_boxes)).any():
        raise ValueError(f"num_boxes must be in [0, {n_boxes}] (boxes.shape[1]), got {box_limit.tolist()}")
    if validate and ((image_limit < 0) | (image_limit > n_image)).any():
        raise ValueError(f"num_image_tokens must be in [0, {n_image}], got {image_limit.tolist()}")
    box_slots = boxes if has_boxes and n_boxes > 0 else torch.zeros((B, 1, 4), device=device, dtype=proj_weight.dtype)
    index = build_token_index(input_ids, V, box_token_id, image_ids, box_limit, box_slots.shape[1], image_limit,
                              max(n_image, 1))
    if validate:
        _validate_values(
            input_ids, index, V, box_token_id, image_ids, box_slots.detach(),
            None if page_sizes is None else page_sizes.detach(), box_limit, image_limit, strict_boxes,
            image_span_unit, has_boxes, image_features is not None,
        )
    feats = image_features if image_features is not None and n_image > 0 else None
    return SLPProblem(B=B, S=S, V=V, H=H, n_image=n_image, box_slots=box_slots, image_features=feats, index=index,
                      padding_idx=-1 if padding_idx is None else padding_idx)


def check_backend(backend: str, table: torch.Tensor) -> None:
    """The dtype / device limits of the chosen backend."""
    dtype, device = table.dtype, table.device
    if backend == "triton" and dtype not in KERNEL_DTYPES:
        raise ValueError(f"the triton backend supports float32, float16 and bfloat16 tables, got {dtype}")
    if backend == "native" and device.type == "cuda":
        if not _has_cuda_kernel():
            raise ValueError("backend='native' on CUDA tensors needs the extension built with CUDA (nvcc and a CUDA "
                             "build of torch at build time); this one has CPU kernels only")
        if dtype not in KERNEL_DTYPES:
            raise ValueError(f"the native CUDA kernel supports float32, float16 and bfloat16 tables, got {dtype}")


def _has_cuda_kernel() -> bool:
    from .native_impl import has_cuda_kernel  # noqa: PLC0415 (loaded only with the native backend)

    return has_cuda_kernel()
