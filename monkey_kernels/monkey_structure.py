"""What a Monkey-family vision block looks like: THE one recogniser of Monkey's structure (adapters, per-tile
adapter lists, blocks) and of its call contracts, used by the Monkey ViT and VLM rules, by growth, and by any
later rule of the family (TextMonkey shares the blocks and adapters; only its call keyword differs).

Structure. The definitions are what the public Monkey code builds (``monkey_model/visual.py``; TextMonkey's
``visual_text.py`` builds the same modules) and exactly what the fused op computes, so nothing a module holds is
silently dropped by the stacked weights:

- an **adapter** is a module with ``lora_a`` and ``lora_b``, both ``nn.Linear`` without bias (``lora_a: K -> r``,
  ``lora_b: r -> N``), a one-element ``lora_scale`` tensor (a Parameter in the public code; a buffer works too)
  and ``lora_dropout`` absent, ``nn.Dropout`` or ``nn.Identity``: it computes
  ``lora_b(lora_a(dropout(x))) * lora_scale`` (the public ``Lora_Adapter``; its class does not matter);
- a **Monkey block** is a module with ``ln_1`` and ``ln_2`` (modules), ``attn.in_proj`` and ``attn.out_proj``,
  ``mlp.c_fc`` and ``mlp.c_proj`` (``nn.Linear``) and the three per-tile **adapter lists**
  ``attn.in_proj_lora``, ``attn.out_proj_lora``, ``mlp_lora``: non-empty ``nn.ModuleList`` s of adapters
  (TextMonkey's release builds them empty, ``lora_repeat_num=0``: its rule asks :func:`block_problem` to allow
  that).
  A module holding the three lists is a *candidate* (:func:`adapter_lists`); :func:`block_problem` says why a
  candidate is not a Monkey block. A patched (fused) block keeps the same names, so it is recognised too.

Whether a block can be FUSED is more than its structure (one rank and one dropout per list, no cross-attention:
:func:`check_adapter_list`, :func:`fusion_problem`); growth grows any Monkey block.

Call contracts (what a block's or container's ``forward`` must look like) are checked by the rules with
:mod:`monkey_kernels.call_contract`.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "ADAPTER_LISTS",
    "adapter_problem",
    "is_adapter",
    "adapter_lists",
    "block_problem",
    "is_monkey_block",
    "monkey_blocks",
    "adapter_count",
    "check_adapter_list",
    "fusion_problem",
    "stack_adapter_list",
]

# (parent attribute or None for the block itself, list attribute) of the three per-tile adapter lists
ADAPTER_LISTS: Tuple[Tuple[Optional[str], str], ...] = (("attn", "in_proj_lora"), ("attn", "out_proj_lora"),
                                                        (None, "mlp_lora"))
_BLOCK_LINEARS = (("attn", "in_proj"), ("attn", "out_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))


# ---------------------------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------------------------
def adapter_problem(module) -> Optional[str]:
    """Why ``module`` is not a Monkey LoRA adapter (see the module docstring), or ``None`` when it is."""
    if not isinstance(module, nn.Module):
        return f"is a {type(module).__name__}, not a LoRA adapter"
    lora_a, lora_b = getattr(module, "lora_a", None), getattr(module, "lora_b", None)
    scale = getattr(module, "lora_scale", None)
    if not (isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear) and isinstance(scale, torch.Tensor)):
        return (f"is a {type(module).__name__}, not a LoRA adapter (lora_a and lora_b nn.Linear, and a "
                "lora_scale tensor)")
    if lora_a.bias is not None or lora_b.bias is not None:
        return "has a bias on lora_a / lora_b (the per-tile adapters have none; the fused op would drop it)"
    if lora_a.out_features != lora_b.in_features:
        return f"has lora_a of rank {lora_a.out_features} but lora_b of rank {lora_b.in_features}"
    if scale.numel() != 1:
        return f"has a lora_scale of shape {tuple(scale.shape)}, not one value"
    dropout = getattr(module, "lora_dropout", None)
    if dropout is not None and not isinstance(dropout, (nn.Dropout, nn.Identity)):
        return f"has a lora_dropout of type {type(dropout).__name__} (nn.Dropout or nn.Identity expected)"
    return None


def is_adapter(module) -> bool:
    """Whether ``module`` is a Monkey LoRA adapter (:func:`adapter_problem` finds nothing)."""
    return adapter_problem(module) is None


def adapter_lists(block: nn.Module) -> Optional[List[Tuple[str, nn.ModuleList]]]:
    """``[("attn.in_proj_lora", list), ("attn.out_proj_lora", list), ("mlp_lora", list)]`` when ``block`` holds
    the three per-tile adapter lists as ``nn.ModuleList`` s (a candidate Monkey block), else ``None``."""
    if not isinstance(block, nn.Module):
        return None
    found = []
    for parent_name, name in ADAPTER_LISTS:
        parent = getattr(block, parent_name, None) if parent_name else block
        value = getattr(parent, name, None) if isinstance(parent, nn.Module) else None
        if not isinstance(value, nn.ModuleList):
            return None
        found.append((f"{parent_name}.{name}" if parent_name else name, value))
    return found


def block_problem(block: nn.Module, allow_empty: bool = False) -> Optional[str]:
    """Why a candidate (a module with the three adapter lists) is not a Monkey block, or ``None`` when it is.

    A module without the three lists is not a candidate: its problem is that it has no adapter lists.
    ``allow_empty``: empty lists are allowed too (TextMonkey built with ``lora_repeat_num=0``, its release recipe:
    blocks without adapters, which run the base weights only); Monkey's blocks need at least one adapter."""
    lists = adapter_lists(block)
    if lists is None:
        return "has no per-tile adapter lists (attn.in_proj_lora, attn.out_proj_lora, mlp_lora nn.ModuleLists)"
    for name in ("ln_1", "ln_2"):
        if not isinstance(getattr(block, name, None), nn.Module):
            return f"has no {name} module"
    for parent, name in _BLOCK_LINEARS:
        if not isinstance(getattr(getattr(block, parent, None), name, None), nn.Linear):
            return f"has no {parent}.{name} nn.Linear"
    for list_name, adapters in lists:
        if len(adapters) == 0 and not allow_empty:
            return f"{list_name} is empty"
        for i, adapter in enumerate(adapters):
            problem = adapter_problem(adapter)
            if problem is not None:
                return f"{list_name}[{i}] {problem}"
    return None


def is_monkey_block(module: nn.Module) -> bool:
    """Whether ``module`` is a Monkey block (reference, a user's copy of the public code, or fused)."""
    return adapter_lists(module) is not None and block_problem(module) is None


def monkey_blocks(model: nn.Module) -> Iterable[Tuple[str, nn.Module, Optional[str]]]:
    """``(name, module, problem)`` for every candidate Monkey block of ``model`` in module order; ``problem`` is
    ``None`` for a Monkey block (see :func:`block_problem`)."""
    for name, module in model.named_modules():
        if adapter_lists(module) is not None:
            yield name, module, block_problem(module)


def adapter_count(block: nn.Module) -> int:
    """The adapters every list of a Monkey block holds (the smallest list: how many tiles it can serve)."""
    return min(len(adapters) for _, adapters in adapter_lists(block))


# ---------------------------------------------------------------------------------------------------------
# Fusion
# ---------------------------------------------------------------------------------------------------------
def check_adapter_list(adapters: nn.ModuleList, in_features: int, out_features: int, where: str,
                       allow_empty: bool = False) -> float:
    """Validates an adapter list for stacking into one op call; returns the list's shared dropout probability
    (``0.0`` for an empty list, allowed with ``allow_empty``: no row can use an adapter then).

    Raises:
        ValueError: naming ``where``: an empty list (unless ``allow_empty``), an entry that is not an adapter,
            ranks or dropout probabilities that differ within the list, shapes that do not fit an ``in -> out``
            layer.
    """
    if len(adapters) == 0:
        if allow_empty:
            return 0.0
        raise ValueError(f"{where}: the adapter list is empty")
    for i, adapter in enumerate(adapters):
        problem = adapter_problem(adapter)
        if problem is not None:
            raise ValueError(f"{where}[{i}] {problem}")
    ranks = {ad.lora_a.weight.shape[0] for ad in adapters}
    if len(ranks) != 1:
        raise ValueError(f"{where}: adapters of one list must share a rank to be stacked, got {sorted(ranks)}")
    for ad in adapters:
        if tuple(ad.lora_a.weight.shape[1:]) != (in_features,) or ad.lora_b.weight.shape[0] != out_features:
            raise ValueError(
                f"{where}: adapter shapes lora_a {tuple(ad.lora_a.weight.shape)}, lora_b "
                f"{tuple(ad.lora_b.weight.shape)} do not fit a {in_features} -> {out_features} layer"
            )
    probs = {float(getattr(ad.lora_dropout, "p", 0.0)) if hasattr(ad, "lora_dropout") else 0.0 for ad in adapters}
    if len(probs) != 1:
        raise ValueError(f"{where}: adapters of one list must share a dropout probability, got {sorted(probs)}")
    return probs.pop()


def fusion_problem(block: nn.Module) -> Optional[str]:
    """Why a Monkey block cannot run as a fused self-attention block, or ``None`` (the list checks that raise
    come later, from :func:`check_adapter_list`, so a broken list is an error rather than a skip)."""
    if hasattr(block, "ln_1_kv"):
        return "is a cross-attention block (ln_1_kv): only self-attention blocks are fused"
    return None


def stack_adapter_list(stack, adapters: nn.ModuleList, used: Optional[Sequence[int]] = None, *,
                       empty_like: Optional[Tuple[torch.Tensor, int]] = None):
    """``(A [n, r, K], B [n, N, r], scale [n])`` of the adapters ``used`` (indices into the list, in that order;
    ``None``: all) through ``stack``, a :class:`~monkey_kernels.adapter_stack.AdapterStack` (differentiable
    towards the adapters' own Parameters; cached without autograd). No adapter used: empty stacks, shaped like
    the list's adapters, or for an empty list by ``empty_like = (base weight [N, *], K)`` (``[0, 0, K]``,
    ``[0, N, 0]``, ``[0]`` in the weight's dtype and device)."""
    chosen = list(adapters) if used is None else [adapters[i] for i in used]
    if not chosen:  # no row uses an adapter: empty stacks, the op runs the base GEMM alone
        if len(adapters) == 0:
            if empty_like is None:
                raise ValueError("stack_adapter_list: an empty adapter list needs empty_like=(base weight, K)")
            weight, lora_in = empty_like
            return (weight.new_empty((0, 0, lora_in)), weight.new_empty((0, weight.shape[0], 0)),
                    weight.new_empty(0))
        first = adapters[0]
        return (first.lora_a.weight.new_empty((0, *first.lora_a.weight.shape)),
                first.lora_b.weight.new_empty((0, *first.lora_b.weight.shape)), first.lora_scale.new_empty(0))
    stacked = stack([ad.lora_a.weight for ad in chosen], [ad.lora_b.weight for ad in chosen],
                    [ad.lora_scale for ad in chosen])
    return stacked.lora_a, stacked.lora_b, stacked.scale
