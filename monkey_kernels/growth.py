"""Progressive resolution training: grow the per-tile adapters of a Monkey-structured encoder (4 -> 6 -> 12).

Monkey trains one LoRA adapter per image tile (adapter ``i`` = tile ``i`` of the grid, row-major). Going from
896x896 (a 2x2 grid, 4 adapters) to 1344x896 (3x2, 6 adapters) or to a 4x3 grid (12 adapters) needs more
adapters in every block. :func:`grow_tile_adapters` appends them, in place, to the three adapter lists of every
block (``attn.in_proj_lora``, ``attn.out_proj_lora``, ``mlp_lora``):

- the trained adapters stay where they are: the same module and ``Parameter`` objects at the same indices,
  bit-identical, so views run with adapters ``0 .. n_old - 1`` give the outputs they gave before (bit for bit in
  the reference model and with the torch, native and Triton-interpreter backends, checked by the tests; a GPU
  kernel autotuned again for the new adapter count could round differently), and an optimizer built before
  growing still holds them;
- the new adapters ``n_old .. num_adapters - 1`` are initialised by ``init``:

  ``"nearest"`` (default): a copy of the adapter of the old tile nearest to the new tile (see
  :func:`nearest_tile_sources` for the exact rule on the old and new ``(cols, rows)`` grids);
  ``"mean"``: ``lora_a``, ``lora_b`` and ``lora_scale`` are each the element-wise mean of the old adapters'
  (computed in float64, then cast). Note ``mean(B) @ mean(A) != mean(B @ A)``: this is the mean of the
  parameters, not of the adapters' outputs;
  ``"fresh"``: a new LoRA as the release initialises it: ``lora_a`` kaiming_uniform(a=sqrt(5)), ``lora_b = 0``,
  ``lora_scale = 1``. With ``B = 0`` a fresh adapter adds nothing, so a new tile's output right after growing
  equals the encoder's output for that view without adapter (``idx=None``, like the global view).

  Every new adapter is a ``copy.deepcopy`` of an old one (its nearest source, else adapter 0) whose values are
  then set, so it has the old adapters' class (a user's own ``Lora_Adapter`` too), dropout probability, dtype,
  device, ``requires_grad`` flags and train / eval mode; its ``.grad`` is ``None``. Any further parameter of a
  user's adapter class (beyond ``lora_a.weight``, ``lora_b.weight``, ``lora_scale``) is that template's copy.

- the config is updated (``lora_repeat_num``, and the resolution: ``image_size`` for a square one,
  ``image_resolution = [width, height]`` otherwise) so ``save_pretrained`` / ``from_pretrained`` round-trip the
  grown model; so is an int ``lora_repeat_num`` ATTRIBUTE of a module (TextMonkey's ``VisionTransformer`` keeps
  one, and its VLM reads it to choose ``encode``'s ``lora_idx``: 1 shares adapter 0 across the windows, more
  gives window ``k`` adapter ``k``).

Which index means which tile: after growing, adapter ``i`` serves tile ``i`` of the NEW grid in row-major order,
as in the release (the adapter list is indexed by window number). For a wider grid an old index can therefore
fall on another image region (adapter 2 was row 1 / col 0 of the 2x2 grid, it is row 0 / col 2 of the 3x2 grid);
its trained weights are kept as they are (that is what keeps the old tiles' outputs unchanged) and only the NEW
indices are initialised from the nearest old tile.

Which blocks: every Monkey block of the model, as :mod:`monkey_kernels.monkey_structure` (the one recogniser of
the patch rules and growth) defines it.

Patched models: ``patch_model``'s fused blocks hold the very same ``nn.ModuleList`` objects as the reference
blocks and stack them on every forward (:class:`~monkey_kernels.adapter_stack.AdapterStack`); the only values they
cache are the lists' dropout probabilities, which growing keeps (every new adapter copies an old one's dropout).
So growing in place is all a patched model needs: no unpatch / re-patch. After growing, each fused block's lists
are checked again (its ``check_adapter_lists``) and a changed dropout probability is an error.
A CUDA graph captured before growing (``monkey_kernels.cuda_graphs``) must be captured again; ``torch.compile``
recompiles by itself (the list length is guarded). Grow BEFORE wrapping in DDP / FSDP (or re-wrap afterwards):
their buckets and shards are built from the parameters that existed at wrap time.

Optimizers: an optimizer built before growing does not know the new adapters (it keeps optimising the old ones).
Either :func:`rebuild_optimizer` (a new optimizer of the same class and hyper-parameters over the same groups
plus the new adapters, the old parameters' state -- Adam moments, momentum, ``step`` -- carried over; build any
LR scheduler again on it) or :func:`add_new_adapters_to_optimizer` (adds the new adapters, in place, to the
param group holding their counterparts in adapter 0, so the group count is unchanged and an existing LR
scheduler keeps working). New adapters start with empty optimizer state in both.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .monkey_structure import adapter_lists, monkey_blocks

__all__ = [
    "GROWTH_INITS",
    "GrowthReport",
    "find_adapter_blocks",
    "nearest_tile_sources",
    "grow_tile_adapters",
    "new_adapter_parameters",
    "add_new_adapters_to_optimizer",
    "rebuild_optimizer",
]

GROWTH_INITS = ("nearest", "mean", "fresh")

@dataclass
class GrowthReport:
    """What :func:`grow_tile_adapters` did.

    Attributes:
        old_num_adapters, num_adapters: adapters per list before / after.
        init: the initialisation of the new adapters.
        sources: ``{new index: old indices it was initialised from}`` (one index for ``"nearest"``, all of them
            for ``"mean"``, none for ``"fresh"``).
        blocks: names (in ``model.named_modules()``) of the grown blocks.
        new_parameters: every Parameter of the new adapters, block by block, list by list, adapter by adapter.
        configs: the configs that were updated (``lora_repeat_num`` and the resolution).
        resolution: the ``(width, height)`` written to the configs, or ``None`` (left unchanged).
        fused_blocks: how many of the blocks were patched (fused) blocks, checked after growing.
        modules: names of the modules whose own ``lora_repeat_num`` attribute was updated (TextMonkey's
            ``VisionTransformer``).
    """

    old_num_adapters: int
    num_adapters: int
    init: str
    sources: Dict[int, Tuple[int, ...]] = field(default_factory=dict)
    blocks: List[str] = field(default_factory=list)
    new_parameters: List[nn.Parameter] = field(default_factory=list)
    configs: List[object] = field(default_factory=list)
    resolution: Optional[Tuple[int, int]] = None
    fused_blocks: int = 0
    modules: List[str] = field(default_factory=list)

    @property
    def grew(self) -> bool:
        return self.num_adapters > self.old_num_adapters


# ---------------------------------------------------------------------------------------------------------
# Finding the adapter lists
# ---------------------------------------------------------------------------------------------------------
def find_adapter_blocks(model: nn.Module) -> List[Tuple[str, nn.Module, List[Tuple[str, nn.ModuleList]]]]:
    """Every Monkey block of ``model`` (see :mod:`monkey_kernels.monkey_structure`: a reference block, a patched
    ``FusedMonkeyBlock``, or a user's copy of the public Monkey code). Returns ``[(name, block, [(list name,
    list), ...])]`` in module order; a list shared by two blocks is reported once.

    Raises:
        ValueError: a module holds the three adapter lists (``attn.in_proj_lora``, ``attn.out_proj_lora``,
            ``mlp_lora``) but is not a Monkey block, e.g. an entry of a list is not a LoRA adapter.
    """
    blocks, seen = [], set()
    for name, module, problem in monkey_blocks(model):
        lists = adapter_lists(module)
        if all(id(lst) in seen for _, lst in lists):
            continue
        if problem is not None:
            raise ValueError(f"model: {name or 'model'} holds per-tile adapter lists but is not a Monkey block: "
                             f"{problem}")
        seen.update(id(lst) for _, lst in lists)
        blocks.append((name, module, lists))
    return blocks


# ---------------------------------------------------------------------------------------------------------
# Grids and the nearest-tile rule
# ---------------------------------------------------------------------------------------------------------
def _grid_pair(name: str, grid) -> Tuple[int, int]:
    """``(cols, rows)`` from a ``TileGrid`` or a pair of positive ints."""
    if hasattr(grid, "n_cols") and hasattr(grid, "n_rows"):
        grid = (grid.n_cols, grid.n_rows)
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in grid)):
        raise ValueError(f"{name} must be a TileGrid or a (cols, rows) pair of positive ints, got {grid!r}")
    return int(grid[0]), int(grid[1])


def _nearest_along(new_index: int, new_count: int, old_count: int) -> int:
    """The old cell (0-based) along one axis holding the centre of new cell ``new_index``; ties to the lower.

    The new centre is ``(2 j + 1) / (2 n_new)`` in normalised coordinates, old cell ``c`` covers
    ``[c / n_old, (c + 1) / n_old]``. In integers: ``t = (2 j + 1) * n_old``, ``d = 2 n_new``; the centre is
    inside cell ``t // d`` unless ``t % d == 0``, where it lies on the boundary between cells ``t // d - 1`` and
    ``t // d``, equally near both centres: the lower (left / top) one wins."""
    t, d = (2 * new_index + 1) * old_count, 2 * new_count
    cell = t // d - 1 if t % d == 0 else t // d
    return min(max(cell, 0), old_count - 1)


def nearest_tile_sources(old_grid, new_grid) -> List[int]:
    """For each tile of ``new_grid`` (row-major), the index of the old tile nearest to it.

    Rule: a tile's position is its centre in normalised image coordinates, ``x = (col + 1/2) / cols``,
    ``y = (row + 1/2) / rows`` (both grids span the whole image). The old tile is the one containing the new
    centre, i.e. the nearest old centre, chosen per axis (for a regular grid the per-axis choice is the nearest
    centre in any norm). A new centre exactly on a boundary between old tiles (equidistant from both centres)
    goes to the LOWER index: the left column, the top row. Computed in exact integer arithmetic.

    Example, 2x2 -> 3x2: new columns 0, 1, 2 have centres 1/6, 1/2, 5/6 -> old columns 0, 0 (tie at 1/2), 1;
    rows map 0 -> 0, 1 -> 1; so the new tiles 0..5 come from old tiles ``[0, 0, 1, 2, 2, 3]``.

    Args:
        old_grid, new_grid: ``TileGrid`` s or ``(cols, rows)`` pairs.
    Returns:
        ``[new_cols * new_rows]`` old tile indices (``row * old_cols + col``).
    """
    old_cols, old_rows = _grid_pair("old_grid", old_grid)
    new_cols, new_rows = _grid_pair("new_grid", new_grid)
    sources = []
    for row in range(new_rows):
        old_row = _nearest_along(row, new_rows, old_rows)
        for col in range(new_cols):
            sources.append(old_row * old_cols + _nearest_along(col, new_cols, old_cols))
    return sources


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------
def _configs_of(model: nn.Module, extra) -> List[object]:
    """Configs with ``lora_repeat_num`` held by ``model`` or its submodules (``module.config``), plus
    ``extra``; each object once."""
    found, seen = [], set()
    candidates = [getattr(m, "config", None) for m in model.modules()]
    if extra is not None:
        candidates.extend(extra if isinstance(extra, (list, tuple)) else [extra])
    for config in candidates:
        if config is None or id(config) in seen:
            continue
        if hasattr(config, "lora_repeat_num") or isinstance(getattr(config, "visual", None), dict):
            seen.add(id(config))
            found.append(config)
        # a composite model's config may hold the vision config as a sub-config (e.g. ``vision_config``)
        for value in list(getattr(config, "__dict__", {}).values()):
            if hasattr(value, "lora_repeat_num") and hasattr(value, "to_dict") and id(value) not in seen:
                seen.add(id(value))
                found.append(value)
    return found


def _config_resolution(config) -> Optional[Tuple[int, int]]:
    resolution = getattr(config, "input_resolution", None)
    if resolution is not None:
        return tuple(resolution)
    side = getattr(config, "image_size", None)
    return (side, side) if isinstance(side, int) else None


def _write_config(config, num_adapters: int, resolution: Optional[Tuple[int, int]]) -> None:
    if hasattr(config, "lora_repeat_num"):
        config.lora_repeat_num = num_adapters
        if resolution is not None:
            width, height = resolution
            if width == height and hasattr(config, "image_size"):
                config.image_size = width
                if hasattr(config, "image_resolution"):
                    config.image_resolution = None
            elif hasattr(config, "image_resolution"):
                config.image_resolution = [width, height]
    visual = getattr(config, "visual", None)
    if isinstance(visual, dict) and "lora_repeat_num" in visual:
        # The public Monkey VLM's config: VisionTransformer(**config.visual). Its resolution key is left alone
        # (the release reads image_size as one side; set it yourself for a non-square input).
        visual["lora_repeat_num"] = num_adapters


# ---------------------------------------------------------------------------------------------------------
# Growing
# ---------------------------------------------------------------------------------------------------------
def _new_adapter(template: nn.Module) -> nn.Module:
    """A copy of ``template`` (class, dropout, dtype, device, flags, mode) with no gradients."""
    adapter = copy.deepcopy(template)
    for p in adapter.parameters():
        p.grad = None
    return adapter


@torch.no_grad()
def _set_mean(adapter: nn.Module, olds: Sequence[nn.Module]) -> None:
    for target, sources in ((adapter.lora_a.weight, [o.lora_a.weight for o in olds]),
                            (adapter.lora_b.weight, [o.lora_b.weight for o in olds]),
                            (adapter.lora_scale, [o.lora_scale for o in olds])):
        mean = torch.stack([s.detach().to(torch.float64) for s in sources]).mean(dim=0)
        target.copy_(mean.to(dtype=target.dtype))


@torch.no_grad()
def _set_fresh(adapter: nn.Module, generator: Optional[torch.Generator]) -> None:
    """The release's init. ``lora_a`` is drawn in float32 on the generator's device (the CPU by default) and then
    cast and moved, so the same generator state gives the same init for an fp32, bf16 or fp64 model."""
    weight = adapter.lora_a.weight
    device = generator.device if generator is not None else torch.device("cpu")
    drawn = torch.empty(weight.shape, dtype=torch.float32, device=device)
    nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=generator)
    weight.copy_(drawn)
    adapter.lora_b.weight.zero_()
    adapter.lora_scale.fill_(1.0)


def _check_fused_block(block: nn.Module, where: str) -> bool:
    """Re-validates a patched block's lists (a fused module caching facts about its adapter lists defines
    ``check_adapter_lists(where)``); ``True`` when ``block`` is such a fused block."""
    check = getattr(block, "check_adapter_lists", None)
    if not callable(check):
        return False
    check(where)
    return True


def grow_tile_adapters(model: nn.Module, num_adapters: int, init: str = "nearest", *, old_grid=None,
                       new_grid=None, resolution: Optional[Sequence[int]] = None, config=None,
                       generator: Optional[torch.Generator] = None) -> GrowthReport:
    """Grows every block's per-tile adapter lists to ``num_adapters`` in place (see the module docstring).

    Args:
        model: a ``MonkeyVisionModel`` (patched or not), its ``transformer``, a bigger model holding one, or any
            module with Monkey-structured blocks (``attn.in_proj_lora``, ``attn.out_proj_lora``, ``mlp_lora``).
        num_adapters: adapters per list afterwards (>= the current count; equal: no adapter is added, the
            config's resolution is still updated).
        init: ``"nearest"``, ``"mean"`` or ``"fresh"``.
        old_grid, new_grid: ``(cols, rows)`` pairs or ``TileGrid`` s of the grid trained so far and of the new
            one. ``"nearest"`` needs both: ``old_grid`` defaults to the grid of the config's resolution
            (``tile_grid(*config.input_resolution, config)``), ``new_grid`` to the grid of ``resolution``; they
            must have ``n_old`` and ``num_adapters`` tiles. Optional for ``"mean"`` / ``"fresh"`` (checked when
            given).
        resolution: ``(width, height)`` in pixels to record in the config; default: the new grid's resized size
            (``cols * tile_size, rows * tile_size``) when ``new_grid`` is given, else the config's is kept.
        config: further config(s) to update besides the ``.config`` of ``model`` and its submodules (e.g. the
            ``MonkeyVisionModel``'s when ``model`` is its ``transformer``).
        generator: random generator of the ``"fresh"`` ``lora_a`` init (default: PyTorch's global CPU one). Draws
            are float32 on the generator's device, block by block, list by list (in_proj, out_proj, mlp), new
            adapter by new adapter, then cast to the adapter's dtype and device.
    Returns:
        A :class:`GrowthReport` (its ``new_parameters`` are what an optimizer built before lacks).
    Raises:
        ValueError: ``num_adapters`` < 1 or below the current count (adapters are never removed), an unknown
            ``init``, a model without adapter lists, lists of unequal length, bad or inconsistent grids.
    """
    _check_growth_arguments(model, num_adapters, init, generator)
    blocks, old_num = _blocks_to_grow(model, num_adapters)
    configs = _configs_of(model, config)
    tile_config = next((c for c in configs if hasattr(c, "tile_size")), None)
    new_pair, resolution = _new_grid_and_resolution(new_grid, resolution, num_adapters, tile_config)
    old_pair = _old_grid(old_grid, init, old_num, num_adapters, tile_config)
    sources = _initialisation_sources(init, old_num, num_adapters, old_pair, new_pair)

    report = GrowthReport(old_num_adapters=old_num, num_adapters=num_adapters, init=init, sources=sources,
                          resolution=resolution)
    for name, block, lists in blocks:
        for _, adapters in lists:
            report.new_parameters.extend(_append_adapters(adapters, sources, init, generator))
        report.blocks.append(name)
        if _check_fused_block(block, name or "model"):
            report.fused_blocks += 1
    for cfg in configs:
        _write_config(cfg, num_adapters, resolution)
    report.configs = configs
    for name, module in model.named_modules():
        count = module.__dict__.get("lora_repeat_num")
        if isinstance(count, int) and not isinstance(count, bool):
            module.lora_repeat_num = num_adapters
            report.modules.append(name)
    return report


def _check_growth_arguments(model, num_adapters, init, generator) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(num_adapters, bool) or not isinstance(num_adapters, int) or num_adapters < 1:
        raise ValueError(f"num_adapters must be an int >= 1, got {num_adapters!r}")
    if init not in GROWTH_INITS:
        raise ValueError(f"init must be one of {GROWTH_INITS}, got {init!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _blocks_to_grow(model: nn.Module, num_adapters: int):
    """``(blocks, n_old)``: the Monkey blocks (see :func:`find_adapter_blocks`) and their common list length."""
    blocks = find_adapter_blocks(model)
    if not blocks:
        raise ValueError(
            f"model ({type(model).__name__}) has no Monkey adapter lists: growth needs blocks with "
            "attn.in_proj_lora, attn.out_proj_lora and mlp_lora nn.ModuleLists of LoRA adapters"
        )
    lengths = {f"{name or 'model'}.{list_name}": len(lst) for name, _, lists in blocks for list_name, lst in lists}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"model: every adapter list must have the same length to grow them together, got {lengths}")
    old_num = next(iter(lengths.values()))
    if num_adapters < old_num:
        raise ValueError(f"num_adapters={num_adapters} is below the current {old_num} adapters per list: "
                         "growth never removes trained adapters")
    return blocks, old_num


def _new_grid_and_resolution(new_grid, resolution, num_adapters: int, tile_config):
    """``(new (cols, rows) or None, (width, height) to record or None)``, checked against each other, the
    config's tiling and ``num_adapters``."""
    if resolution is not None:
        if (not isinstance(resolution, (tuple, list)) or len(resolution) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in resolution)):
            raise ValueError(f"resolution must be a (width, height) pair of positive ints, got {resolution!r}")
        resolution = (int(resolution[0]), int(resolution[1]))
    tiled = None  # the grid the config tiles ``resolution`` into
    if resolution is not None and tile_config is not None:
        from .models.image_prep import tile_grid  # noqa: PLC0415 (models import transformers)

        grid = tile_grid(resolution[0], resolution[1], tile_config)
        tiled = (grid.n_cols, grid.n_rows)
    new_pair = _grid_pair("new_grid", new_grid) if new_grid is not None else tiled
    if new_grid is not None and tiled is not None and tiled != new_pair:
        raise ValueError(f"resolution={resolution} tiles as a {tiled[0]}x{tiled[1]} grid, but new_grid={new_pair}")
    if new_pair is not None and new_pair[0] * new_pair[1] != num_adapters:
        raise ValueError(f"new_grid {new_pair[0]}x{new_pair[1]} has {new_pair[0] * new_pair[1]} tiles, but "
                         f"num_adapters={num_adapters} (one adapter per tile)")
    if resolution is None and new_pair is not None and tile_config is not None:
        resolution = (new_pair[0] * tile_config.tile_size, new_pair[1] * tile_config.tile_size)
    return new_pair, resolution


def _old_grid(old_grid, init: str, old_num: int, num_adapters: int, tile_config) -> Optional[Tuple[int, int]]:
    """The trained grid ``(cols, rows)``: ``old_grid``, else (for ``"nearest"``) the config's resolution's grid
    when it has ``old_num`` tiles, else ``None``."""
    old_pair = _grid_pair("old_grid", old_grid) if old_grid is not None else None
    if old_pair is None and init == "nearest" and num_adapters > old_num and tile_config is not None:
        from .models.image_prep import tile_grid  # noqa: PLC0415

        current = _config_resolution(tile_config)
        if current is not None:
            grid = tile_grid(current[0], current[1], tile_config)
            if grid.num_tiles == old_num:
                old_pair = (grid.n_cols, grid.n_rows)
    if old_pair is not None and old_pair[0] * old_pair[1] != old_num:
        raise ValueError(f"old_grid {old_pair[0]}x{old_pair[1]} has {old_pair[0] * old_pair[1]} tiles, but the "
                         f"model has {old_num} adapters per list")
    return old_pair


def _initialisation_sources(init: str, old_num: int, num_adapters: int, old_pair, new_pair
                            ) -> Dict[int, Tuple[int, ...]]:
    """``{new index: old indices it is initialised from}`` (see :attr:`GrowthReport.sources`)."""
    new_indices = range(old_num, num_adapters)
    if init == "nearest" and num_adapters > old_num:
        if old_pair is None or new_pair is None:
            raise ValueError(
                f"init='nearest' needs the old and the new grid: pass old_grid=(cols, rows) "
                f"({'known' if old_pair else 'unknown: the config resolution does not tile into ' + str(old_num)})"
                f" and new_grid=(cols, rows) or resolution=(width, height) "
                f"({'known' if new_pair else 'unknown'})"
            )
        nearest = nearest_tile_sources(old_pair, new_pair)
        return {j: (nearest[j],) for j in new_indices}
    if init == "mean":
        return {j: tuple(range(old_num)) for j in new_indices}
    return {j: () for j in new_indices}


def _append_adapters(adapters: nn.ModuleList, sources: Dict[int, Tuple[int, ...]], init: str,
                     generator: Optional[torch.Generator]) -> List[nn.Parameter]:
    """Appends the new adapters (indices ``sources``, in order) to one list; returns their Parameters."""
    olds = list(adapters)
    parameters: List[nn.Parameter] = []
    for j in sorted(sources):
        template = olds[sources[j][0]] if init == "nearest" else olds[0]
        adapter = _new_adapter(template)  # "nearest": the copy IS the init
        if init == "mean":
            _set_mean(adapter, olds)
        elif init == "fresh":
            _set_fresh(adapter, generator)
        adapters.append(adapter)
        parameters.extend(adapter.parameters())
    return parameters


# ---------------------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------------------
def new_adapter_parameters(optimizer: torch.optim.Optimizer, model: nn.Module
                           ) -> List[Tuple[nn.Parameter, Optional[int]]]:
    """Adapter parameters of ``model`` the optimizer does not hold, each with the index of the param group that
    holds its counterpart (the same tensor of another adapter of its list: adapter 0 first, then 1, ...), or
    ``None`` when no counterpart is optimised (a frozen adapter list). In module order."""
    group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
    missing = []
    for _, _, lists in find_adapter_blocks(model):
        for _, lst in lists:
            named = [dict(adapter.named_parameters()) for adapter in lst]
            for params in named:
                for pname, p in params.items():
                    if id(p) in group_of:
                        continue
                    group = next((group_of[id(other[pname])] for other in named
                                  if pname in other and id(other[pname]) in group_of), None)
                    missing.append((p, group))
    return missing


def _check_optimizer(optimizer) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")


def add_new_adapters_to_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> List[nn.Parameter]:
    """Adds the adapters grown in ``model`` to ``optimizer`` IN PLACE: each new parameter joins the param group
    of its counterpart in the old adapters (so it gets that group's lr, weight decay, betas ...), with empty
    state. The group count is unchanged, so an LR scheduler built on ``optimizer`` keeps working. Parameters
    whose counterparts are not optimised (frozen lists) are left out. Returns the parameters added.

    (``Optimizer.add_param_group`` would add a new group instead, which schedulers built before do not know:
    they ``zip`` their per-group values with ``param_groups`` and would leave the new group's lr unscheduled.)
    """
    _check_optimizer(optimizer)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    added = []
    for p, group in new_adapter_parameters(optimizer, model):
        if group is None:
            continue
        optimizer.param_groups[group]["params"].append(p)
        added.append(p)
    return added


def rebuild_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """A new optimizer of ``optimizer``'s class over the same param groups (same hyper-parameters, the same
    parameters in the same order) plus the adapters grown in ``model`` (each in the group of its counterpart,
    see :func:`add_new_adapters_to_optimizer`), with the old parameters' state carried over (moved, not copied:
    Adam's ``exp_avg`` / ``exp_avg_sq`` / ``step``, SGD's ``momentum_buffer``, ...). New adapters start with
    empty state. Use the returned optimizer from now on and drop the old one (it shares the state tensors);
    build any LR scheduler again on the new one (a scheduler's ``last_epoch`` can be passed on).

    Raises:
        ValueError: not an optimizer / module, or an optimizer class that cannot be rebuilt from its groups and
            ``defaults`` (``cls(param_groups, **defaults)``).
    """
    _check_optimizer(optimizer)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    groups = [{key: value for key, value in group.items() if key != "params"} | {"params": list(group["params"])}
              for group in optimizer.param_groups]
    for p, group in new_adapter_parameters(optimizer, model):
        if group is not None:
            groups[group]["params"].append(p)
    cls = type(optimizer)
    try:
        rebuilt = cls(groups, **optimizer.defaults)
    except TypeError:
        try:
            rebuilt = cls(groups)
        except TypeError as error:
            raise ValueError(f"optimizer: cannot rebuild a {cls.__name__} from its param groups and defaults "
                             f"({error}); use add_new_adapters_to_optimizer instead") from error
    for p, state in optimizer.state.items():
        rebuilt.state[p] = state
    return rebuilt

