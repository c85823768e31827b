"""Fused Monkey vision blocks and the batched encoder forward.

A fused block runs ``[batch, seq, dim]`` activations (batch-first, so every view is a contiguous run of rows,
i.e. one segment) through three ``multi_lora_linear`` calls per block, each with the adapter of its view:

- ``attn.in_proj`` + ``attn.in_proj_lora`` (LoRA on the ``ln_1`` output),
- ``attn.out_proj`` + ``attn.out_proj_lora`` (LoRA on the attention context),
- ``mlp.c_proj`` + ``mlp_lora``: LoRA on the pre-``ln_2`` residual stream (``lora_input=``) and the residual
  add in the same op (``residual=``).

Parameter ownership (why the per-adapter modules stay the source of truth): the fused modules hold the very
same ``nn.Linear`` / adapter / ``LayerNorm`` submodule objects as the reference block, under the same names.
The stacked ``A [n, r, K]``, ``B [n, N, r]``, ``scale [n]`` are rebuilt with ``torch.stack`` on every forward:
``torch.stack`` is differentiable, so gradients land on the original per-adapter Parameters, state-dict keys are
identical to the release's, an optimizer built before patching keeps optimising the same Parameter objects,
and unpatching needs no copy. The cost is two small copies per linear and forward (``n * r * (K + N)``
elements, about 0.5 MB per layer for the release in bf16), negligible next to the GEMMs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from monkey_kernels.ops.segments import SegmentInfo

from .ops.multi_lora import multi_lora_linear

__all__ = [
    "StackedAdapters",
    "FusedMonkeyAttention",
    "FusedMonkeyBlock",
    "fused_transformer_forward",
    "batched_model_forward",
    "batched_views_forward",
    "run_blocks",
    "used_adapters",
    "adapter_ids_for",
    "InstanceForward",
]


class InstanceForward:
    """A ``forward`` installed on one module instance: ``function(module, *args, **kwargs)``.

    Used instead of ``types.MethodType`` so a patched model still pickles (``torch.save(model)``) and
    deep-copies: a bound method of a foreign function pickles as ``getattr(module, function.__name__)``,
    which does not exist on the module."""

    def __init__(self, function, module: nn.Module) -> None:
        self.function = function
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.function(self.module, *args, **kwargs)


class StackedAdapters:
    """Reads a ``ModuleList`` of release-style adapters (``lora_a``, ``lora_b``, ``lora_scale``,
    ``lora_dropout``) as the stacked tensors of ``multi_lora_linear``. Holds no parameters."""

    @staticmethod
    def check(adapters: nn.ModuleList, in_features: int, out_features: int, where: str) -> float:
        """Validates the list for fusion; returns the shared dropout probability."""
        if len(adapters) == 0:
            raise ValueError(f"{where}: the adapter list is empty")
        ranks = {ad.lora_a.weight.shape[0] for ad in adapters}
        if len(ranks) != 1:
            raise ValueError(f"{where}: adapters of one list must share a rank to be stacked, got {sorted(ranks)}")
        for ad in adapters:
            if tuple(ad.lora_a.weight.shape[1:]) != (in_features,) or ad.lora_b.weight.shape[0] != out_features:
                raise ValueError(
                    f"{where}: adapter shapes lora_a {tuple(ad.lora_a.weight.shape)}, lora_b "
                    f"{tuple(ad.lora_b.weight.shape)} do not fit a {in_features} -> {out_features} layer"
                )
            if ad.lora_scale.numel() != 1:
                raise ValueError(f"{where}: lora_scale must hold one value, got shape {tuple(ad.lora_scale.shape)}")
        probs = {float(getattr(ad.lora_dropout, "p", 0.0)) for ad in adapters}
        if len(probs) != 1:
            raise ValueError(f"{where}: adapters of one list must share a dropout probability, got {sorted(probs)}")
        return probs.pop()

    @staticmethod
    def stack(adapters: nn.ModuleList, used: Optional[Sequence[int]] = None):
        """``(A [n, r, K], B [n, N, r], scale [n])``, differentiable towards the per-adapter Parameters.

        ``used``: the adapters (indices into the list) that rows of the batch use, stacked in that order (the
        segments' ids then index into ``used``); ``None``: all. Stacking only the used ones keeps the reference's
        training semantics: an adapter no row used gets no gradient (``.grad`` stays ``None``), so weight decay
        and momentum do not move it."""
        chosen = adapters if used is None else [adapters[i] for i in used]
        if not chosen:  # no row uses an adapter: empty stacks, the op runs the base GEMM alone
            first = adapters[0]
            return (first.lora_a.weight.new_empty((0, *first.lora_a.weight.shape)),
                    first.lora_b.weight.new_empty((0, *first.lora_b.weight.shape)), first.lora_scale.new_empty(0))
        lora_a = torch.stack([ad.lora_a.weight for ad in chosen])
        lora_b = torch.stack([ad.lora_b.weight for ad in chosen])
        scale = torch.cat([ad.lora_scale.reshape(1) for ad in chosen])
        return lora_a, lora_b, scale


class FusedMonkeyAttention(nn.Module):
    """Self-attention of a Monkey block on batch-first ``[B, S, dim]`` rows with per-view adapters.

    Children (same objects as the reference attention's): ``in_proj``, ``in_proj_lora``, ``out_proj``,
    ``out_proj_lora``. The qkv columns keep the release's per-head ``[q_h | k_h | v_h]`` grouping; attention
    is ``scaled_dot_product_attention`` with the release's ``1/sqrt(head_dim)`` scale."""

    def __init__(self, attn: nn.Module, num_heads: int, backend: Optional[str] = None) -> None:
        super().__init__()
        self.in_proj = attn.in_proj
        self.in_proj_lora = attn.in_proj_lora
        self.out_proj = attn.out_proj
        self.out_proj_lora = attn.out_proj_lora
        self.embed_dim = attn.in_proj.in_features
        self.num_heads = num_heads
        self.head_dim = self.embed_dim // num_heads
        self.backend = backend
        self.in_dropout = StackedAdapters.check(self.in_proj_lora, self.embed_dim, 3 * self.embed_dim,
                                                "attn.in_proj_lora")
        self.out_dropout = StackedAdapters.check(self.out_proj_lora, self.embed_dim, self.embed_dim,
                                                 "attn.out_proj_lora")

    def forward(self, x: torch.Tensor, segments: SegmentInfo, attn_mask: Optional[torch.Tensor] = None,
                seeds: Sequence[Optional[torch.Tensor]] = (None, None),
                used: Optional[Sequence[int]] = None) -> torch.Tensor:
        """``x [B, S, dim]`` (the ``ln_1`` output) -> ``[B, S, dim]``; ``segments`` cover ``B * S`` rows, their ids
        index ``used`` (see :meth:`StackedAdapters.stack`)."""
        b, s, d = x.shape
        heads, hd = self.num_heads, self.head_dim
        a, bb, sc = StackedAdapters.stack(self.in_proj_lora, used)
        qkv = multi_lora_linear(
            x, self.in_proj.weight, self.in_proj.bias, a, bb, sc, segments,
            dropout_p=self.in_dropout if self.training else 0.0, seed=seeds[0], backend=self.backend,
        )
        q, k, v = qkv.view(b, s, heads, 3 * hd).transpose(1, 2).split(hd, dim=-1)  # [B, H, S, hd] each
        mask = attn_mask.to(q.dtype) if attn_mask is not None else None
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        context = context.transpose(1, 2).reshape(b, s, d)
        a, bb, sc = StackedAdapters.stack(self.out_proj_lora, used)
        return multi_lora_linear(
            context, self.out_proj.weight, self.out_proj.bias, a, bb, sc, segments,
            dropout_p=self.out_dropout if self.training else 0.0, seed=seeds[1], backend=self.backend,
        )


def _mlp_parts(mlp: nn.Module):
    """``(c_fc, [activation modules], c_proj)`` of a release-style ``mlp`` Sequential."""
    names = [name for name, _ in mlp.named_children()]
    if "c_fc" not in names or "c_proj" not in names or names.index("c_fc") > names.index("c_proj"):
        raise ValueError(f"mlp must hold c_fc then c_proj, got children {names}")
    start, stop = names.index("c_fc"), names.index("c_proj")
    children = list(mlp.children())
    if stop != len(children) - 1 or start != 0:
        raise ValueError(f"mlp must start with c_fc and end with c_proj, got children {names}")
    return children[0], children[start + 1:stop], children[stop]


class FusedMonkeyBlock(GradientCheckpointingLayer):
    """A Monkey block on batch-first ``[B, S, dim]`` rows, one adapter per view (segment)::

        x = x + out_proj*(attn(in_proj*(ln_1(x))));   x = c_proj*(gelu(c_fc(ln_2(x))), lora_input=x, residual=x)

    where ``*`` marks a ``multi_lora_linear`` with the view's adapter (id ``-1``: base weights only).
    Children ``ln_1``, ``ln_2``, ``mlp``, ``mlp_lora`` are the reference block's own modules and ``attn`` wraps
    its attention's, so ``state_dict`` keys and Parameter objects are those of the reference block."""

    def __init__(self, block: nn.Module, num_heads: int, backend: Optional[str] = None) -> None:
        super().__init__()
        self.ln_1 = block.ln_1
        self.ln_2 = block.ln_2
        self.attn = FusedMonkeyAttention(block.attn, num_heads, backend)
        self.mlp = block.mlp
        self.mlp_lora = block.mlp_lora
        self.backend = backend
        c_fc, _, c_proj = _mlp_parts(block.mlp)
        width = self.attn.embed_dim
        if c_fc.in_features != width or c_proj.out_features != width:
            raise ValueError(f"mlp must map {width} -> {width}, got {c_fc.in_features} -> {c_proj.out_features}")
        self.mlp_dropout = StackedAdapters.check(self.mlp_lora, width, width, "mlp_lora")
        # Carried over so a model checkpointed before patching stays checkpointed.
        self.gradient_checkpointing = bool(getattr(block, "gradient_checkpointing", False))
        if hasattr(block, "_gradient_checkpointing_func"):
            self._gradient_checkpointing_func = block._gradient_checkpointing_func
        self.__dict__["_reference_block"] = block  # kept out of the module tree: its children are ours

    def forward(self, x: torch.Tensor, segments: SegmentInfo, attn_mask: Optional[torch.Tensor] = None,
                seeds: Sequence[Optional[torch.Tensor]] = (None, None, None),
                used: Optional[Sequence[int]] = None) -> torch.Tensor:
        """``x [B, S, dim]`` -> ``[B, S, dim]``; ``seeds``: dropout seeds of in_proj, out_proj, mlp LoRA; ``used``:
        the adapters the segments' ids index (see :meth:`StackedAdapters.stack`; ``None``: all)."""
        x = x + self.attn(self.ln_1(x), segments, attn_mask=attn_mask, seeds=seeds[:2], used=used)
        c_fc, acts, c_proj = _mlp_parts(self.mlp)
        hidden = c_fc(self.ln_2(x))
        for act in acts:
            hidden = act(hidden)
        a, b, sc = StackedAdapters.stack(self.mlp_lora, used)
        return multi_lora_linear(
            hidden, c_proj.weight, c_proj.bias, a, b, sc, segments, lora_input=x, residual=x,
            dropout_p=self.mlp_dropout if self.training else 0.0, seed=seeds[2], backend=self.backend,
        )

    def to_reference(self) -> nn.Module:
        """The reference block, holding this block's current submodules (and its train / checkpoint flags)."""
        block = self.__dict__["_reference_block"]
        block.ln_1, block.ln_2, block.mlp, block.mlp_lora = self.ln_1, self.ln_2, self.mlp, self.mlp_lora
        for name in ("in_proj", "in_proj_lora", "out_proj", "out_proj_lora"):
            setattr(block.attn, name, getattr(self.attn, name))
        if hasattr(block, "gradient_checkpointing"):
            block.gradient_checkpointing = self.gradient_checkpointing
            if hasattr(self, "_gradient_checkpointing_func"):
                block._gradient_checkpointing_func = self._gradient_checkpointing_func
        block.train(self.training)
        return block


def adapter_ids_for(idx, batch: int, device: torch.device) -> torch.Tensor:
    """Adapter id per batch row (int64 ``[batch]``) from the release's ``idx`` (``None``: -1 for every row; an
    int: that adapter for every row) or from one id per row (sequence or tensor, ``-1`` = no adapter)."""
    if idx is None:
        return torch.full((batch,), -1, dtype=torch.int64, device=device)
    if isinstance(idx, int) and not isinstance(idx, bool):
        return torch.full((batch,), idx, dtype=torch.int64, device=device)
    ids = torch.as_tensor(idx, device=device)
    if ids.dim() != 1 or ids.numel() != batch or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"idx must be None, an int or {batch} integer adapter ids (one per batch row), got {idx!r}")
    return ids.to(torch.int64)


def _dropout_seeds(blocks, training: bool) -> Optional[torch.Tensor]:
    """Three seeds per block (int64 ``[L, 3]`` on the CPU), drawn once per forward from PyTorch's default CPU
    generator (so ``torch.manual_seed`` makes a step repeatable, and a checkpoint's recompute reuses them);
    ``None`` when no dropout is active. A tensor, not ints: drawing it does not break a compiled graph."""
    active = training and any(
        blk.attn.in_dropout > 0 or blk.attn.out_dropout > 0 or blk.mlp_dropout > 0 for blk in blocks
    )
    if not active:
        return None
    return torch.randint(0, 2**31 - 1, (len(blocks), 3), dtype=torch.int64)


def used_adapters(ids: torch.Tensor, used: Optional[Sequence[int]] = None):
    """``(used, segment_ids)``: the adapters rows use (sorted host ints) and the ids remapped to positions in
    ``used`` (``-1`` stays). ``used`` given (known on the host, e.g. a fixed tile grid): no device read; otherwise
    it is read from ``ids`` (one small read per forward). While compiling or capturing a CUDA graph no host read
    (nor host-to-device copy) is allowed: then, unless ``used`` is ``0 .. n-1`` (no remap needed), every adapter
    is stacked (``used = None``) and unused ones get zero gradients instead of none."""
    capturing = torch.compiler.is_compiling() or (ids.is_cuda and torch.cuda.is_current_stream_capturing())
    if used is None:
        if capturing:
            return None, ids
        used = torch.unique(ids).tolist()
    used = sorted({int(a) for a in used if a >= 0})
    if used == list(range(len(used))):
        return used, ids  # the ids already index ``used``
    if capturing:
        return None, ids
    lut = torch.full((used[-1] + 2,), -1, dtype=ids.dtype, device=ids.device)  # slot 0 is id -1
    lut[torch.tensor(used, device=ids.device) + 1] = torch.arange(len(used), dtype=ids.dtype, device=ids.device)
    return used, lut[ids + 1]


def fused_transformer_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, idx=None,
                              used: Optional[Sequence[int]] = None):
    """Patched ``transformer.forward`` (installed on the instance): the release's signature and layout.

    ``x [S, B, width]`` -> ``[S, B, width]``. ``idx``: ``None``, one adapter for all rows (the release's loop), or
    one adapter id per batch row (``-1`` = none) for a batched pass; ``used``: the adapters ``idx`` uses, when
    the caller knows them (see :func:`used_adapters`)."""
    return run_blocks(self, x.transpose(0, 1), attn_mask, idx, used).transpose(0, 1)


def run_blocks(transformer: nn.Module, h: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, idx=None,
               used: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The fused blocks of ``transformer.resblocks`` on batch-first rows ``h [B, S, width]`` -> ``[B, S, width]``.

    Each view is a contiguous segment; ONE :class:`SegmentInfo` (built here) serves every block."""
    batch, seq, _ = h.shape
    ids = adapter_ids_for(idx, batch, h.device)
    used, segment_ids = used_adapters(ids, used)
    segments = SegmentInfo.from_batch(segment_ids, seq, device=h.device)
    blocks = list(transformer.resblocks)
    seeds = _dropout_seeds(blocks, transformer.training)
    h = h.contiguous()
    for i, block in enumerate(blocks):
        block_seeds = (None, None, None) if seeds is None else seeds[i].unbind()
        h = block(h, segments=segments, attn_mask=attn_mask, seeds=block_seeds, used=used)
    return h


def _tile_ids(views: int, batch: int, device: torch.device) -> torch.Tensor:
    """Adapter ids ``[batch * views]`` of images with ``views - 1`` tiles then the global view (``-1``), built
    with device ops (no host-to-device copy), so the forward can be captured in a CUDA graph."""
    per_image = torch.arange(views, dtype=torch.int64, device=device)
    return torch.where(per_image == views - 1, -1, per_image).repeat(batch)


def batched_model_forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patched ``MonkeyVisionModel.forward``: ONE encoder pass over every tile and global view of the batch.

    ``pixel_values [B, V, C, T, T]`` -> ``[B, V * Q, D]``, equal to the reference loop. Views are stacked on the
    batch axis image-major (``B * V`` rows of the encoder batch), tile ``v`` with adapter ``v``, the global view
    with ``-1``."""
    self._check_views(pixel_values, "pixel_values", 5)
    b, views = pixel_values.shape[:2]
    num_tiles = views - 1
    if not 1 <= num_tiles <= self.config.lora_repeat_num:
        raise ValueError(
            f"pixel_values must hold 2 to lora_repeat_num + 1 = {self.config.lora_repeat_num + 1} views "
            f"(tiles then the global view), got {views}"
        )
    ids = _tile_ids(views, b, pixel_values.device)
    h = run_blocks(self.transformer, self.embed_views(pixel_values.flatten(0, 1)), None, ids, range(num_tiles))
    feats = self.pool_views(h)  # [B * V, Q, D]
    return feats.reshape(b, views * feats.shape[1], feats.shape[2])


def batched_views_forward(self, pixel_values: torch.Tensor, adapter_ids, views_per_image=None):
    """Patched ``MonkeyVisionModel.forward_views``: images of different grids (packed views with one adapter id
    each, ``-1`` for global views) in ONE encoder pass, with ragged images but equal-length views (one segment
    per view, metadata built once); returns the per-image features in the order of the reference loop."""
    self._check_views(pixel_values, "pixel_values", 4)
    ids, counts = self.check_view_adapters(adapter_ids, views_per_image)
    if len(ids) != pixel_values.shape[0]:
        raise ValueError(f"adapter_ids must give one id per view ({pixel_values.shape[0]}), got {len(ids)}")
    device_ids = torch.tensor(ids, dtype=torch.int64, device=pixel_values.device)
    used = sorted({a for a in ids if a >= 0})
    feats = self.pool_views(run_blocks(self.transformer, self.embed_views(pixel_values), None, device_ids, used))
    return [per_image.flatten(0, 1) for per_image in feats.split(counts)]
