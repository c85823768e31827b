"""Monkey's vision transformer: ONE batched, fused encoder pass over every view (tiles and global views) of a batch.

What it recognises (by structure and call contract, so a user's copy of the public ``monkey_model/visual.py`` is
patched too; the structure is :mod:`monkey_kernels.monkey_structure`'s, the contract checks
:mod:`monkey_kernels.call_contract`'s):

- ``monkey_transformer``: a module holding ``resblocks``, an ``nn.ModuleList`` of Monkey blocks, whose class
  ``forward`` is exactly ``forward(x, attn_mask=None, idx=None)`` running the plain loop
  ``for r in self.resblocks: x = r(x, attn_mask=attn_mask, idx=idx)`` then ``return x`` (checked in its
  source), and whose blocks are self-attention Monkey blocks with the call contract
  ``forward(q_x, [k_x=None, v_x=None,] attn_mask=None, idx=None)`` (the public code's; this package's
  ``MonkeyVisionBlock`` has no ``k_x`` / ``v_x``). Its ``forward`` is replaced on the instance by
  :func:`fused_transformer_forward`: the same call and ``[seq, batch, width]`` layout, and ``idx`` may also be one
  adapter id per batch row (``-1`` = none) -- the batched pass.
- ``monkey_block``: each block of such a transformer (and ONLY those: a fused block runs batch-first rows with
  segment metadata, a calling convention only the fused transformer forward uses) -> :class:`FusedMonkeyBlock`
  over the block's own submodules.
- ``monkey_vision_model``: a :class:`~monkey_kernels.models.MonkeyVisionModel` whose transformer was patched:
  its per-view loop ``forward`` becomes ONE pass over all tiles and global views (:func:`batched_model_forward`),
  ``forward_views`` (packed views of images of different grids) one pass over every view
  (:func:`batched_views_forward`).

Not claimed, and listed in ``PatchReport.skipped`` with the reason, with the model left running its own code:
TextMonkey's transformer (``forward(x, attn_mask=None, lora_idx=None, image_size=...)``, looping windows inside
each layer) and blocks (``lora_idx``), blocks whose forward takes other keywords, containers that loop otherwise
(e.g. over windows themselves), cross-attention blocks (``ln_1_kv``), blocks outside such a container.

What the fused forward does. A fused block runs ``[batch, seq, dim]`` rows (every view a contiguous run of rows,
i.e. one segment, one adapter) through three ``multi_lora_linear`` calls:

- ``attn.in_proj`` + ``attn.in_proj_lora`` (LoRA on the ``ln_1`` output),
- ``attn.out_proj`` + ``attn.out_proj_lora`` (LoRA on the attention context),
- ``mlp.c_proj`` + ``mlp_lora``: LoRA on the pre-``ln_2`` residual stream (``lora_input=``) and the residual add in
  the same op (``residual=``).

One :class:`~monkey_kernels.ops.segments.SegmentInfo` serves every block of a pass. The fused modules hold the
very same submodule objects as the reference block, under the same names (state-dict keys and Parameters
unchanged); the adapters are stacked per forward by :class:`~monkey_kernels.adapter_stack.AdapterStack` (only
those the batch uses, so the others get no gradient, as in the reference loop).
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter_stack import AdapterStack, remap_adapter_ids
from ..call_contract import adds_in_place, class_forward, forward_parameters_problem, plain_loop_problem
from ..monkey_structure import adapter_lists, block_problem, check_adapter_list, fusion_problem, stack_adapter_list
from ..ops.autocast import autocast_dtype
from ..ops.multi_lora import multi_lora_linear
from ..ops.segments import SegmentInfo
from ..patching import InstanceForward, PatchOptions, PatchRule, register_builtin_rule, rule_of

__all__ = [
    "FusedMonkeyAttention",
    "FusedMonkeyBlock",
    "fused_block_class",
    "fused_transformer_forward",
    "batched_model_forward",
    "batched_views_forward",
    "run_blocks",
    "fuse_block",
    "adapter_ids_for",
    "block_contract_problem",
    "transformer_problem",
    "BLOCK_RULE",
    "TRANSFORMER_RULE",
    "VISION_MODEL_RULE",
]

_CLAIM_ATTR = "_monkey_kernels_claimed_by"  # on a reference block whose transformer the rule patches
_BLOCK_CALL = "Monkey's block forward(q_x, [k_x=None, v_x=None,] attn_mask=None, idx=None)"
_TRANSFORMER_CALL = "Monkey's forward(x, attn_mask=None, idx=None)"


# ---------------------------------------------------------------------------------------------------------
# Fused modules
# ---------------------------------------------------------------------------------------------------------
class FusedMonkeyAttention(nn.Module):
    """Self-attention of a Monkey block on batch-first ``[B, S, dim]`` rows with per-view adapters.

    Children (same objects as the reference attention's): ``in_proj``, ``in_proj_lora``, ``out_proj``,
    ``out_proj_lora``. The qkv columns keep the release's per-head ``[q_h | k_h | v_h]`` grouping; attention
    is ``scaled_dot_product_attention`` with the release's ``1/sqrt(head_dim)`` scale. ``allow_empty``: the
    adapter lists may be empty (TextMonkey's ``lora_repeat_num=0``; every row then runs the base weights).

    Under autocast the projections' output dtype is the reference's (:func:`lora_output_dtype`): the public code
    adds its adapters in place (``mixed += lora``: the autocast dtype), this package's ``MonkeyVisualAttention``
    out of place (``mixed + lora * lora_scale``: promoted to the fp32 scale's dtype); read from the reference
    attention's ``forward`` (:func:`~monkey_kernels.call_contract.adds_in_place`; unreadable: in place)."""

    def __init__(self, attn: nn.Module, num_heads: int, backend: Optional[str] = None,
                 allow_empty: bool = False) -> None:
        super().__init__()
        self.in_proj = attn.in_proj
        self.in_proj_lora = attn.in_proj_lora
        self.out_proj = attn.out_proj
        self.out_proj_lora = attn.out_proj_lora
        self.embed_dim = attn.in_proj.in_features
        self.num_heads = num_heads
        self.head_dim = self.embed_dim // num_heads
        self.backend = backend
        self.allow_empty = allow_empty
        self.in_dropout = check_adapter_list(self.in_proj_lora, self.embed_dim, 3 * self.embed_dim,
                                             "attn.in_proj_lora", allow_empty)
        self.out_dropout = check_adapter_list(self.out_proj_lora, self.embed_dim, self.embed_dim,
                                              "attn.out_proj_lora", allow_empty)
        self.in_stack, self.out_stack = AdapterStack(), AdapterStack()
        forward, _ = class_forward(attn)
        self.in_lora_in_place = forward is None or adds_in_place(forward, "in_proj_lora") is not False
        self.out_lora_in_place = forward is None or adds_in_place(forward, "out_proj_lora") is not False

    def forward(self, x: torch.Tensor, segments: SegmentInfo, attn_mask: Optional[torch.Tensor] = None,
                seeds: Sequence[Optional[torch.Tensor]] = (None, None),
                used: Optional[Sequence[int]] = None) -> torch.Tensor:
        """``x [B, S, dim]`` (the ``ln_1`` output) -> ``[B, S, dim]``; ``segments`` cover ``B * S`` rows, their ids
        index ``used`` (the adapters to stack, in that order; ``None``: all)."""
        b, s, d = x.shape
        heads, hd = self.num_heads, self.head_dim
        a, bb, sc = stack_adapter_list(self.in_stack, self.in_proj_lora, used,
                                       empty_like=(self.in_proj.weight, d))
        qkv = multi_lora_linear(
            x, self.in_proj.weight, self.in_proj.bias, a, bb, sc, segments,
            dropout_p=self.in_dropout if self.training else 0.0, seed=seeds[0], backend=self.backend,
            out_dtype=lora_output_dtype(x, sc, self.in_lora_in_place),
        )
        q, k, v = qkv.view(b, s, heads, 3 * hd).transpose(1, 2).split(hd, dim=-1)  # [B, H, S, hd] each
        mask = attn_mask.to(q.dtype) if attn_mask is not None else None
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        context = context.transpose(1, 2).reshape(b, s, d)
        a, bb, sc = stack_adapter_list(self.out_stack, self.out_proj_lora, used,
                                       empty_like=(self.out_proj.weight, d))
        return multi_lora_linear(
            context, self.out_proj.weight, self.out_proj.bias, a, bb, sc, segments,
            dropout_p=self.out_dropout if self.training else 0.0, seed=seeds[1], backend=self.backend,
            out_dtype=lora_output_dtype(context, sc, self.out_lora_in_place),
        )


def lora_output_dtype(x: torch.Tensor, scale: torch.Tensor, in_place: bool,
                      residual: Optional[torch.Tensor] = None) -> Optional[torch.dtype]:
    """The ``out_dtype`` under which a fused ``base(x) [+ residual] + lora(x) * lora_scale`` has the dtype of the
    reference's sum, or ``None`` (the op's default) where that default already is it: outside autocast, for
    float64 ``x`` (autocast leaves it), when the reference adds the adapter IN PLACE (the sum keeps the dtype of
    ``base(x)``, promoted with the residual's: the op's default), and when no adapter is stacked (no row runs
    one: the reference adds nothing). Otherwise (out of place) the adapter's ``lora_b(..) * lora_scale``
    promotes to the scale's dtype (fp32 master scales: fp32), and so does the sum.

    A batch mixing views with and without adapter gets the promoted dtype for every row (one output tensor),
    where the reference loop returns it for the adapter views and the autocast dtype for the others."""
    dtype = autocast_dtype(x.device.type)
    if dtype is None or x.dtype == torch.float64 or in_place or scale.numel() == 0:
        return None
    dtype = torch.promote_types(dtype, scale.dtype)
    return dtype if residual is None else torch.promote_types(dtype, residual.dtype)


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


def _num_heads(attn: nn.Module) -> int:
    for name in ("num_heads", "num_attention_heads_per_partition"):
        if isinstance(getattr(attn, name, None), int):
            return getattr(attn, name)
    raise ValueError(f"cannot find the number of heads of {type(attn).__name__} (num_heads attribute)")


class FusedMonkeyBlockBody:
    """What :class:`FusedMonkeyBlock` does; see there. (The class itself is built on first use, because its base,
    transformers' ``GradientCheckpointingLayer``, imports transformers -- seconds that patching an unrelated
    model, e.g. an SLP embedding or a PEFT tower, should not pay.)"""

    def __init__(self, block: nn.Module, num_heads: int, backend: Optional[str] = None,
                 allow_empty: bool = False) -> None:
        super().__init__()
        self.ln_1 = block.ln_1
        self.ln_2 = block.ln_2
        self.attn = FusedMonkeyAttention(block.attn, num_heads, backend, allow_empty)
        self.mlp = block.mlp
        self.mlp_lora = block.mlp_lora
        self.backend = backend
        c_fc, _, c_proj = _mlp_parts(block.mlp)
        width = self.attn.embed_dim
        if c_fc.in_features != width or c_proj.out_features != width:
            raise ValueError(f"mlp must map {width} -> {width}, got {c_fc.in_features} -> {c_proj.out_features}")
        self.mlp_dropout = check_adapter_list(self.mlp_lora, width, width, "mlp_lora", allow_empty)
        self.mlp_stack = AdapterStack()
        forward, _ = class_forward(block)
        self.mlp_lora_in_place = forward is None or adds_in_place(forward, "mlp_lora") is not False
        # Carried over so a model checkpointed before patching stays checkpointed.
        self.gradient_checkpointing = bool(getattr(block, "gradient_checkpointing", False))
        if hasattr(block, "_gradient_checkpointing_func"):
            self._gradient_checkpointing_func = block._gradient_checkpointing_func
        self.__dict__["_reference_block"] = block  # kept out of the module tree: its children are ours

    def forward(self, x: torch.Tensor, segments: SegmentInfo, attn_mask: Optional[torch.Tensor] = None,
                seeds: Sequence[Optional[torch.Tensor]] = (None, None, None),
                used: Optional[Sequence[int]] = None) -> torch.Tensor:
        """``x [B, S, dim]`` -> ``[B, S, dim]``; ``seeds``: dropout seeds of in_proj, out_proj, mlp LoRA; ``used``:
        the adapters the segments' ids index (``None``: all)."""
        x = x + self.attn(self.ln_1(x), segments, attn_mask=attn_mask, seeds=seeds[:2], used=used)
        c_fc, acts, c_proj = _mlp_parts(self.mlp)
        hidden = c_fc(self.ln_2(x))
        for act in acts:
            hidden = act(hidden)
        a, b, sc = stack_adapter_list(self.mlp_stack, self.mlp_lora, used, empty_like=(c_proj.weight, x.shape[-1]))
        return multi_lora_linear(
            hidden, c_proj.weight, c_proj.bias, a, b, sc, segments, lora_input=x, residual=x,
            dropout_p=self.mlp_dropout if self.training else 0.0, seed=seeds[2], backend=self.backend,
            out_dtype=lora_output_dtype(hidden, sc, self.mlp_lora_in_place, residual=x),
        )

    def check_adapter_lists(self, where: str) -> None:
        """Re-validates the adapter lists after they changed (growth): the block caches only their dropout
        probabilities, which must not have changed."""
        attn, width = self.attn, self.attn.embed_dim
        for adapters, in_f, out_f, cached, name in (
                (attn.in_proj_lora, width, 3 * width, attn.in_dropout, "attn.in_proj_lora"),
                (attn.out_proj_lora, width, width, attn.out_dropout, "attn.out_proj_lora"),
                (self.mlp_lora, width, width, self.mlp_dropout, "mlp_lora")):
            probability = check_adapter_list(adapters, in_f, out_f, f"{where}.{name}", attn.allow_empty)
            if probability != cached:
                raise RuntimeError(f"{where}.{name}: the grown adapters' dropout {probability} differs from the "
                                   f"fused block's cached {cached}; unpatch_model, grow, then patch_model again")

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


_fused_block_class: Optional[type] = None


def fused_block_class() -> type:
    """:class:`FusedMonkeyBlock` (built on the first call; ``monkey_kernels.rules.monkey_vit.FusedMonkeyBlock``
    calls this too)."""
    global _fused_block_class
    if _fused_block_class is None:
        from transformers.modeling_layers import GradientCheckpointingLayer  # noqa: PLC0415 (see the body's doc)

        _fused_block_class = type("FusedMonkeyBlock", (FusedMonkeyBlockBody, GradientCheckpointingLayer), {
            "__module__": __name__,
            "__qualname__": "FusedMonkeyBlock",
            "__doc__": """A Monkey block on batch-first ``[B, S, dim]`` rows, one adapter per view (segment)::

        x = x + out_proj*(attn(in_proj*(ln_1(x))));   x = c_proj*(gelu(c_fc(ln_2(x))), lora_input=x, residual=x)

    where ``*`` marks a ``multi_lora_linear`` with the view's adapter (id ``-1``: base weights only).
    Children ``ln_1``, ``ln_2``, ``mlp``, ``mlp_lora`` are the reference block's own modules and ``attn`` wraps
    its attention's, so ``state_dict`` keys and Parameter objects are those of the reference block. A
    ``GradientCheckpointingLayer``: ``gradient_checkpointing_enable`` works before or after patching.""",
        })
    return _fused_block_class


def __getattr__(name: str):
    if name == "FusedMonkeyBlock":  # also how pickle finds the class
        return fused_block_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------------
# Fused forwards
# ---------------------------------------------------------------------------------------------------------
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


def fused_transformer_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, idx=None,
                              used: Optional[Sequence[int]] = None):
    """Patched ``transformer.forward`` (installed on the instance): the release's signature and layout.

    ``x [S, B, width]`` -> ``[S, B, width]``. ``idx``: ``None``, one adapter for all rows (the release's loop), or
    one adapter id per batch row (``-1`` = none) for a batched pass; ``used``: the adapters ``idx`` uses, when
    the caller knows them (see :func:`~monkey_kernels.adapter_stack.remap_adapter_ids`)."""
    return run_blocks(self, x.transpose(0, 1), attn_mask, idx, used).transpose(0, 1)


def run_blocks(transformer: nn.Module, h: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, idx=None,
               used: Optional[Sequence[int]] = None,
               before_block: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """The fused blocks of ``transformer.resblocks`` on batch-first rows ``h [B, S, width]`` -> ``[B, S, width]``.

    Each view is a contiguous segment; ONE :class:`SegmentInfo` (built here) serves every block.
    ``before_block(i, h) -> h``: runs before block ``i`` on the rows (same shape back), e.g. TextMonkey's
    cross-window attention over the stitched windows."""
    batch, seq, _ = h.shape
    ids = adapter_ids_for(idx, batch, h.device)
    used, segment_ids = remap_adapter_ids(ids, used)
    segments = SegmentInfo.from_batch(segment_ids, seq, device=h.device)
    blocks = list(transformer.resblocks)
    seeds = _dropout_seeds(blocks, transformer.training)
    h = h.contiguous()
    for i, block in enumerate(blocks):
        if before_block is not None:
            h = before_block(i, h)
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


# ---------------------------------------------------------------------------------------------------------
# Recognition: structure and call contract
# ---------------------------------------------------------------------------------------------------------
def block_contract_problem(block: nn.Module) -> Optional[str]:
    """Why a Monkey block cannot become a :class:`FusedMonkeyBlock` under the fused transformer forward (its
    structure, a cross-attention block, or a forward other than Monkey's), or ``None``."""
    problem = block_problem(block) or fusion_problem(block)
    if problem is not None:
        return problem
    forward, problem = class_forward(block)
    if problem is not None:
        return problem
    return forward_parameters_problem(forward, keywords=("attn_mask", "idx"), optional=("k_x", "v_x"),
                                      expected=_BLOCK_CALL)


def _looks_like_transformer(module: nn.Module) -> bool:
    """A container of Monkey-structured blocks: what the transformer rule either patches or reports on."""
    blocks = getattr(module, "resblocks", None)
    return (isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and rule_of(module) is None
            and any(adapter_lists(b) is not None for b in blocks))


def transformer_problem(module: nn.Module) -> Optional[str]:
    """Why a module holding ``resblocks`` cannot run :func:`fused_transformer_forward` (see the module
    docstring for the contract), or ``None``."""
    forward, problem = class_forward(module)
    if problem is not None:
        return problem
    problem = (forward_parameters_problem(forward, keywords=("attn_mask", "idx"), first="x",
                                          expected=_TRANSFORMER_CALL)
               or plain_loop_problem(forward, "resblocks", ("attn_mask", "idx")))
    if problem is not None:
        return problem
    for i, block in enumerate(module.resblocks):
        problem = block_contract_problem(block)
        if problem is not None:
            return f"resblocks.{i}: {problem}"
    return None


def _transformer_to_fused(module: nn.Module, options: PatchOptions) -> nn.Module:
    for block in module.resblocks:  # the block rule (next) fuses exactly these
        block.__dict__[_CLAIM_ATTR] = "monkey_transformer"
    module.forward = InstanceForward(fused_transformer_forward, module)
    return module


def _transformer_to_reference(module: nn.Module) -> nn.Module:
    module.__dict__.pop("forward", None)
    for block in module.resblocks:
        block.__dict__.pop(_CLAIM_ATTR, None)
    return module


def _is_claimed_block(module: nn.Module) -> bool:
    return module.__dict__.get(_CLAIM_ATTR) is not None


def _block_skip_reason(module: nn.Module) -> Optional[str]:
    if adapter_lists(module) is None or _is_claimed_block(module):
        return None
    problem = block_contract_problem(module)
    if problem is not None:
        return problem
    return ("is not in a container the monkey_transformer rule patches (resblocks run by the plain loop of "
            f"{_TRANSFORMER_CALL}); a fused block is only called by that fused loop")


def fuse_block(block: nn.Module, backend: Optional[str] = None, allow_empty: bool = False) -> nn.Module:
    """A :class:`FusedMonkeyBlock` over ``block``'s own submodules, in ``block``'s train / eval mode (shared by the
    Monkey and TextMonkey block rules; ``allow_empty``: empty adapter lists, TextMonkey's ``lora_repeat_num=0``)."""
    return fused_block_class()(block, _num_heads(block.attn), backend=backend,
                               allow_empty=allow_empty).train(block.training)


def _block_to_fused(block: nn.Module, options: PatchOptions) -> nn.Module:
    # The claim stays on the reference block: the transformer's to_reference drops it after the block's.
    return fuse_block(block, options.backend)


def _monkey_vision_model_class() -> Optional[type]:
    # Imported by nobody but its users: without the module loaded no MonkeyVisionModel exists (and transformers,
    # which it imports, stays unloaded for unrelated models).
    module = sys.modules.get("monkey_kernels.models.monkey_vision")
    return getattr(module, "MonkeyVisionModel", None)


def _is_vision_model(module: nn.Module) -> bool:
    cls = _monkey_vision_model_class()
    return (cls is not None and isinstance(module, cls) and "forward" not in module.__dict__
            and rule_of(module.transformer) == "monkey_transformer")


def _vision_model_skip_reason(module: nn.Module) -> Optional[str]:
    cls = _monkey_vision_model_class()
    if cls is None or not isinstance(module, cls) or _is_vision_model(module):
        return None
    if "forward" in module.__dict__:
        return "an instance-level forward is installed over MonkeyVisionModel.forward"
    return "its transformer was not patched (see the monkey_transformer entry)"


def _vision_model_to_fused(module: nn.Module, options: PatchOptions) -> nn.Module:
    module.forward = InstanceForward(batched_model_forward, module)
    module.forward_views = InstanceForward(batched_views_forward, module)
    return module


def _vision_model_to_reference(module: nn.Module) -> nn.Module:
    module.__dict__.pop("forward_views", None)
    module.__dict__.pop("forward", None)
    return module


TRANSFORMER_RULE = register_builtin_rule(PatchRule.by_structure(
    "monkey_transformer", _looks_like_transformer, transformer_problem, _transformer_to_fused,
    _transformer_to_reference, kinds={"batched_encoder_forward": 1},
    description=("resblocks (an nn.ModuleList of Monkey blocks: ln_1, ln_2, attn.in_proj / out_proj, "
                 "mlp.c_fc / c_proj and the per-tile adapter lists attn.in_proj_lora, attn.out_proj_lora, "
                 "mlp_lora) run by forward(x, attn_mask=None, idx=None) as a plain loop"),
))
BLOCK_RULE = register_builtin_rule(PatchRule(
    "monkey_block", _is_claimed_block, _block_to_fused, lambda fused: fused.to_reference(),
    kinds={"attn.in_proj": 1, "attn.out_proj": 1, "mlp.c_proj": 1}, skip_reason=_block_skip_reason,
    after=("monkey_transformer",),
    description="a Monkey block inside a container the monkey_transformer rule patches",
))
VISION_MODEL_RULE = register_builtin_rule(PatchRule(
    "monkey_vision_model", _is_vision_model, _vision_model_to_fused, _vision_model_to_reference,
    kinds={"batched_view_loop": 1}, skip_reason=_vision_model_skip_reason, after=("monkey_block",),
    description="a monkey_kernels.models.MonkeyVisionModel whose transformer the rules above patch",
))
