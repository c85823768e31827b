r"""``MonkeyImageProcessor``: a transformers ``BaseImageProcessor`` for Monkey's tiled, per-tile-LoRA encoder.

Torch only (no torchvision; PIL only to accept PIL images). One call turns a batch of images of any sizes into
the packed views of all of them, ``pixel_values [total_views, 3, T, T]``, with per-view adapter ids.

Pipeline for each image of size ``w x h`` (the rules of the peers, reproduced exactly):

1. **Pixel budget** (LLaMA-Factory's ``image_max_pixels`` / ``image_min_pixels``, applied before tiling): if
   ``w * h > image_max_pixels``, both sides are scaled by ``sqrt(image_max_pixels / (w * h))`` and truncated with
   ``int()``; then, on the result, if ``w * h < image_min_pixels`` the mirror rule scales up (again ``int()``).
   ``None`` disables a bound (the default: the Monkey release has no budget; LLaMA-Factory's defaults are
   ``768 * 768`` and ``32 * 32``). A side truncated to 0 is an error naming the image.
2. **Grid**:

   - ``tiling="monkey"`` (the release): the image is resized to the requested ``resolution=(W, H)`` and cut into
     ``T x T`` windows at stride ``T``, row by row. For sizes that are not multiples of ``T``, the grid is
     :func:`monkey_kernels.models.tile_grid`'s: each side is rounded to the nearest multiple of ``T`` (halves up,
     at least one tile), and the image is resized straight to ``(cols * T, rows * T)`` (so 1544x896 -> 3x2 tiles,
     the image squeezed to 1344x896; the release's sliding window would instead crop the 200 px remainder).
     ``resolution=None`` uses each image's own (budgeted) size, so a batch mixes grids. The global view (the
     resized, normalised image brought back to ``T x T`` with ``F.interpolate(mode="bicubic")``, as the release
     does) comes LAST, always (also for a 1x1 grid).
   - ``tiling="textmonkey"`` (TextMonkey's ``encode``): the image is resized EXACTLY to the model's
     ``resolution=(W, H)`` (its ``image_size``; multiples of ``T``: the windows are ``T x T`` regions of the patch
     grid, row by row; TextMonkey's cross-window attention needs ``W == H``) and kept WHOLE: ``pixel_values`` is
     ``[N, 3, H, W]``, what ``visual.encode(None, input_image=pixel_values)`` takes (the encoder cuts the windows
     from its patch grid). ``global_pixel_values`` ``[N, 3, T, T]`` is the global view exactly as ``encode``
     computes it (``F.interpolate(pixel_values, (T, T), mode="bicubic")``, bit for bit), with
     ``use_global_view``. The placeholder span is ``(resampler_tokens if given, else tiles * tokens_per_view)
     + (tokens_per_view with the global view)``: 512 + 256 = 768 for the release
     (:meth:`MonkeyImageProcessor.from_textmonkey_config` reads these from ``config.visual``).
   - ``tiling="dynamic"`` (InternVL's ``dynamic_preprocess``): candidate grids are all ``(cols, rows)`` with
     ``min_tiles <= cols * rows <= max_tiles``, in InternVL's order (its Python set, sorted by tile count); the
     chosen one has the aspect ratio ``cols / rows`` closest to ``w / h``; on an exact tie (the same float
     distance) a later candidate replaces the current one when ``w * h > 0.5 * T * T * cols * rows``. The image
     is resized straight to ``(cols * T, rows * T)`` and cut row by row; with ``use_thumbnail`` and more than one
     tile, the thumbnail (the budgeted image resized to ``T x T``) comes LAST.
3. **Normalisation** ``(x - image_mean) / image_std`` on ``[0, 1]`` values (CLIP's statistics by default, as the
   release).

Resampling (bicubic, like the release, which resizes PIL images through torchvision's ``Resize``): every resize
that the references do on a PIL image (the budget, the resize before tiling, InternVL's thumbnail) is
``F.interpolate(mode="bicubic", antialias=True)``: PIL's bicubic filter (a = -0.5, support widened by the
shrink factor). For ``uint8`` inputs and PIL images it runs on ``uint8`` and yields ``uint8`` (torch's CPU
kernel follows PIL's fixed-point, horizontal-then-vertical algorithm, so results equal PIL's to one grey
level in almost every pixel; the installed Pillow 13 runs the vertical pass first for some shapes, e.g.
1000x700 -> 448x448, which moves pixels of pure noise by up to ~10 levels and smooth images by at most 1).
Float inputs (``[0, 1]``) are resized in float32 without rounding or clamping, exactly like
:func:`monkey_kernels.models.prepare_images`. The release's global view is ``F.interpolate`` on the
normalised tensor without antialiasing (torch's a = -0.75 cubic), reproduced as is.

Outputs of ``processor(images, return_tensors="pt")`` (a ``BatchFeature``), for ``N`` images with ``V_i`` views:

- ``pixel_values`` float32 ``[sum V_i, 3, T, T]``: image 0's tiles (row-major), its global view / thumbnail,
  then image 1's, ... (``tiling="textmonkey"``: the whole images ``[N, 3, H, W]``, and ``global_pixel_values``
  ``[N, 3, T, T]``);
- ``adapter_ids`` int64 ``[sum V_i]``: the tile's row-major index (its LoRA adapter), ``-1`` for the global
  view / thumbnail (no adapter);
- ``grids`` int64 ``[N, 2]``: ``(cols, rows)``; ``views_per_image`` int64 ``[N]``;
- ``num_image_tokens`` int64 ``[N]``: ``V_i * tokens_per_view`` (``(tiles + 1) * 256`` with a global view,
  ``tiles * 256`` without; TextMonkey: see above), the placeholder span the language model reserves for image
  ``i``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from ..models.image_prep import CLIP_MEAN, CLIP_STD, tile_grid

__all__ = [
    "MonkeyImageProcessor",
    "MonkeyImagesKwargs",
    "ImageLayout",
    "apply_pixel_budget",
    "internvl_candidate_grids",
    "internvl_grid",
]

TILINGS = ("monkey", "dynamic", "textmonkey")
# Stacked images per resize call are capped at this many elements (fp32: 256 MiB) to bound peak memory.
_MAX_CHUNK_ELEMENTS = 64 * 1024 * 1024


class MonkeyImagesKwargs(ImagesKwargs, total=False):
    """The options of :class:`MonkeyImageProcessor` (all may also be passed per call)."""

    tile_size: int
    tiling: str
    resolution: Optional[Tuple[int, int]]
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    image_max_pixels: Optional[int]
    image_min_pixels: Optional[int]
    tokens_per_view: int
    resampler_tokens: Optional[int]
    use_global_view: bool


@dataclass(frozen=True)
class ImageLayout:
    """How one image of ``width x height`` pixels is cut (computed from its size alone, no pixels).

    Attributes:
        width, height: the input size.
        budget_width, budget_height: the size after the pixel budget (equal to the input without one).
        cols, rows: the tile grid.
        tile_size: ``T``.
        has_global_view: a global view (``tiling="monkey"`` / ``"textmonkey"``) or thumbnail (``"dynamic"``)
            follows the tiles.
        tokens_per_view: resampler tokens per view (256 in the release).
        resampler_tokens: TextMonkey's token filter: the tiles' features are cut to this many tokens (``r``);
            ``None``: no filter.
    """

    width: int
    height: int
    budget_width: int
    budget_height: int
    cols: int
    rows: int
    tile_size: int
    has_global_view: bool
    tokens_per_view: int
    resampler_tokens: Optional[int] = None

    @property
    def grid(self) -> Tuple[int, int]:
        """``(cols, rows)``."""
        return self.cols, self.rows

    @property
    def num_tiles(self) -> int:
        return self.cols * self.rows

    @property
    def num_views(self) -> int:
        return self.num_tiles + int(self.has_global_view)

    @property
    def num_image_tokens(self) -> int:
        if self.resampler_tokens is not None:
            return self.resampler_tokens + int(self.has_global_view) * self.tokens_per_view
        return self.num_views * self.tokens_per_view

    @property
    def resized_size(self) -> Tuple[int, int]:
        """``(width, height)`` the (budgeted) image is resized to before cutting: ``(cols * T, rows * T)``."""
        return self.cols * self.tile_size, self.rows * self.tile_size

    @property
    def adapter_ids(self) -> Tuple[int, ...]:
        """Per view: the tile's row-major index (its adapter), then ``-1`` for the global view / thumbnail."""
        return tuple(range(self.num_tiles)) + ((-1,) if self.has_global_view else ())


# ---------------------------------------------------------------------------------------------------------
# Size rules (pure Python on sizes: a 20000x20000 image is planned without allocating it)
# ---------------------------------------------------------------------------------------------------------
def _scaled_to_pixels(width: int, height: int, pixels: int, image_index: int, option: str, verb: str,
                      hint: str) -> Tuple[int, int]:
    """``(width, height)`` scaled by ``sqrt(pixels / (width * height))``, each side truncated (LLaMA-Factory's
    rounding); a side of 0 raises ``ValueError`` naming the image and the option."""
    factor = math.sqrt(pixels / (width * height))
    new_w, new_h = int(width * factor), int(height * factor)
    if new_w < 1 or new_h < 1:
        raise ValueError(f"images[{image_index}]: {option}={pixels} {verb} {width}x{height} to {new_w}x{new_h} "
                         f"(a side of 0 pixels){hint}")
    return new_w, new_h


def apply_pixel_budget(width: int, height: int, max_pixels: Optional[int], min_pixels: Optional[int],
                       *, image_index: int = 0) -> Tuple[int, int]:
    """LLaMA-Factory's budget: ``(width, height)`` after ``image_max_pixels`` then ``image_min_pixels``.

    Raises:
        ValueError: naming ``images[image_index]`` and the option when a side truncates to 0.
    """
    if max_pixels is not None and width * height > max_pixels:
        width, height = _scaled_to_pixels(width, height, max_pixels, image_index, "image_max_pixels", "shrinks",
                                          "; raise image_max_pixels or pass a less extreme aspect ratio")
    if min_pixels is not None and width * height < min_pixels:
        width, height = _scaled_to_pixels(width, height, min_pixels, image_index, "image_min_pixels", "scales", "")
    return width, height


@lru_cache(maxsize=64)
def internvl_candidate_grids(min_tiles: int, max_tiles: int) -> Tuple[Tuple[int, int], ...]:
    """InternVL's candidate ``(cols, rows)`` in its order: built as the same Python set, sorted by tile count.

    The order among grids with the same tile count is the set's iteration order (deterministic for int tuples,
    whose hashes are not randomised); it decides some exact ties, so it is reproduced rather than redefined."""
    candidates = set(
        (i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    )
    return tuple(sorted(candidates, key=lambda grid: grid[0] * grid[1]))


@lru_cache(maxsize=4096)
def internvl_grid(width: int, height: int, min_tiles: int, max_tiles: int, tile_size: int) -> Tuple[int, int]:
    """InternVL's ``find_closest_aspect_ratio``: the ``(cols, rows)`` for an image of ``width x height``."""
    aspect_ratio = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in internvl_candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)  # a tie: the larger grid wins when the image has the pixels for it
    return best


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _optional_positive_int(name: str, value) -> Optional[int]:
    return None if value is None else _positive_int(name, value)


def _channel_stats(name: str, value) -> Tuple[float, float, float]:
    try:
        stats = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 3 numbers (one per RGB channel), got {value!r}") from None
    if len(stats) != 3 or not all(math.isfinite(v) for v in stats):
        raise ValueError(f"{name} must be 3 finite numbers (one per RGB channel), got {value!r}")
    return stats


# ---------------------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------------------
def _resize_pil_like(x: torch.Tensor, height: int, width: int, native_uint8: Optional[bool] = None) -> torch.Tensor:
    """PIL-style bicubic (``antialias=True``) of ``x [B, 3, h, w]`` to ``[B, 3, height, width]``.

    ``uint8`` in, ``uint8`` out (rounded and clamped like PIL's 8-bit images); float in, float out.
    ``native_uint8``: use torch's uint8 kernel (default: on CPU, the only device that has it)."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    if x.dtype != torch.uint8:
        return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    if native_uint8 if native_uint8 is not None else x.device.type == "cpu":
        # torch's uint8 kernel: PIL's fixed-point two-pass algorithm
        return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    # Other devices have no uint8 kernel: PIL's two passes in float, each rounded to 8 bits as PIL stores them.
    y = x.float()
    if y.shape[-1] != width:
        y = F.interpolate(y, size=(y.shape[-2], width), mode="bicubic", antialias=True)
        y = y.add_(0.5).floor_().clamp_(0, 255)
    if y.shape[-2] != height:
        y = F.interpolate(y, size=(height, width), mode="bicubic", antialias=True)
        y = y.add_(0.5).floor_().clamp_(0, 255)
    return y.to(torch.uint8)


def _stack(tensors: List[torch.Tensor], device) -> torch.Tensor:
    """``[n, 3, H, W]`` of equal-size images; a view (no copy) for a single image."""
    if len(tensors) == 1:
        return tensors[0].to(device)[None]
    return torch.stack([t.to(device) for t in tensors])


def _chunks(count: int, elements_per_item: int):
    step = max(1, _MAX_CHUNK_ELEMENTS // max(1, elements_per_item))
    for start in range(0, count, step):
        yield start, min(count, start + step)


class MonkeyImageProcessor(BaseImageProcessor):
    r"""Tiles, global views and adapter ids for Monkey's per-tile multi-LoRA encoder (see the module docstring).

    Args:
        tile_size: ``T``, the side of a view in pixels (448).
        tiling: ``"monkey"`` (fixed resize to ``resolution``, the release), ``"dynamic"`` (InternVL's grid) or
            ``"textmonkey"`` (TextMonkey: the whole image resized to ``resolution``, its windows' layout and
            global view).
        resolution: ``(W, H)`` for ``tiling="monkey"`` (default ``(896, 896)``, the release); ``None`` = each
            image's own size after the pixel budget.
        min_tiles, max_tiles: tile-count bounds of ``tiling="dynamic"`` (InternVL's ``min_num`` / ``max_num``: 1,
            12).
        use_thumbnail: ``tiling="dynamic"``: append the ``T x T`` thumbnail after the tiles when there is more
            than one tile (True, as InternVL's chat models).
        image_max_pixels, image_min_pixels: LLaMA-Factory's pixel budget, applied before tiling (``None``: off).
        image_mean, image_std: per-channel normalisation (CLIP's, as the release).
        do_normalize: apply it (True).
        tokens_per_view: resampler tokens per view (256; ``config.n_queries``).
        resampler_tokens: ``tiling="textmonkey"``: the token filter's ``r`` (512 in the release; ``None``: the
            model has no ``downresampler``). At most ``tiles * tokens_per_view`` (the original fails otherwise).
        use_global_view: ``tiling="textmonkey"``: the model's ``use_global`` (True).

    ``__call__(images, return_tensors="pt", **overrides)``: ``images`` is one image or a (nested) list of them:
    ``torch.Tensor [3, H, W]`` (uint8, or float in ``[0, 1]``; ``[B, 3, H, W]`` for several), ``numpy`` arrays
    ``[H, W, 3]`` uint8 or ``[3, H, W]`` float (the layout is read from which axis has 3 entries; when both do,
    uint8 means HWC and float CHW; ``input_data_format="channels_first"`` / ``"channels_last"`` decides), and PIL
    images (converted to RGB like the release). Returns a ``BatchFeature`` (see the module docstring).

    Raises:
        ValueError: naming the option (bad options, here or per call) or ``images[i]`` (empty, not RGB, float
            values outside ``[0, 1]`` or not finite, a budget that truncates a side to 0).
    """

    model_input_names = ["pixel_values", "global_pixel_values", "adapter_ids", "grids", "views_per_image",
                         "num_image_tokens"]
    valid_kwargs = MonkeyImagesKwargs

    _OPTION_DEFAULTS: Dict[str, Any] = {
        "tile_size": 448,
        "tiling": "monkey",
        "resolution": (896, 896),
        "min_tiles": 1,
        "max_tiles": 12,
        "use_thumbnail": True,
        "image_max_pixels": None,
        "image_min_pixels": None,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_normalize": True,
        "tokens_per_view": 256,
        "resampler_tokens": None,
        "use_global_view": True,
    }
    # Keys transformers writes next to the options (class names, the Auto machinery): accepted and dropped.
    _SERVICE_KEYS = ("image_processor_type", "processor_class", "auto_map", "feature_extractor_type")

    def __init__(self, **kwargs) -> None:
        for key in self._SERVICE_KEYS:
            kwargs.pop(key, None)
        unknown = sorted(set(kwargs) - set(self._OPTION_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown MonkeyImageProcessor option(s) {unknown}; "
                             f"known: {sorted(self._OPTION_DEFAULTS)}")
        options = self._resolve_options({**self._OPTION_DEFAULTS, **kwargs})
        super().__init__()
        for key, value in options.items():
            setattr(self, key, value)

    @classmethod
    def from_vision_config(cls, config, **kwargs) -> "MonkeyImageProcessor":
        """The processor matching a ``MonkeyVisionConfig``: its ``tile_size``, ``n_queries`` and ``image_size``."""
        for name in ("tile_size", "n_queries", "image_size"):
            if not hasattr(config, name):
                raise ValueError(f"config must be a MonkeyVisionConfig (with {name}), got {type(config).__name__}")
        kwargs.setdefault("tile_size", config.tile_size)
        kwargs.setdefault("tokens_per_view", config.n_queries)
        kwargs.setdefault("resolution", (config.image_size, config.image_size))
        return cls(**kwargs)

    @classmethod
    def from_textmonkey_config(cls, visual, **kwargs) -> "MonkeyImageProcessor":
        """The ``tiling="textmonkey"`` processor of a TextMonkey model from its ``config.visual`` mapping:
        ``image_size`` (``[h, w]``; an int is refused: TextMonkey's ``Resize(int)`` keeps the aspect ratio, which
        its encoder cannot run), ``resampler`` / ``r``, ``use_global``; the window (448 px) and the 256 queries
        per window are literals of the original (a mapping may give ``window_patches`` * ``patch_size`` and
        ``pool_queries``)."""
        if not hasattr(visual, "get"):
            raise ValueError(f"visual must be the model's config.visual mapping, got {type(visual).__name__}")
        size = visual.get("image_size")
        if not isinstance(size, (list, tuple)) or len(size) != 2:
            raise ValueError(f"config.visual['image_size'] must be [height, width] (TextMonkey resizes an int "
                             f"size by its short side, keeping the aspect ratio, which its encoder cannot run), "
                             f"got {size!r}")
        patch = visual.get("patch_size", 14)
        kwargs.setdefault("tiling", "textmonkey")
        kwargs.setdefault("resolution", (int(size[1]), int(size[0])))
        kwargs.setdefault("tile_size", int(visual.get("window_patches", 32)) * int(patch))
        kwargs.setdefault("tokens_per_view", int(visual.get("pool_queries", 256)))
        kwargs.setdefault("resampler_tokens", int(visual.get("r", 512)) if visual.get("resampler") else None)
        kwargs.setdefault("use_global_view", bool(visual.get("use_global", False)))
        return cls(**kwargs)

    # -- options ------------------------------------------------------------------------------------------
    @classmethod
    def _resolve_options(cls, options: Dict[str, Any]) -> Dict[str, Any]:
        """Validated, canonical options (tuples, ints); ``ValueError`` names the first bad one."""
        out = dict(options)
        out["tile_size"] = _positive_int("tile_size", out["tile_size"])
        out["tokens_per_view"] = _positive_int("tokens_per_view", out["tokens_per_view"])
        if out["tiling"] not in TILINGS:
            raise ValueError(f"tiling must be one of {TILINGS}, got {out['tiling']!r}")
        resolution = out["resolution"]
        if resolution is not None:
            if isinstance(resolution, (str, bytes)) or not hasattr(resolution, "__len__") or len(resolution) != 2:
                raise ValueError(
                    f"resolution must be a (width, height) pair of positive ints or None, got {resolution!r}")
            resolution = (_positive_int("resolution width", resolution[0]),
                          _positive_int("resolution height", resolution[1]))
        out["resolution"] = resolution
        out["min_tiles"] = _positive_int("min_tiles", out["min_tiles"])
        out["max_tiles"] = _positive_int("max_tiles", out["max_tiles"])
        if out["min_tiles"] > out["max_tiles"]:
            raise ValueError(f"min_tiles={out['min_tiles']} must not exceed max_tiles={out['max_tiles']}")
        for name in ("use_thumbnail", "do_normalize"):
            if not isinstance(out[name], (bool, np.bool_)):
                raise ValueError(f"{name} must be a bool, got {out[name]!r}")
            out[name] = bool(out[name])
        out["image_max_pixels"] = _optional_positive_int("image_max_pixels", out["image_max_pixels"])
        out["image_min_pixels"] = _optional_positive_int("image_min_pixels", out["image_min_pixels"])
        tile_area = out["tile_size"] ** 2
        if out["image_max_pixels"] is not None and out["image_max_pixels"] < tile_area:
            raise ValueError(
                f"image_max_pixels={out['image_max_pixels']} is below one tile "
                f"(tile_size**2 = {tile_area}); raise it or lower tile_size"
            )
        if (out["image_max_pixels"] is not None and out["image_min_pixels"] is not None
                and out["image_min_pixels"] > out["image_max_pixels"]):
            raise ValueError(
                f"image_min_pixels={out['image_min_pixels']} must not exceed image_max_pixels={out['image_max_pixels']}"
            )
        out["resampler_tokens"] = _optional_positive_int("resampler_tokens", out["resampler_tokens"])
        if not isinstance(out["use_global_view"], (bool, np.bool_)):
            raise ValueError(f"use_global_view must be a bool, got {out['use_global_view']!r}")
        out["use_global_view"] = bool(out["use_global_view"])
        if out["tiling"] == "textmonkey":
            cls._check_textmonkey_options(out)
        out["image_mean"] = _channel_stats("image_mean", out["image_mean"])
        out["image_std"] = _channel_stats("image_std", out["image_std"])
        if any(s == 0 for s in out["image_std"]):
            raise ValueError(f"image_std must be non-zero, got {out['image_std']}")
        return out

    @staticmethod
    def _check_textmonkey_options(out: Dict[str, Any]) -> None:
        tile, resolution = out["tile_size"], out["resolution"]
        if resolution is None or resolution[0] % tile or resolution[1] % tile:
            raise ValueError(
                f"resolution must be the TextMonkey model's image size, multiples of tile_size={tile} per side, "
                f"with tiling='textmonkey' (its encoder cuts {tile}-pixel windows and cannot run other sizes), "
                f"got {resolution!r}")
        tokens = (resolution[0] // tile) * (resolution[1] // tile) * out["tokens_per_view"]
        if out["resampler_tokens"] is not None and out["resampler_tokens"] > tokens:
            raise ValueError(f"resampler_tokens={out['resampler_tokens']} exceeds the {tokens} window tokens of a "
                             f"{resolution[0]}x{resolution[1]} image (the token filter keeps at most those)")

    def _options(self, overrides: Dict[str, Any]) -> Dict[str, Any]:
        unknown = sorted(set(overrides) - set(self._OPTION_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown MonkeyImageProcessor option(s) {unknown}; "
                             f"known: {sorted(self._OPTION_DEFAULTS)}")
        current = {key: getattr(self, key) for key in self._OPTION_DEFAULTS}
        return self._resolve_options({**current, **overrides}) if overrides else current

    def to_dict(self) -> Dict[str, Any]:
        """The options (JSON-ready) and ``image_processor_type``, what ``preprocessor_config.json`` holds."""
        out: Dict[str, Any] = {}
        for key in self._OPTION_DEFAULTS:
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        out["image_processor_type"] = type(self).__name__
        return out

    # -- layouts (sizes only) -------------------------------------------------------------------------------
    def layout(self, width: int, height: int, *, image_index: int = 0, **overrides) -> ImageLayout:
        """The :class:`ImageLayout` of an image of ``width x height`` pixels (no pixels needed)."""
        return self._layout(width, height, self._options(overrides), image_index)

    def layouts(self, sizes: Sequence[Tuple[int, int]], **overrides) -> List[ImageLayout]:
        """:meth:`layout` of each ``(width, height)`` in ``sizes``."""
        options = self._options(overrides)
        return [self._layout(w, h, options, i) for i, (w, h) in enumerate(sizes)]

    def get_number_of_image_tokens(self, width: int, height: int, **overrides) -> int:
        """The placeholder tokens of an image of ``width x height``: ``views * tokens_per_view``."""
        return self.layout(width, height, **overrides).num_image_tokens

    @staticmethod
    def _layout(width, height, options: Dict[str, Any], image_index: int) -> ImageLayout:
        for name, value in (("width", width), ("height", height)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"images[{image_index}]: {name} must be a positive int, got {value!r}")
        width, height = int(width), int(height)
        tile = options["tile_size"]
        budget_w, budget_h = apply_pixel_budget(width, height, options["image_max_pixels"],
                                                options["image_min_pixels"], image_index=image_index)
        resampler_tokens = None
        if options["tiling"] == "monkey":
            target = options["resolution"] if options["resolution"] is not None else (budget_w, budget_h)
            grid = tile_grid(target[0], target[1], tile_size=tile, tokens_per_view=options["tokens_per_view"])
            cols, rows, has_global = grid.n_cols, grid.n_rows, True
        elif options["tiling"] == "textmonkey":
            cols, rows = options["resolution"][0] // tile, options["resolution"][1] // tile
            has_global, resampler_tokens = options["use_global_view"], options["resampler_tokens"]
        else:
            cols, rows = internvl_grid(budget_w, budget_h, options["min_tiles"], options["max_tiles"], tile)
            has_global = options["use_thumbnail"] and cols * rows != 1
        return ImageLayout(width, height, budget_w, budget_h, cols, rows, tile, has_global,
                           options["tokens_per_view"], resampler_tokens)

    # -- inputs ---------------------------------------------------------------------------------------------
    @staticmethod
    def _flatten(images) -> List[Any]:
        if isinstance(images, (list, tuple)):
            flat: List[Any] = []
            for item in images:
                flat.extend(MonkeyImageProcessor._flatten(item))
            return flat
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            return list(images.unbind(0))
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return list(images)
        return [images]

    @staticmethod
    def _as_chw(image, index: int, input_data_format: Optional[str]) -> torch.Tensor:
        """One input as a ``[3, H, W]`` tensor, uint8 or float32 (float values checked to lie in ``[0, 1]``)."""
        if not isinstance(image, (torch.Tensor, np.ndarray)):
            try:
                from PIL import Image as PILImage
            except ImportError:  # PIL is optional: without it only tensors and arrays are images
                PILImage = None
            if PILImage is not None and isinstance(image, PILImage.Image):
                if image.width < 1 or image.height < 1:
                    raise ValueError(f"images[{index}] is empty: {image.width}x{image.height}")
                rgb = image if image.mode == "RGB" else image.convert("RGB")  # the release's .convert("RGB")
                return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
            raise ValueError(
                f"images[{index}] must be a torch.Tensor [3, H, W], a numpy array or a PIL image, got "
                f"{type(image).__name__}"
            )
        if image.ndim != 3:
            raise ValueError(f"images[{index}] must be an RGB image with 3 dims ([3, H, W] or [H, W, 3]), "
                             f"got shape {tuple(image.shape)}")
        if isinstance(image, np.ndarray):
            if input_data_format in ("channels_last", "last"):
                channels_last = True
            elif input_data_format in ("channels_first", "first"):
                channels_last = False
            elif input_data_format is not None:
                raise ValueError(f"input_data_format must be 'channels_first', 'channels_last' or None, "
                                 f"got {input_data_format!r}")
            elif image.shape[-1] == 3 and image.shape[0] != 3:
                channels_last = True
            elif image.shape[0] == 3 and image.shape[-1] != 3:
                channels_last = False
            else:  # 3 x H x 3, or no axis of 3 (caught below): the conventional layouts decide
                channels_last = image.dtype == np.uint8
            if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
                raise ValueError(f"images[{index}] must be uint8 or float (values in [0, 1]), got {image.dtype}")
            tensor = torch.from_numpy(np.ascontiguousarray(image))
            if channels_last:
                tensor = tensor.permute(2, 0, 1)
        else:
            tensor = image.detach()
            if tensor.dtype != torch.uint8 and not tensor.dtype.is_floating_point:
                raise ValueError(f"images[{index}] must be uint8 or float (values in [0, 1]), got {tensor.dtype}")
        if tensor.shape[0] != 3:
            raise ValueError(f"images[{index}] must be RGB with 3 channels first ([3, H, W]), got shape "
                             f"{tuple(tensor.shape)}")
        if tensor.shape[1] < 1 or tensor.shape[2] < 1:
            raise ValueError(f"images[{index}] is empty: shape {tuple(tensor.shape)}")
        if tensor.dtype != torch.uint8:
            tensor = tensor.float()
            low, high = torch.aminmax(tensor)
            low, high = float(low), float(high)
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(f"images[{index}] has non-finite values")
            if low < 0.0 or high > 1.0:
                raise ValueError(
                    f"images[{index}] is float with values in [{low:g}, {high:g}]; expected [0, 1] "
                    "(pass uint8 for 0..255 data)"
                )
        return tensor

    # -- processing -----------------------------------------------------------------------------------------
    def preprocess(self, images, return_tensors=None, input_data_format: Optional[str] = None,
                   **overrides) -> BatchFeature:
        """See the class docstring. ``overrides``: any option, for this call only."""
        options = self._options(overrides)
        if images is None:
            raise ValueError("images must hold at least one image, got None")
        flat = self._flatten(images)
        if not flat:
            raise ValueError("images must hold at least one image, got an empty batch")
        tensors = [self._as_chw(image, i, input_data_format) for i, image in enumerate(flat)]
        layouts = [self._layout(int(t.shape[2]), int(t.shape[1]), options, i) for i, t in enumerate(tensors)]
        data = {}
        if options["tiling"] == "textmonkey":
            data["pixel_values"] = self._whole_images(tensors, layouts, options)
            if options["use_global_view"]:
                tile = options["tile_size"]  # encode's own global view, on the normalised whole image
                data["global_pixel_values"] = F.interpolate(data["pixel_values"], size=(tile, tile), mode="bicubic")
        else:
            data["pixel_values"] = self._pixel_values(tensors, layouts, options)
        data.update({
            "adapter_ids": torch.tensor([a for lay in layouts for a in lay.adapter_ids], dtype=torch.int64),
            "grids": torch.tensor([lay.grid for lay in layouts], dtype=torch.int64).reshape(-1, 2),
            "views_per_image": torch.tensor([lay.num_views for lay in layouts], dtype=torch.int64),
            "num_image_tokens": torch.tensor([lay.num_image_tokens for lay in layouts], dtype=torch.int64),
        })
        if return_tensors in ("np", "numpy"):
            data = {key: value.cpu().numpy() for key, value in data.items()}
        elif return_tensors not in (None, "pt", "torch"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        return BatchFeature(data=data)

    def __call__(self, images, *args, **kwargs) -> BatchFeature:
        return self.preprocess(images, *args, **kwargs)

    def _pixel_values(self, tensors: List[torch.Tensor], layouts: List[ImageLayout], options) -> torch.Tensor:
        """``[total_views, 3, T, T]``: resizes batched over images of equal source and target size."""
        tile = options["tile_size"]
        device = tensors[0].device
        offsets = np.concatenate([[0], np.cumsum([lay.num_views for lay in layouts])]).astype(np.int64)
        out = torch.empty(int(offsets[-1]), 3, tile, tile, dtype=torch.float32, device=device)
        # Views are written unnormalised (uint8 images in 0..255, float ones in [0, 1]) and normalised in one
        # pass over `out` at the end: x * scale + shift per view, scale = 1 / (255 * std) or 1 / std.
        is_8bit = torch.zeros(int(offsets[-1]), dtype=torch.bool)
        for i, t in enumerate(tensors):
            is_8bit[int(offsets[i]):int(offsets[i + 1])] = t.dtype == torch.uint8

        # 1. Pixel budget: a real resize before tiling (LLaMA-Factory's PIL resize), batched by sizes.
        budgeted = list(tensors)
        groups: Dict[tuple, List[int]] = {}
        for i, (t, lay) in enumerate(zip(tensors, layouts)):
            if (lay.budget_width, lay.budget_height) != (lay.width, lay.height):
                groups.setdefault((t.shape[1], t.shape[2], lay.budget_height, lay.budget_width, t.dtype), []).append(i)
        for (_, _, bh, bw, _), members in groups.items():
            for start, stop in _chunks(len(members), 3 * bh * bw):
                idx = members[start:stop]
                resized = _resize_pil_like(_stack([tensors[i] for i in idx], device), bh, bw)
                for k, i in enumerate(idx):
                    budgeted[i] = resized[k]

        # 2. Resize to (cols * T, rows * T), normalise, cut row-major; the release's global view from it.
        groups = {}
        for i, (t, lay) in enumerate(zip(budgeted, layouts)):
            groups.setdefault((t.shape[1], t.shape[2], lay.rows, lay.cols, t.dtype), []).append(i)
        monkey = options["tiling"] == "monkey"
        for (_, _, rows, cols, _), members in groups.items():
            height, width = rows * tile, cols * tile
            for start, stop in _chunks(len(members), 3 * height * width):
                idx = members[start:stop]
                x = _resize_pil_like(_stack([budgeted[i] for i in idx], device), height, width)
                for k, i in enumerate(idx):
                    # [3, rows*T, cols*T] -> [rows, cols, 3, T, T], row-major tiles, converted to float by copy_
                    first = int(offsets[i])
                    out[first:first + rows * cols].view(rows, cols, 3, tile, tile).copy_(
                        x[k].view(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4))
                if monkey:
                    # The release: F.interpolate(images_896, (448, 448), mode="bicubic") on the normalised tensor
                    # (interpolation and the per-channel affine normalisation commute: the weights sum to one).
                    last = torch.as_tensor(offsets[idx] + rows * cols, device=device)
                    if (height, width) == (tile, tile):
                        out[last] = x.float()
                    else:
                        out[last] = F.interpolate(x.float(), size=(tile, tile), mode="bicubic", align_corners=False)

        # 3. InternVL's thumbnail: the budgeted image resized to T x T (PIL bicubic), after the tiles.
        if not monkey:
            groups = {}
            for i, (t, lay) in enumerate(zip(budgeted, layouts)):
                if lay.has_global_view:
                    groups.setdefault((t.shape[1], t.shape[2], t.dtype), []).append(i)
            for members in groups.values():
                for start, stop in _chunks(len(members), 3 * tile * tile):
                    idx = members[start:stop]
                    thumb = _resize_pil_like(_stack([budgeted[i] for i in idx], device), tile, tile)
                    last = torch.as_tensor(offsets[idx] + np.array([layouts[i].num_tiles for i in idx]), device=device)
                    out[last] = thumb.float()

        return _normalise_(out, is_8bit, options)

    def _whole_images(self, tensors: List[torch.Tensor], layouts: List[ImageLayout], options) -> torch.Tensor:
        """``tiling="textmonkey"``: ``[N, 3, rows * T, cols * T]``, each (budgeted) image resized whole (PIL-style
        bicubic, like the original's ``Resize`` of a PIL image) and normalised."""
        tile = options["tile_size"]
        device = tensors[0].device
        height, width = layouts[0].rows * tile, layouts[0].cols * tile  # one resolution for all
        out = torch.empty(len(tensors), 3, height, width, dtype=torch.float32, device=device)
        is_8bit = torch.tensor([t.dtype == torch.uint8 for t in tensors], dtype=torch.bool)
        groups: Dict[tuple, List[int]] = {}
        for i, (t, lay) in enumerate(zip(tensors, layouts)):
            groups.setdefault((t.shape[1], t.shape[2], lay.budget_height, lay.budget_width, t.dtype), []).append(i)
        for (_, _, bh, bw, _), members in groups.items():
            for start, stop in _chunks(len(members), 3 * max(bh * bw, height * width)):
                idx = members[start:stop]
                x = _stack([tensors[i] for i in idx], device)
                if (bh, bw) != tuple(x.shape[-2:]):  # the pixel budget: a real resize first (LLaMA-Factory's)
                    x = _resize_pil_like(x, bh, bw)
                out[torch.as_tensor(idx, device=device)] = _resize_pil_like(x, height, width).float()
        return _normalise_(out, is_8bit, options)


def _normalise_(out: torch.Tensor, is_8bit: torch.Tensor, options) -> torch.Tensor:
    """In place on ``out [n, 3, h, w]`` (uint8-range rows where ``is_8bit``, else ``[0, 1]``): ``x * scale +
    shift`` per channel, scale = 1 / (255 * std) or 1 / std, shift = -mean / std; or only the 8-bit rows to
    ``[0, 1]`` without normalisation."""
    device = out.device
    if options["do_normalize"]:
        std = torch.tensor(options["image_std"], dtype=torch.float64)
        shift = (-torch.tensor(options["image_mean"], dtype=torch.float64) / std).float()
        inv_std = (1.0 / std).float()
        scale = torch.where(is_8bit[:, None], (inv_std / 255.0)[None, :], inv_std[None, :])
        out.mul_(scale.to(device).view(-1, 3, 1, 1)).add_(shift.to(device).view(1, 3, 1, 1))
    else:
        out[is_8bit.to(device)] /= 255.0
    return out
