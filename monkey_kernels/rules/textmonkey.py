"""TextMonkey's vision encoder: ONE fused block call per layer over every window of every image, and the global
views in the same call (the ``textmonkey_transformer``, ``textmonkey_block`` and ``textmonkey_encoder`` rules).

What the public code does (``monkey_model/text_monkey/visual_text.py``). ``VisionTransformer.forward(x,
lora_idx=None, add_window=False)`` runs one patch conv over the whole image, cuts the patch grid into windows of
32 x 32 patches (448 px; a nested list ``x[i][j]``, row-major), adds the positions and ``ln_pre`` per window, and
hands the list to its ``TransformerBlock``, whose forward loops over the windows INSIDE every layer: 48 blocks x
``n`` windows calls, each on one window of every image. Before the blocks of ``transformer.window_pos`` (2, 6, 24,
46) the windows are stitched into the whole grid, run through ``transformer.window_attention[k]`` (a shifted-window
"cross-window" attention, in order) and cut again. Adapters: ``lora_idx`` ``None`` -> none; ``0`` -> adapter 0 for
every window; any other int -> window ``k`` uses adapter ``k``. ``attn_pool``, ``ln_post`` and ``proj`` then run per
window. ``encode(image_paths, lora_idx=None, input_image=None)`` loads and transforms the images, passes
``lora_idx == 1`` as 0, runs the windows, the token filter + Perceiver (``downresampler``, keeping ``r`` tokens)
and, with ``use_global``, a SECOND pass: the bicubic 448 px global view through the same blocks without adapters.

What it recognises (by structure and call contract, so a user's copy of the public code is patched too):

- ``textmonkey_transformer``: a module with ``resblocks`` (an ``nn.ModuleList`` of Monkey-structured blocks,
  :mod:`monkey_kernels.monkey_structure`, whose adapter lists may be EMPTY: the release recipe builds them with
  ``lora_repeat_num=0``), ``window_pos`` (ints), ``add_window`` (bool) and, when it stitches,
  ``window_attention`` (an ``nn.ModuleList`` with a module per stitch); its class ``forward`` is exactly
  ``forward(x, attn_mask=None, lora_idx=None, image_size=<any>)`` and reads ``self.resblocks``,
  ``self.window_pos``, ``self.window_attention`` and ``self.add_window`` (checked on its source); every block is a
  self-attention block with ``forward(q_x, k_x=None, v_x=None, attn_mask=None, lora_idx=None)``. Its forward is
  replaced on the instance by :func:`fused_transformer_forward` (the same call and layouts: a nested window list
  in, the same list back; a tensor: the plain loop without adapters).
- ``textmonkey_block``: the blocks of such a transformer -> :class:`~monkey_kernels.rules.monkey_vit.
  FusedMonkeyBlock` (the Monkey family's fused block, with empty adapter lists allowed).
- ``textmonkey_encoder``: a module with ``conv1``, ``positional_embedding``, ``ln_pre``, ``transformer``
  (patched by the rule above), ``attn_pool``, ``ln_post``, ``proj``, ``image_transform``, the bools
  ``use_global`` / ``resampler`` and the int ``r`` (and ``downresampler`` when ``resampler``), whose class
  ``forward`` is exactly ``forward(x, lora_idx=None, add_window=False)`` reading ``conv1``,
  ``positional_embedding``, ``ln_pre``, ``transformer``, ``attn_pool``, ``ln_post`` and ``proj``, and whose
  class ``encode`` is exactly ``encode(image_paths, lora_idx=None, input_image=None)`` reading
  ``image_transform``, ``resampler``, ``downresampler``, ``r`` and ``use_global``. Its ``forward`` and ``encode``
  are replaced on the instance (:func:`fused_encoder_forward`, :func:`fused_encode`).

Anything else with TextMonkey's keyword (``lora_idx``) is left alone and listed in ``PatchReport.skipped`` with the
reason. The checks read names and signatures, not every statement: a copy that keeps them but changes what the
window loop does is not detected.

What the fused forwards do. Every window of every image is a batch row of ``[rows, 32 * 32, width]``
(window-major: row ``k * B + b`` is window ``k`` of image ``b``; tokens row-major inside the window), each a
segment with its adapter (``-1`` = none), so each layer is ONE fused block call (three ``multi_lora_linear`` s)
instead of one per window. At the cross-window layers the window rows are stitched into the ``[B, width, H, W]``
grid, run through the model's own ``window_attention[k]`` module (unchanged: every quirk of the original, its
-100 mask on the padded grid and its dropout included) and cut again. ``encode`` appends the global views
(``32 * 32`` tokens too) to the same rows with adapter ``-1``, skipped by the stitching: ONE pass for the whole
encode. ``attn_pool``, ``ln_post`` and ``proj`` run once over all rows; the token filter and Perceiver are the
model's own ``downresampler``. Outputs equal the original's up to rounding; in training the dropout masks differ
(the fused ops draw their own), as does the RNG stream.

Hard-coded in the original and read here with the same defaults: the window side (32 patches; a module may
set ``window_patches``) and the global view side (448 px; ``global_view_size``). What the original cannot run
raises a ``ValueError`` here before any work (see :func:`check_window_grid`): an image whose patch grid is not a
multiple of the window, a stitching model fed a grid other than the one its cross-window attention was built for
(the original fails in the position table or the Swin mask, or -- for batches whose window count happens to
divide -- silently applies a mask of another grid), a non-square stitched grid (the original's reshape to
``(G, G)``), and more windows than adapters (the original's ``IndexError``).
"""
from __future__ import annotations

import inspect
import random
from io import BytesIO
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..call_contract import ANY_DEFAULT, attributes_used_problem, class_forward, forward_parameters_problem
from ..monkey_structure import adapter_count, adapter_lists, block_problem, fusion_problem
from ..patching import InstanceForward, PatchOptions, PatchRule, register_builtin_rule, rule_of
from .monkey_vit import fuse_block, run_blocks

__all__ = [
    "WINDOW_PATCHES",
    "GLOBAL_VIEW_SIZE",
    "WindowGrid",
    "window_adapter_ids",
    "check_window_grid",
    "grid_to_window_rows",
    "window_rows_to_grid",
    "load_images",
    "encoder_pass",
    "fused_transformer_forward",
    "fused_encoder_forward",
    "fused_encode",
    "transformer_problem",
    "encoder_problem",
    "TRANSFORMER_RULE",
    "BLOCK_RULE",
    "ENCODER_RULE",
]

WINDOW_PATCHES = 32  # the original's window side in patches (448 px at patch 14), a literal in its code
GLOBAL_VIEW_SIZE = 448  # the original's global view side in pixels, a literal in encode

_CLAIM_ATTR = "_monkey_kernels_textmonkey_claimed"  # on a reference block whose transformer the rule patches
_BLOCK_CALL = "TextMonkey's block forward(q_x, k_x=None, v_x=None, attn_mask=None, lora_idx=None)"
_TRANSFORMER_CALL = "TextMonkey's forward(x, attn_mask=None, lora_idx=None, image_size=(64, 64))"
_ENCODER_CALL = "TextMonkey's VisionTransformer.forward(x, lora_idx=None, add_window=False)"
_ENCODE_CALL = "TextMonkey's encode(image_paths, lora_idx=None, input_image=None)"
_TRANSFORMER_READS = ("resblocks", "window_pos", "window_attention", "add_window")
_ENCODER_PARTS = ("conv1", "positional_embedding", "ln_pre", "transformer", "attn_pool", "ln_post", "proj")
_ENCODE_READS = ("image_transform", "resampler", "downresampler", "r", "use_global")


# ---------------------------------------------------------------------------------------------------------
# Windows: adapters, grids, rows
# ---------------------------------------------------------------------------------------------------------
def window_adapter_ids(lora_idx, windows: int) -> List[int]:
    """The adapter of each window (row-major; ``-1`` = none) for the ``lora_idx`` the window loop receives:
    ``None`` -> none; ``0`` -> adapter 0 everywhere; any other int -> window ``k`` uses adapter ``k`` (the value
    itself is not an index). ``encode`` hands ``lora_idx == 1`` on as 0 (:func:`fused_encode`).

    Raises:
        ValueError: ``lora_idx`` is not ``None`` or an int (a bool included)."""
    if lora_idx is None:
        return [-1] * windows
    if isinstance(lora_idx, bool) or not isinstance(lora_idx, int):
        raise ValueError(f"lora_idx must be None or an int, got {lora_idx!r}")
    return [0] * windows if lora_idx == 0 else list(range(windows))


class WindowGrid:
    """How the patch grid ``[B, C, H, W]`` of ``batch`` images splits into ``rows x cols`` windows of ``patches x
    patches`` (window ``k = i * cols + j``; ``count`` of them)."""

    def __init__(self, batch: int, height: int, width: int, patches: int) -> None:
        for name, value in (("batch", batch), ("height", height), ("width", width), ("patches", patches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.batch, self.height, self.width, self.patches = batch, height, width, patches
        self.rows, self.cols = height // patches, width // patches

    @property
    def count(self) -> int:
        return self.rows * self.cols

    @property
    def tokens(self) -> int:
        return self.patches * self.patches


def grid_to_window_rows(grid: torch.Tensor, layout: WindowGrid) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[windows * B, patches ** 2, C]``: row ``k * B + b`` is window ``k`` of image ``b``,
    its tokens row-major (the original's ``reshape(B, C, -1).permute(0, 2, 1)`` of each window)."""
    if grid.dim() != 4 or (grid.shape[0], *grid.shape[2:]) != (layout.batch, layout.height, layout.width) \
            or layout.height % layout.patches or layout.width % layout.patches:
        raise ValueError(f"grid must be [{layout.batch}, C, {layout.height}, {layout.width}] with sides multiples of "
                         f"{layout.patches}, got {tuple(grid.shape)}")
    b, c, p = layout.batch, grid.shape[1], layout.patches
    rows = grid.view(b, c, layout.rows, p, layout.cols, p).permute(2, 4, 0, 3, 5, 1)
    return rows.reshape(layout.count * b, p * p, c)


def window_rows_to_grid(rows: torch.Tensor, layout: WindowGrid) -> torch.Tensor:
    """The inverse of :func:`grid_to_window_rows`: a contiguous ``[B, C, H, W]`` (the original's
    ``reconstruct_matrix``)."""
    if rows.dim() != 3 or tuple(rows.shape[:2]) != (layout.count * layout.batch, layout.tokens):
        raise ValueError(f"rows must be [{layout.count * layout.batch}, {layout.tokens}, C] (windows x images, "
                         f"tokens), got {tuple(rows.shape)}")
    b, p, c = layout.batch, layout.patches, rows.shape[-1]
    grid = rows.view(layout.rows, layout.cols, b, p, p, c).permute(2, 5, 0, 3, 1, 4)
    return grid.reshape(b, c, layout.height, layout.width)


def _window_patches(module: nn.Module) -> int:
    patches = getattr(module, "window_patches", WINDOW_PATCHES)
    if isinstance(patches, bool) or not isinstance(patches, int) or patches < 1:
        raise ValueError(f"{type(module).__name__}.window_patches must be a positive int, got {patches!r}")
    return patches


def _stitch_layers(transformer: nn.Module) -> Dict[int, int]:
    """``{layer: k}``: before block ``layer`` the windows are stitched and run through ``window_attention[k]``
    (the original's counter: the k-th layer, in layer order, that is in ``window_pos``)."""
    if not transformer.add_window:
        return {}
    layers = [layer for layer in range(len(transformer.resblocks)) if layer in transformer.window_pos]
    return {layer: k for k, layer in enumerate(layers)}


def check_window_grid(transformer: nn.Module, layout: WindowGrid, image_size, where: str) -> None:
    """Raises ``ValueError`` (naming ``where``) for a grid the original cannot run: not a multiple of the window
    (its short windows fail the reshape), and with stitching: fewer ``window_attention`` modules than stitches,
    an ``image_size`` that is not the grid's, a non-square grid, or a grid other than the one a cross-window
    module was built for (its ``shift_attn.input_resolution``: the Swin mask and position table are fixed at
    construction)."""
    p = layout.patches
    if layout.height % p or layout.width % p or layout.rows < 1 or layout.cols < 1:
        raise ValueError(f"{where}: the patch grid {layout.height}x{layout.width} is not a multiple of the "
                         f"{p}x{p}-patch window (images must be multiples of {p} patches per side; the original "
                         f"cuts short windows and fails on their reshape)")
    stitches = _stitch_layers(transformer)
    if not stitches:
        return
    modules = getattr(transformer, "window_attention", None)
    if not isinstance(modules, nn.ModuleList) or len(modules) < len(stitches):
        raise ValueError(f"{where}: the transformer stitches the windows before blocks {sorted(stitches)} but has "
                         f"{len(modules) if isinstance(modules, nn.ModuleList) else 0} window_attention modules")
    if tuple(image_size) != (layout.height, layout.width):
        raise ValueError(f"{where}: image_size={tuple(image_size)} is not the stitched grid "
                         f"{layout.height}x{layout.width} (the cross-window attention views it as that)")
    if layout.height != layout.width:
        raise ValueError(f"{where}: the cross-window attention runs square grids only (the original reshapes its "
                         f"output to (G, G)); the stitched grid is {layout.height}x{layout.width} patches")
    for layer, k in stitches.items():
        built = getattr(getattr(modules[k], "shift_attn", None), "input_resolution", None)
        if built is not None and tuple(built) != (layout.height, layout.width):
            raise ValueError(f"{where}: window_attention[{k}] (before block {layer}) was built for a "
                             f"{built[0]}x{built[1]} patch grid, the images give {layout.height}x{layout.width} "
                             f"(TextMonkey runs only the square size it was constructed for: build the model with "
                             f"that image_size)")


def _check_adapters(window_ids: Sequence[int], transformer: nn.Module, batch: int, grid: str, lora_idx,
                    names: Optional[Sequence[str]]) -> None:
    """``ValueError`` naming the image and the counts when the windows need more adapters than every block has
    (where the original fails with an ``IndexError`` on the adapter list)."""
    needed = max(window_ids, default=-1) + 1
    have = min(adapter_count(block) for block in transformer.resblocks)
    if needed > have:
        image = f"image 0 ({names[0]!r})" if names else "image 0"
        mode = ("adapter 0 for every window" if needed == 1 else
                f"window k with adapter k (lora_idx={lora_idx!r})")
        raise ValueError(f"{image} (as every image of this call, {batch}) has {len(window_ids)} windows ({grid}) "
                         f"run with {mode}, but the model has {have} per-window adapters (lora_repeat_num); grow "
                         f"them with monkey_kernels.growth.grow_tile_adapters")


def _stitcher(transformer: nn.Module, layout: WindowGrid, image_size) -> Optional[Callable]:
    """The ``before_block`` of :func:`~monkey_kernels.rules.monkey_vit.run_blocks`: at a cross-window layer, the
    first ``windows * B`` rows (the windows) are stitched, run through ``window_attention[k]`` and cut; the rows
    after them (global views) pass untouched."""
    stitches = _stitch_layers(transformer)
    if not stitches:
        return None
    window_rows = layout.count * layout.batch

    def before_block(layer: int, h: torch.Tensor) -> torch.Tensor:
        k = stitches.get(layer)
        if k is None:
            return h
        whole = transformer.window_attention[k](window_rows_to_grid(h[:window_rows], layout), image_size)
        windows = grid_to_window_rows(whole, layout)
        return windows if window_rows == h.shape[0] else torch.cat([windows, h[window_rows:]])

    return before_block


# ---------------------------------------------------------------------------------------------------------
# The fused forwards
# ---------------------------------------------------------------------------------------------------------
def fused_transformer_forward(self, x, attn_mask: Optional[torch.Tensor] = None, lora_idx=None, image_size=(64, 64)):
    """Patched ``TransformerBlock.forward`` (installed on the instance): the original's call and layouts.

    ``x`` a nested window list ``x[i][j]`` of ``[tokens, B, width]`` (row-major): ONE fused block call per layer
    over every window, stitched before the ``window_pos`` layers; the windows are written back into the same
    list, which is returned (as the original does). ``x`` a tensor ``[tokens, B, width]``: the plain loop without
    adapters (the original ignores ``lora_idx`` there)."""
    if not isinstance(x, list):
        return run_blocks(self, x.transpose(0, 1), attn_mask).transpose(0, 1)
    flat = [window for row in x for window in row]
    if not flat or any(not isinstance(w, torch.Tensor) or w.dim() != 3 for w in flat):
        raise ValueError("x must be a nested list of windows [tokens, batch, width] (rows of them) or a tensor")
    if len({tuple(w.shape) for w in flat}) != 1:
        raise ValueError(f"x: every window must have one shape, got {sorted({tuple(w.shape) for w in flat})}")
    tokens, batch, width = flat[0].shape
    p = _window_patches(self)
    stitching = bool(_stitch_layers(self))
    if stitching and (len({len(row) for row in x}) != 1 or tokens != p * p):
        raise ValueError(f"x: stitching needs equal rows of {p}x{p}-token windows, got rows of "
                         f"{[len(row) for row in x]} windows of {tokens} tokens")
    layout = WindowGrid(batch, len(x) * p, len(x[0]) * p, p) if stitching else None
    if layout is not None:
        check_window_grid(self, layout, image_size, "x")
    window_ids = window_adapter_ids(lora_idx, len(flat))
    _check_adapters(window_ids, self, batch, f"rows of {[len(row) for row in x]}", lora_idx, None)
    ids = [a for a in window_ids for _ in range(batch)]
    rows = torch.stack(flat).transpose(1, 2).reshape(len(flat) * batch, tokens, width)
    device_ids = torch.tensor(ids, dtype=torch.int64, device=rows.device)
    before = _stitcher(self, layout, image_size) if layout is not None else None
    out = run_blocks(self, rows, attn_mask, device_ids, sorted({a for a in ids if a >= 0}), before_block=before)
    out = out.view(len(flat), batch, tokens, width)
    k = 0
    for row in x:
        for j in range(len(row)):
            row[j] = out[k].transpose(0, 1).contiguous()  # [tokens, B, width], as the original's blocks return
            k += 1
    return x


def _cast(visual: nn.Module) -> Tuple[torch.dtype, torch.device]:
    """The original's ``x.to(dtype=transformer.get_cast_dtype(), device=transformer.get_cast_device())``."""
    transformer = visual.transformer
    if callable(getattr(transformer, "get_cast_dtype", None)) and callable(getattr(transformer, "get_cast_device",
                                                                                   None)):
        return transformer.get_cast_dtype(), transformer.get_cast_device()
    return visual.conv1.weight.dtype, visual.conv1.weight.device


def _embed(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Positions (bicubically resized to the token count, as the original) and ``ln_pre`` on ``[N, L, C]``."""
    from ..models.monkey_vision import get_abs_pos  # noqa: PLC0415 (imports transformers: only when run)

    return visual.ln_pre(tokens + get_abs_pos(visual.positional_embedding, tokens.size(1)))


def _check_images(images, name: str) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a non-empty [N, C, H, W] image tensor, got {shape}")


def encoder_pass(visual: nn.Module, images: torch.Tensor, lora_idx=None,
                 global_images: Optional[torch.Tensor] = None,
                 names: Optional[Sequence[str]] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """ONE fused pass over the windows of ``images`` (and the ``global_images``, without adapters).

    Args:
        visual: a patched TextMonkey ``VisionTransformer``.
        images: ``[B, 3, H, W]``, whole images (``H``, ``W`` multiples of the window in pixels).
        lora_idx: what the original's window loop receives (see :func:`window_adapter_ids`).
        global_images: ``[B, 3, h, w]`` or ``None``: views run without adapters nor stitching (in the same block
            calls when their patch grid has the windows' token count, else in a second pass).
        names: the images' paths, for error messages.
    Returns:
        ``(local [B, windows * Q, D], global [B, Q, D] or None)``: per image its windows' features row-major
        (the original's ``forward(images, lora_idx, add_window=True)``) and its global view's
        (``forward(global_images)``).
    """
    _check_images(images, "images")
    dtype, device = _cast(visual)
    transformer = visual.transformer
    grid = visual.conv1(images.to(dtype=dtype, device=device))
    batch, _, height, width = grid.shape
    layout = WindowGrid(batch, height, width, _window_patches(visual))
    check_window_grid(transformer, layout, (height, width), "images")
    window_ids = window_adapter_ids(lora_idx, layout.count)
    _check_adapters(window_ids, transformer, batch, f"{layout.rows}x{layout.cols}", lora_idx, names)
    ids = [a for a in window_ids for _ in range(batch)]
    rows = _embed(visual, grid_to_window_rows(grid, layout))
    separate_global = None
    if global_images is not None:
        _check_images(global_images, "global_images")
        if global_images.shape[0] != batch:
            raise ValueError(f"global_images must hold one view per image ({batch}), got {global_images.shape[0]}")
        global_grid = visual.conv1(global_images.to(dtype=dtype, device=device))
        global_rows = _embed(visual, global_grid.flatten(2).transpose(1, 2))
        if global_rows.shape[1] == layout.tokens:
            rows = torch.cat([rows, global_rows])
            ids = ids + [-1] * batch
        else:  # another token count: its own pass (the original's patch size and 448 px view never get here)
            separate_global = global_rows
    device_ids = torch.tensor(ids, dtype=torch.int64, device=rows.device)
    h = run_blocks(transformer, rows, None, device_ids, sorted({a for a in ids if a >= 0}),
                   before_block=_stitcher(transformer, layout, (height, width)))
    pooled = visual.ln_post(visual.attn_pool(h)) @ visual.proj  # [rows, Q, D]
    window_rows = layout.count * batch
    queries, dim = pooled.shape[1], pooled.shape[2]
    local = pooled[:window_rows].view(layout.count, batch, queries, dim).transpose(0, 1)
    local = local.reshape(batch, layout.count * queries, dim)
    global_features = None
    if global_images is not None:
        if separate_global is None:
            global_features = pooled[window_rows:]
        else:
            global_features = visual.ln_post(visual.attn_pool(run_blocks(transformer, separate_global))) @ visual.proj
    return local, global_features


def fused_encoder_forward(self, x: torch.Tensor, lora_idx=None, add_window=False) -> torch.Tensor:
    """Patched ``VisionTransformer.forward`` (installed on the instance), the original's outputs:
    ``add_window`` -> ``[B, windows * Q, D]`` from ONE fused pass over every window; otherwise the plain pass
    over the whole patch grid without adapters -> ``[B, Q, D]``."""
    if add_window:
        return encoder_pass(self, x, lora_idx)[0]
    _check_images(x, "x")
    dtype, device = _cast(self)
    grid = self.conv1(x.to(dtype=dtype, device=device))
    h = run_blocks(self.transformer, _embed(self, grid.flatten(2).transpose(1, 2)))
    return self.ln_post(self.attn_pool(h)) @ self.proj


def load_images(visual: nn.Module, image_paths: Sequence[str]) -> torch.Tensor:
    """The original ``encode``'s loading: each path opened with PIL (``http(s)://`` through ``requests``),
    converted to RGB, in training re-encoded as JPEG with quality ``random.randint(20, 100)`` (Python's
    ``random``) and reopened, then ``visual.image_transform``; stacked ``[N, 3, H, W]``."""
    if isinstance(image_paths, (str, bytes)) or not isinstance(image_paths, (list, tuple)) or not image_paths \
            or not all(isinstance(p, str) for p in image_paths):
        raise ValueError(f"image_paths must be a non-empty list of paths (str), got {image_paths!r}")
    from PIL import Image  # noqa: PLC0415 (only when images are loaded)

    images = []
    for path in image_paths:
        if path.startswith("http://") or path.startswith("https://"):
            import requests  # noqa: PLC0415

            image = Image.open(requests.get(path, stream=True).raw)
        else:
            image = Image.open(path)
        image = image.convert("RGB")
        if visual.training:  # the original's imitation of transmission loss
            buffer = BytesIO()
            image.save(buffer, format="JPEG", quality=random.randint(20, 100))
            image = Image.open(BytesIO(buffer.getvalue()))
        images.append(visual.image_transform(image))
    return torch.stack(images, dim=0)


def fused_encode(self, image_paths, lora_idx=None, input_image=None) -> torch.Tensor:
    """Patched ``VisionTransformer.encode`` (installed on the instance), the original's output
    ``[N, (r if resampler else windows * Q) + (Q if use_global), D]`` from ONE encoder pass over every window and
    global view (the original runs two: the windows, then the global views)."""
    if lora_idx is not None and (isinstance(lora_idx, bool) or not isinstance(lora_idx, int)):
        raise ValueError(f"lora_idx must be None or an int, got {lora_idx!r}")
    if input_image is None:
        images, names = load_images(self, image_paths), list(image_paths)
    else:
        _check_images(input_image, "input_image")
        images, names = input_image, None
    size = getattr(self, "global_view_size", GLOBAL_VIEW_SIZE)
    global_images = F.interpolate(images, size=(size, size), mode="bicubic") if self.use_global else None
    local, global_features = encoder_pass(self, images, 0 if lora_idx == 1 else lora_idx, global_images, names)
    if self.resampler:
        local = self.downresampler(local, r=self.r)
    if self.use_global:
        return torch.cat([local, global_features], dim=1)
    return local


# ---------------------------------------------------------------------------------------------------------
# Recognition: structure and call contract
# ---------------------------------------------------------------------------------------------------------
def _signature_problem(function, names: Sequence[str], defaults: dict, expected: str) -> Optional[str]:
    """``forward_parameters_problem`` with the parameters also in ``names``' order (positional calls)."""
    problem = forward_parameters_problem(function, keywords=names[1:], first=names[0], expected=expected,
                                         defaults=defaults)
    if problem is not None:
        return problem
    order = list(inspect.signature(function).parameters)[1:]
    if order != list(names):
        return f"forward({', '.join(order)}) takes its parameters in another order; {expected} expected"
    return None


def _takes_lora_idx(module: nn.Module) -> bool:
    try:
        return "lora_idx" in inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False


def block_contract_problem(block: nn.Module) -> Optional[str]:
    """Why a TextMonkey block cannot become a fused block under the fused transformer forward, or ``None``."""
    problem = block_problem(block, allow_empty=True) or fusion_problem(block)
    if problem is not None:
        return problem
    forward, problem = class_forward(block)
    if problem is not None:
        return problem
    return forward_parameters_problem(forward, keywords=("attn_mask", "lora_idx"), optional=("k_x", "v_x"),
                                      expected=_BLOCK_CALL)


def _looks_like_transformer(module: nn.Module) -> bool:
    """A container of Monkey-structured blocks with TextMonkey's keyword or window positions."""
    blocks = getattr(module, "resblocks", None)
    return (isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and rule_of(module) is None
            and any(adapter_lists(b) is not None for b in blocks)
            and (hasattr(module, "window_pos") or _takes_lora_idx(module)))


def transformer_problem(module: nn.Module) -> Optional[str]:
    """Why a module holding ``resblocks`` cannot run :func:`fused_transformer_forward`, or ``None``."""
    forward, problem = class_forward(module)
    if problem is not None:
        return problem
    problem = (_signature_problem(forward, ("x", "attn_mask", "lora_idx", "image_size"),
                                  {"image_size": ANY_DEFAULT}, _TRANSFORMER_CALL)
               or attributes_used_problem(forward, _TRANSFORMER_READS))
    if problem is not None:
        return problem
    positions = getattr(module, "window_pos", None)
    if not isinstance(positions, (list, tuple)) or any(isinstance(p, bool) or not isinstance(p, int)
                                                       for p in positions):
        return f"window_pos must be a list of ints, got {positions!r}"
    if not isinstance(getattr(module, "add_window", None), bool):
        return f"add_window must be a bool, got {getattr(module, 'add_window', None)!r}"
    stitches = _stitch_layers(module)
    modules = getattr(module, "window_attention", None)
    if stitches and (not isinstance(modules, nn.ModuleList) or len(modules) < len(stitches)):
        return (f"it stitches before blocks {sorted(stitches)} but has no window_attention ModuleList with "
                f"{len(stitches)} modules")
    for i, block in enumerate(module.resblocks):
        problem = block_contract_problem(block)
        if problem is not None:
            return f"resblocks.{i}: {problem}"
    return None


def _transformer_to_fused(module: nn.Module, options: PatchOptions) -> nn.Module:
    for block in module.resblocks:  # the block rule (next) fuses exactly these
        block.__dict__[_CLAIM_ATTR] = True
    module.forward = InstanceForward(fused_transformer_forward, module)
    return module


def _transformer_to_reference(module: nn.Module) -> nn.Module:
    module.__dict__.pop("forward", None)
    for block in module.resblocks:
        block.__dict__.pop(_CLAIM_ATTR, None)
    return module


def _is_claimed_block(module: nn.Module) -> bool:
    return bool(module.__dict__.get(_CLAIM_ATTR))


def _block_skip_reason(module: nn.Module) -> Optional[str]:
    if adapter_lists(module) is None or _is_claimed_block(module) or not _takes_lora_idx(module):
        return None
    problem = block_contract_problem(module)
    if problem is not None:
        return problem
    return ("is not in a container the textmonkey_transformer rule patches; a fused block is only called by that "
            "fused loop")


def _block_to_fused(block: nn.Module, options: PatchOptions) -> nn.Module:
    return fuse_block(block, options.backend, allow_empty=True)


def _looks_like_encoder(module: nn.Module) -> bool:
    transformer = getattr(module, "transformer", None)
    return (all(hasattr(module, name) for name in _ENCODER_PARTS) and callable(getattr(module, "encode", None))
            and isinstance(transformer, nn.Module)
            and (rule_of(transformer) == "textmonkey_transformer" or _looks_like_transformer(transformer)))


def encoder_problem(module: nn.Module) -> Optional[str]:
    """Why a TextMonkey-structured ``VisionTransformer`` cannot take :func:`fused_encoder_forward` and
    :func:`fused_encode`, or ``None``."""
    if rule_of(module.transformer) != "textmonkey_transformer":
        return "its transformer was not patched by the textmonkey_transformer rule (see that entry)"
    if not isinstance(module.conv1, nn.Conv2d):
        return f"conv1 is a {type(module.conv1).__name__}, not an nn.Conv2d"
    for name, kind in (("use_global", bool), ("resampler", bool), ("r", int)):
        value = getattr(module, name, None)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"{name} must be a {kind.__name__}, got {value!r}"
    if not callable(getattr(module, "image_transform", None)):
        return "it has no callable image_transform (encode loads images with it)"
    if module.resampler and not isinstance(getattr(module, "downresampler", None), nn.Module):
        return "resampler is set but it has no downresampler module"
    forward, problem = class_forward(module)
    if problem is not None:
        return problem
    problem = (_signature_problem(forward, ("x", "lora_idx", "add_window"), {"add_window": False}, _ENCODER_CALL)
               or attributes_used_problem(forward, _ENCODER_PARTS))
    if problem is not None:
        return problem
    if "encode" in module.__dict__:
        return "an instance-level encode is installed over the class's"
    encode = type(module).encode
    problem = (_signature_problem(encode, ("image_paths", "lora_idx", "input_image"), {}, _ENCODE_CALL)
               or attributes_used_problem(encode, _ENCODE_READS))
    if problem is not None:
        return f"encode: {problem}"
    return None


def _encoder_to_fused(module: nn.Module, options: PatchOptions) -> nn.Module:
    module.forward = InstanceForward(fused_encoder_forward, module)
    module.encode = InstanceForward(fused_encode, module)
    return module


def _encoder_to_reference(module: nn.Module) -> nn.Module:
    module.__dict__.pop("encode", None)
    module.__dict__.pop("forward", None)
    return module


TRANSFORMER_RULE = register_builtin_rule(PatchRule.by_structure(
    "textmonkey_transformer", _looks_like_transformer, transformer_problem, _transformer_to_fused,
    _transformer_to_reference, kinds={"window_loop_one_call_per_layer": 1},
    description=("resblocks of Monkey-structured blocks (adapter lists may be empty) with window_pos, add_window "
                 "and window_attention, run by TextMonkey's forward(x, attn_mask=None, lora_idx=None, image_size) "
                 "with blocks forward(q_x, k_x=None, v_x=None, attn_mask=None, lora_idx=None)"),
))
BLOCK_RULE = register_builtin_rule(PatchRule(
    "textmonkey_block", _is_claimed_block, _block_to_fused, lambda fused: fused.to_reference(),
    kinds={"attn.in_proj": 1, "attn.out_proj": 1, "mlp.c_proj": 1}, skip_reason=_block_skip_reason,
    after=("textmonkey_transformer",),
    description="a TextMonkey block inside a container the textmonkey_transformer rule patches",
))
ENCODER_RULE = register_builtin_rule(PatchRule.by_structure(
    "textmonkey_encoder", _looks_like_encoder, encoder_problem, _encoder_to_fused, _encoder_to_reference,
    kinds={"encode_one_pass": 1}, after=("textmonkey_block",),
    description=("TextMonkey's VisionTransformer (conv1, positional_embedding, ln_pre, a transformer the rules "
                 "above patch, attn_pool, ln_post, proj) with forward(x, lora_idx=None, add_window=False) and "
                 "encode(image_paths, lora_idx=None, input_image=None)"),
))
