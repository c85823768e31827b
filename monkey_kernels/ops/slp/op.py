r"""Fused ``inputs_embeds`` assembly with LayTextLLM's Spatial Layout Projector: op, autograd, module.

``slp_embed`` builds ``inputs_embeds [B, S, H]`` out of place, each row written once:

- text token ``t`` with id ``v``: ``table[v]``;
- the ``k``-th box placeholder of sequence ``b``: ``W c + b_slp`` with ``c = boxes[b, k] / (w, h, w, h)``
  (``page_sizes[b] = (w, h)``; ``page_sizes=None`` means the boxes are already normalized);
- the ``j``-th image placeholder of sequence ``b``: ``image_features[b, j]``;
- padding id ``-1`` (what the public LayTextLLM collate function pads ``input_ids`` with): a **zero row**,
  with no gradient to anything. A zero row, not the pad embedding: ``-1`` has no table row, and a zero
  row is what the attention mask makes irrelevant anyway.

Per-token kind and source index come from cumsums over the placeholder masks (``build_token_index``): no
host synchronisation. The checks that need values (placeholder counts, box validity, id range) read one
small summary back to the host; ``validate=False`` skips them for CUDA-graph capture, and then anything
that would have been an error (surplus placeholders, out-of-range ids) produces a zero row instead of
reading out of bounds.

Backends (``monkey_kernels.backends.resolve_backend``): ``triton`` runs one kernel
(``triton_kernels.slp``) over (token rows, hidden blocks); ``native`` runs the C++ ops
``torch.ops.monkey_kernels_native.slp_embed_forward`` / ``slp_embed_backward`` (``csrc/slp_cpu.cpp``: CPU,
forward and backward; ``csrc/cuda/``: a CUDA forward kernel in CUDA builds); ``torch`` is vectorized PyTorch
(gathers and a ``where`` over kinds; no loop over sequences or boxes). The backward of ``triton`` and
``torch`` (and of ``native`` on CUDA) is shared PyTorch (see :class:`SLPEmbedFunction`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import _native
from ._checks import accumulation_dtype, check_device, check_tensor
from .backends import resolve_backend
from .models.slp import PAD_TOKEN_ID, SLPEmbeddingRef, SpatialLayoutProjector

__all__ = [
    "slp_embed",
    "SLPEmbedFunction",
    "FusedSLPEmbedding",
    "build_token_index",
    "TokenIndex",
    "KIND_ZERO",
    "KIND_TEXT",
    "KIND_BOX",
    "KIND_IMAGE",
]

# Same values as triton_kernels.slp (kept here so the torch path does not import Triton).
KIND_ZERO, KIND_TEXT, KIND_BOX, KIND_IMAGE = 0, 1, 2, 3
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DTYPES = _KERNEL_DTYPES + (torch.float64,)


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


def _as_id_tuple(image_token_id) -> Tuple[int, ...]:
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


# ---------------------------------------------------------------------------------------------------------
# Forward primitives
# ---------------------------------------------------------------------------------------------------------
def _normalized_boxes(boxes: torch.Tensor, page_sizes: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``boxes / (w, h, w, h)`` (or ``boxes`` when ``page_sizes`` is None) in ``dtype``."""
    c = boxes.to(dtype)
    if page_sizes is not None:
        size = page_sizes.to(dtype)
        c = c / torch.cat([size, size], dim=-1).unsqueeze(1)
    return c


def _source_rows(kind: torch.Tensor, src: torch.Tensor, wanted: int, num_slots: int) -> torch.Tensor:
    """int64 ``[num_slots]``: for each box slot (or feature row), the token row that uses it, or ``T`` if none.

    Each slot is used by at most one token, so the scatter is deterministic; tokens of other kinds all
    land on the extra slot ``num_slots``, which is dropped. No host synchronisation.
    """
    T = kind.shape[0]
    pos = torch.full((num_slots + 1,), T, dtype=torch.int64, device=kind.device)
    slot = torch.where(kind == wanted, src, num_slots)
    pos.scatter_(0, slot, torch.arange(T, dtype=torch.int64, device=kind.device))
    return pos[:num_slots]


def _gather_rows(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``x[pos]`` with zero rows where ``pos == len(x)`` (no token used that slot)."""
    n = x.shape[0]
    if n == 0:
        return x.new_zeros((pos.shape[0], x.shape[1]))
    rows = x.index_select(0, pos.clamp(max=n - 1))  # [slots, H]: no copy of the whole of x
    return torch.where((pos < n)[:, None], rows, torch.zeros((), dtype=x.dtype, device=x.device))


def _torch_forward(kind, src, table, boxes, page_sizes, weight, bias, image_features) -> torch.Tensor:
    """Vectorized PyTorch version of ``triton_kernels.slp.slp_embed_forward`` (same arguments).

    One gather of table rows for all tokens, zeroed where not text, then the box / image rows are written
    by slot (``O(N H)``, not ``O(T H)``) into a buffer with one spare row ``T`` that absorbs unused slots.
    """
    T, H = kind.shape[0], table.shape[1]
    is_text = kind == KIND_TEXT
    text_idx = torch.cat([torch.where(is_text, src, 0), src.new_zeros(1)])
    out = table.index_select(0, text_idx)  # [T + 1, H]
    out = torch.where(torch.cat([is_text, is_text.new_zeros(1)])[:, None], out,
                      torch.zeros((), dtype=table.dtype, device=table.device))
    B, N, _ = boxes.shape
    acc = accumulation_dtype(table.dtype)  # fp32 (fp64 for a float64 table), one rounding to the table's dtype
    z = torch.nn.functional.linear(_normalized_boxes(boxes, page_sizes, acc).reshape(B * N, 4), weight.to(acc),
                                   None if bias is None else bias.to(acc))
    out.index_copy_(0, _source_rows(kind, src, KIND_BOX, B * N), z.to(table.dtype))
    if image_features is not None:
        Bi, n_image, _ = image_features.shape
        rows = image_features.reshape(Bi * n_image, H).to(table.dtype)
        out.index_copy_(0, _source_rows(kind, src, KIND_IMAGE, Bi * n_image), rows)
    return out[:T]


def _native_has_cuda_kernel() -> bool:
    """Whether the loaded extension registered the CUDA kernel of ``slp_embed_forward`` (CUDA builds)."""
    _native.ops()
    return torch._C._dispatch_has_kernel_for_dispatch_key("monkey_kernels_native::slp_embed_forward", "CUDA")


class SLPEmbedFunction(torch.autograd.Function):
    r"""Autograd function of :func:`slp_embed` on flattened tokens (validated inputs, built index).

    Forward: ``Y[t]`` as in :mod:`triton_kernels.slp`. Backward, with ``dY [T, H]``:

    .. math::
        d\mathrm{table}[v] = \sum_{t:\,\mathrm{text},\ \mathrm{id}_t = v} dY_t \quad (\text{row } v =
        \text{padding\_idx excluded, as in } \texttt{nn.Embedding}),

        g_s = dY_{p(s)} \text{ for the token } p(s) \text{ that used box slot } s \;(0 \text{ if none}),\quad
        dW = \sum_s g_s c_s^\top,\quad db = \sum_s g_s,\quad dc_s = W^\top g_s,

        d\mathrm{boxes}_s = dc_s \oslash (w, h, w, h)_b,\quad
        dw_b = -\sum_{k} \frac{dc_{s,0}\, x_1 + dc_{s,2}\, x_2}{w_b^2},\quad
        dh_b = -\sum_{k} \frac{dc_{s,1}\, y_1 + dc_{s,3}\, y_2}{h_b^2},

        d\mathrm{features}[b, j] = dY_{p(b, j)} \;(0 \text{ for rows no placeholder used}).

    The table gradient is ATen's ``embedding_dense_backward`` (the kernel ``nn.Embedding`` uses) on ``dY``
    with non-text rows zeroed: the same numerics and determinism as the reference's ``nn.Embedding`` (on
    CUDA a sort-based segment reduction), where a Triton kernel would need float atomics (run-to-run
    non-deterministic, and contended in bf16 on hot rows such as frequent tokens). The box and
    image gradients gather only the placeholder rows of ``dY`` (``O((N + n_image) H)``), then a ``[n, H] x
    [H, 4]`` product in fp32 (float64 for a float64 table, as the forward projection); the triton and torch
    backends share this backward.

    The ``native`` backend on CPU computes the same six gradients in one C++ op (``slp_embed_backward``):
    the table gradient by a counting sort of the text tokens (each table row the ordered sum of its tokens'
    rows, fp32 accumulation (float64 for a float64 table), deterministic), the box / projection reductions in
    float64.
    """

    @staticmethod
    def forward(ctx, table, weight, bias, boxes, page_sizes, image_features, kind, src, padding_idx, backend):
        if backend == "triton":
            from triton_kernels.slp import slp_embed_forward  # noqa: PLC0415 (Triton optional for torch)

            out = slp_embed_forward(kind, src, table, boxes, page_sizes, weight, bias, image_features)
        elif backend == "native":
            from triton_kernels import alloc  # noqa: PLC0415 (NaN-poisoned under the tests, like Triton's)

            out = alloc.empty((kind.shape[0], table.shape[1]), device=table.device, dtype=table.dtype)
            _native.ops().slp_embed_forward.out(kind, src, table, boxes, page_sizes, weight, bias, image_features,
                                                out=out)
        else:
            out = _torch_forward(kind, src, table, boxes, page_sizes, weight, bias, image_features)
        ctx.save_for_backward(kind, src, boxes, page_sizes, weight)
        ctx.backend = backend
        ctx.num_embeddings = table.shape[0]
        ctx.padding_idx = -1 if padding_idx is None else int(padding_idx)
        ctx.image_shape = None if image_features is None else tuple(image_features.shape)
        ctx.image_dtype = None if image_features is None else image_features.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        kind, src, boxes, page_sizes, weight = ctx.saved_tensors
        need_table, need_w, need_bias, need_boxes, need_sizes, need_image = ctx.needs_input_grad[:6]
        dy = grad_out.contiguous()
        T, H = dy.shape
        grad_table = grad_w = grad_bias = grad_boxes = grad_sizes = grad_image = None

        if ctx.backend == "native" and dy.device.type == "cpu":
            # One C++ op for all six gradients (csrc/slp_cpu.cpp): the same math, deterministic, the table
            # gradient by a counting sort of the text tokens instead of embedding_dense_backward.
            n_image = 0 if ctx.image_shape is None else ctx.image_shape[1]
            grad_table, grad_w, grad_bias, grad_boxes, grad_sizes, grad_image = _native.ops().slp_embed_backward(
                dy, kind, src, boxes, page_sizes, weight, ctx.num_embeddings, ctx.padding_idx, n_image,
                [need_table, need_w, need_bias, need_boxes, need_sizes, need_image],
            )
            if grad_image is not None:
                grad_image = grad_image.view(ctx.image_shape).to(ctx.image_dtype)
            return grad_table, grad_w, grad_bias, grad_boxes, grad_sizes, grad_image, None, None, None, None

        # torch and triton backends, and native on CUDA tensors (the CUDA kernel is forward only).
        if need_table:
            is_text = kind == KIND_TEXT
            grad_table = torch.ops.aten.embedding_dense_backward(
                torch.where(is_text[:, None], dy, torch.zeros((), dtype=dy.dtype, device=dy.device)),
                torch.where(is_text, src, 0), ctx.num_embeddings, ctx.padding_idx, False,
            )

        if need_w or need_bias or need_boxes or need_sizes:
            B, N, _ = boxes.shape
            acc = accumulation_dtype(dy.dtype)  # dY has the table's (output's) dtype: as in the forward
            g = _gather_rows(dy, _source_rows(kind, src, KIND_BOX, B * N)).to(acc)  # [B*N, H]
            c = _normalized_boxes(boxes, page_sizes, acc).reshape(B * N, 4)
            if need_w:
                grad_w = (g.t() @ c).to(weight.dtype)
            if need_bias:
                grad_bias = g.sum(dim=0).to(weight.dtype)
            if need_boxes or need_sizes:
                dc = (g @ weight.to(acc)).view(B, N, 4)
                if page_sizes is None:
                    if need_boxes:
                        grad_boxes = dc.to(boxes.dtype)
                else:
                    size = page_sizes.to(acc)
                    whwh = torch.cat([size, size], dim=-1).unsqueeze(1)  # [B, 1, 4]
                    if need_boxes:
                        grad_boxes = (dc / whwh).to(boxes.dtype)
                    if need_sizes:
                        per_coord = -(dc * boxes.to(acc) / whwh.square()).sum(dim=1)  # [B, 4]
                        grad_sizes = (per_coord[:, 0:2] + per_coord[:, 2:4]).to(page_sizes.dtype)

        if need_image:
            B, n_image, _ = ctx.image_shape
            rows = _gather_rows(dy, _source_rows(kind, src, KIND_IMAGE, B * n_image))
            grad_image = rows.view(B, n_image, H).to(ctx.image_dtype)

        return grad_table, grad_w, grad_bias, grad_boxes, grad_sizes, grad_image, None, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------
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


def slp_embed(
    input_ids: torch.Tensor,
    embedding_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: Optional[torch.Tensor],
    boxes: Optional[torch.Tensor] = None,
    *,
    box_token_id: int = 0,
    page_sizes: Optional[torch.Tensor] = None,
    num_boxes=None,
    image_features: Optional[torch.Tensor] = None,
    image_token_id: Union[int, Sequence[int], None] = None,
    num_image_tokens=None,
    image_span_unit: Optional[int] = None,
    strict_boxes: bool = False,
    padding_idx: Optional[int] = None,
    validate: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``inputs_embeds [B, S, H]`` from ids, the token table, SLP boxes and image features in one pass.

    Args:
        input_ids: ``[B, S]`` integer ids. ``-1`` is padding: a zero row without gradient.
        embedding_weight: the token table ``[V, H]`` (float32/16, bfloat16; float64 on the torch and native
            CPU backends);
            its dtype is the output dtype.
        proj_weight: the SLP ``nn.Linear(4, H).weight``, ``[H, 4]``; proj_bias ``[H]`` or ``None``.
        boxes: ``[B, N, 4]`` ``(x1, y1, x2, y2)``, padded per sequence (zeros, as the public collate does),
            or ``None`` when no sequence has box placeholders.
        box_token_id: the box placeholder id (LayTextLLM: 0, ``<unk>``); the ``k``-th in a sequence takes
            box ``k`` of that sequence.
        page_sizes: ``[B, 2]`` ``(w, h)``: the boxes are pixel corners, normalized in the kernel. ``None``:
            the boxes are already normalized to ``[0, 1]``.
        num_boxes: ``[B]`` valid (non-padding) boxes per sequence; ``None``: all ``N``.
        image_features: ``[B, n_image, H]`` or ``None``; the ``j``-th image placeholder of a sequence takes
            row ``j`` of that sequence's features.
        image_token_id: the image placeholder id(s) (an int or a few ints).
        num_image_tokens: ``[B]`` valid feature rows per sequence; ``None``: all ``n_image``.
        image_span_unit: when set (Monkey: 256), every contiguous run of image placeholders must be a
            multiple of it (``(tiles + 1) * 256`` per image).
        strict_boxes: also reject sequences with fewer placeholders than boxes (more is always an error).
        padding_idx: the table row that gets no gradient (``nn.Embedding.padding_idx``), or ``None``.
        validate: check values (ids in range, placeholder counts vs boxes / feature rows, span lengths,
            finite boxes with ``x2 >= x1``, ``y2 >= y1``, positive page sizes). This reads a small summary
            back to the host; pass ``False`` under CUDA-graph capture. Without it, placeholders beyond the
            valid boxes / feature rows and out-of-range ids give zero rows (never out-of-bounds reads).
        backend: ``"triton"``, ``"native"`` (CPU; CUDA when the extension was built with CUDA), ``"torch"``
            or ``None``/``"auto"``.
    Returns:
        ``[B, S, H]`` in the table's dtype. Gradients flow to the table, ``proj_weight``, ``proj_bias``,
        ``boxes``, float ``page_sizes`` and ``image_features``, whichever require grad.
    Raises:
        ValueError: naming the argument (shapes, dtypes, devices) or the sequence (values, when validating).
    """
    check_tensor("input_ids", input_ids, 2)
    check_tensor("embedding_weight", embedding_weight, 2)
    check_tensor("proj_weight", proj_weight, 2)
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    device = input_ids.device
    B, S = input_ids.shape
    V, H = embedding_weight.shape
    dtype = embedding_weight.dtype
    if dtype not in _FLOAT_DTYPES:
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
    image_ids = _as_id_tuple(image_token_id)
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

    backend = resolve_backend(backend, device, native_device_types=("cpu", "cuda"))
    if backend == "triton" and dtype not in _KERNEL_DTYPES:
        raise ValueError(f"the triton backend supports float32, float16 and bfloat16 tables, got {dtype}")
    if backend == "native" and device.type == "cuda":
        if not _native_has_cuda_kernel():
            raise ValueError("backend='native' on CUDA tensors needs the extension built with CUDA (nvcc and a CUDA "
                             "build of torch at build time); this one has CPU kernels only")
        if dtype not in _KERNEL_DTYPES:
            raise ValueError(f"the native CUDA kernel supports float32, float16 and bfloat16 tables, got {dtype}")

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
    out = SLPEmbedFunction.apply(
        embedding_weight, proj_weight, proj_bias, box_slots, page_sizes, feats, index.kind, index.src,
        padding_idx, backend,
    )
    return out.view(B, S, H)


# ---------------------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------------------
class FusedSLPEmbedding(nn.Module):
    """Drop-in for :class:`monkey_kernels.models.slp.SLPEmbeddingRef`: same submodules, same state dict.

    Holds ``embed_tokens`` (the model's ``nn.Embedding``, shared, not copied) and ``projector`` (a
    :class:`SpatialLayoutProjector`; its ``proj`` Linear is the SLP), so the keys are ``embed_tokens.weight``,
    ``projector.proj.weight`` and ``projector.proj.bias``. ``forward(input_ids [B, S], boxes=None [B, N, 4],
    page_sizes=None [B, 2], image_features=None [B, n_image, H], num_boxes=None [B],
    num_image_tokens=None [B])`` returns ``[B, S, H]`` through :func:`slp_embed`.
    """

    def __init__(
        self,
        embed_tokens: nn.Embedding,
        projector: SpatialLayoutProjector,
        box_token_id: int = 0,
        image_token_id: Union[int, Sequence[int], None] = None,
        *,
        image_span_unit: Optional[int] = None,
        strict_boxes: bool = False,
        validate: bool = True,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        if not isinstance(embed_tokens, nn.Embedding):
            raise ValueError(f"embed_tokens must be an nn.Embedding, got {type(embed_tokens).__name__}")
        proj = getattr(projector, "proj", None)
        if not isinstance(proj, nn.Linear) or proj.in_features != 4 or proj.out_features != embed_tokens.embedding_dim:
            raise ValueError(
                f"projector must hold proj = nn.Linear(4, {embed_tokens.embedding_dim}) (a SpatialLayoutProjector), "
                f"got {type(projector).__name__} with proj={proj!r}"
            )
        self.embed_tokens = embed_tokens
        self.projector = projector
        self.box_token_id = int(box_token_id)
        self.image_token_id = _as_id_tuple(image_token_id)
        self.image_span_unit = image_span_unit
        self.strict_boxes = bool(strict_boxes)
        self.validate = bool(validate)
        self.backend = backend

    @classmethod
    def from_reference(
        cls,
        embedding: Union[nn.Embedding, SLPEmbeddingRef],
        projector: Optional[SpatialLayoutProjector] = None,
        box_token_id: Optional[int] = None,
        image_token_id: Union[int, Sequence[int], None] = None,
        **kwargs,
    ) -> "FusedSLPEmbedding":
        """From an ``SLPEmbeddingRef`` or from the reference ``(embedding, projector)`` pair (shared modules)."""
        if isinstance(embedding, SLPEmbeddingRef):
            ref = embedding
            return cls(
                ref.embed_tokens, ref.projector,
                ref.box_token_id if box_token_id is None else box_token_id,
                ref.image_token_id if image_token_id is None else image_token_id, **kwargs,
            )
        if projector is None:
            raise ValueError("projector is required when embedding is an nn.Embedding")
        return cls(embedding, projector, 0 if box_token_id is None else box_token_id, image_token_id, **kwargs)

    def to_reference(self) -> SLPEmbeddingRef:
        """The reference module over the same (shared) embedding and projector."""
        return SLPEmbeddingRef(self.embed_tokens, self.projector, self.box_token_id, self.image_token_id)

    def forward(self, input_ids, boxes=None, page_sizes=None, image_features=None, num_boxes=None,
                num_image_tokens=None):
        proj = self.projector.proj
        return slp_embed(
            input_ids, self.embed_tokens.weight, proj.weight, proj.bias, boxes,
            box_token_id=self.box_token_id, page_sizes=page_sizes, num_boxes=num_boxes,
            image_features=image_features, image_token_id=self.image_token_id,
            num_image_tokens=num_image_tokens, image_span_unit=self.image_span_unit,
            strict_boxes=self.strict_boxes, padding_idx=self.embed_tokens.padding_idx,
            validate=self.validate, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"box_token_id={self.box_token_id}, image_token_id={list(self.image_token_id)}, "
                f"validate={self.validate}, backend={self.backend}")
