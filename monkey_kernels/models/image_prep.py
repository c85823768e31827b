"""Image preparation for Monkey's tiled vision encoder, on tensors with torch only (no torchvision, no PIL).

Rule for a requested resolution ``width x height`` (pixels) and a tile side ``T`` (``config.tile_size``)::

    n_cols = max(1, floor(width / T + 1/2)),   n_rows = max(1, floor(height / T + 1/2))

i.e. each side is rounded to the nearest multiple of ``T`` (halves round up), with at least one tile per side.
The image is resized (bicubic) to ``(n_rows * T) x (n_cols * T)``, cut into ``T x T`` tiles row by row (tile /
adapter index ``row * n_cols + col``), and a global view is the resized image brought back to ``T x T``
(bicubic, like the release's ``F.interpolate``). Each view becomes ``n_queries`` tokens after the resampler, so
the language side reserves ``(n_tiles + 1) * n_queries`` image placeholder tokens (1280 for 896x896 with the
release config: 2x2 tiles, 4 adapters; 1792 for 1344x896: 3x2 tiles, 6 adapters).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["TileGrid", "tile_grid", "prepare_images", "CLIP_MEAN", "CLIP_STD"]

# The release normalises with CLIP's statistics after ToTensor (values in [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TileGrid:
    """The tiling of one requested resolution.

    Attributes:
        n_cols, n_rows: tiles per row / per column.
        tile_size: tile side in pixels.
        tokens_per_view: tokens each view yields after the resampler (``config.n_queries``).
    """

    n_cols: int
    n_rows: int
    tile_size: int
    tokens_per_view: int

    @property
    def num_tiles(self) -> int:
        return self.n_cols * self.n_rows

    @property
    def num_adapters(self) -> int:
        """Adapters needed: one per tile (the global view uses none)."""
        return self.num_tiles

    @property
    def num_views(self) -> int:
        return self.num_tiles + 1

    @property
    def num_image_tokens(self) -> int:
        """Image placeholder tokens the language model must reserve per image: ``(tiles + 1) * tokens_per_view``."""
        return self.num_views * self.tokens_per_view

    @property
    def resized_size(self) -> Tuple[int, int]:
        """``(width, height)`` in pixels the image is resized to before tiling."""
        return self.n_cols * self.tile_size, self.n_rows * self.tile_size

    def adapter_index(self, row: int, col: int) -> int:
        return row * self.n_cols + col


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _config_value(config, name: str, default):
    """``config.<name>``, or ``default`` without a config; a config lacking it is named in the error."""
    if config is None:
        return default
    if not hasattr(config, name):
        raise ValueError(f"config must be a MonkeyVisionConfig (with {name}), got {type(config).__name__}")
    return getattr(config, name)


def _tiles_along(pixels: int, tile: int) -> int:
    return max(1, math.floor(pixels / tile + 0.5))


def tile_grid(width: int, height: int, config=None, *, tile_size: Optional[int] = None,
              tokens_per_view: Optional[int] = None) -> TileGrid:
    """The tile grid for a requested resolution ``width x height`` (see the module docstring for the rule).

    ``tile_size`` / ``tokens_per_view`` default to ``config.tile_size`` / ``config.n_queries`` (a
    :class:`~monkey_kernels.models.MonkeyVisionConfig`), else to the release's 448 / 256."""
    _positive_int("width", width)
    _positive_int("height", height)
    if tile_size is None:
        tile_size = _config_value(config, "tile_size", 448)
    if tokens_per_view is None:
        tokens_per_view = _config_value(config, "n_queries", 256)
    _positive_int("tile_size", tile_size)
    _positive_int("tokens_per_view", tokens_per_view)
    return TileGrid(_tiles_along(width, tile_size), _tiles_along(height, tile_size), tile_size, tokens_per_view)


def prepare_images(
    images: Union[torch.Tensor, Sequence[torch.Tensor]],
    resolution: Optional[Tuple[int, int]] = None,
    config=None,
    *,
    tile_size: Optional[int] = None,
    num_channels: Optional[int] = None,
    normalize: bool = True,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Tuple[torch.Tensor, TileGrid]:
    """Tiles and global view of a batch of images, ready for ``MonkeyVisionModel``.

    Args:
        images: float ``[B, C, H, W]`` or ``[C, H, W]`` with values in ``[0, 1]`` (what ``ToTensor`` gives), or a
            sequence of ``[C, H_i, W_i]`` images of any sizes (all get the same grid).
        resolution: requested ``(width, height)`` in pixels; ``None`` = the config's ``input_resolution``
            (``image_resolution``, else ``image_size`` square: 896x896 in the release).
        config: a ``MonkeyVisionConfig`` giving ``tile_size``, ``image_size``, ``num_channels``, ``n_queries``.
        tile_size, num_channels: override the config (defaults 448 and 3 without a config).
        normalize: apply ``(x - mean) / std`` per channel (CLIP statistics, as the release).
    Returns:
        ``(pixel_values [B, n_tiles + 1, C, T, T], grid)``: tiles row-major (view ``v`` = adapter ``v``), then
        the global view; in the dtype of ``images`` (fp32 for integer input is not accepted: pass floats).
    Raises:
        ValueError: naming the argument, for a wrong channel count, non-float or empty images, bad sizes.
    """
    tile = tile_size if tile_size is not None else _config_value(config, "tile_size", 448)
    channels = num_channels if num_channels is not None else _config_value(config, "num_channels", 3)
    _positive_int("num_channels", channels)
    if resolution is None:
        own = getattr(config, "input_resolution", None)  # a grown model's (W, H), else image_size square
        side = _config_value(config, "image_size", 896)
        resolution = tuple(own) if own is not None else (side, side)
    if not (isinstance(resolution, (tuple, list)) and len(resolution) == 2):
        raise ValueError(f"resolution must be a (width, height) pair, got {resolution!r}")
    grid = tile_grid(resolution[0], resolution[1], config, tile_size=tile)

    if isinstance(images, torch.Tensor):
        batch = [images] if images.dim() == 3 else list(images) if images.dim() == 4 else None
        if batch is None:
            raise ValueError(f"images must be [B, C, H, W] or [C, H, W], got shape {tuple(images.shape)}")
    elif isinstance(images, (list, tuple)):
        batch = list(images)
    else:
        raise ValueError(f"images must be a [B, C, H, W] or [C, H, W] tensor or a sequence of [C, H, W] tensors, "
                         f"got {type(images).__name__}")
    mean_t, std_t = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    if normalize and (mean_t.shape != (channels,) or std_t.shape != (channels,)):
        raise ValueError(f"mean and std must have {channels} entries, got {len(mean)} and {len(std)}")
    if normalize and not (torch.isfinite(mean_t).all() and torch.isfinite(std_t).all() and (std_t != 0).all()):
        # (x - mean) / 0 would turn every pixel of that channel into +-inf or NaN without a word.
        raise ValueError(f"mean must be finite and std finite and non-zero, got mean={list(mean)}, std={list(std)}")
    if not batch:
        raise ValueError("images must hold at least one image")
    width, height = grid.resized_size
    out = []
    for i, image in enumerate(batch):
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            raise ValueError(f"images[{i}] must be a [C, H, W] tensor, got {getattr(image, 'shape', type(image))}")
        if not image.dtype.is_floating_point:
            raise ValueError(f"images[{i}] must be a float tensor with values in [0, 1], got {image.dtype}")
        if image.shape[0] != channels:
            raise ValueError(
                f"images[{i}] must have {channels} channels, got {image.shape[0]} (shape {tuple(image.shape)})"
            )
        if image.shape[1] < 1 or image.shape[2] < 1:
            raise ValueError(f"images[{i}] is empty: shape {tuple(image.shape)}")
        # Bicubic interpolation is not implemented for every half dtype on CPU: resize in fp32.
        x = image[None].float()
        if x.shape[-2:] != (height, width):
            # antialias=True approximates the PIL bicubic resize of the release when shrinking.
            x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        if normalize:
            m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = (x - m) / s
        # [1, C, rows*T, cols*T] -> [rows*cols, C, T, T], row-major over tiles
        tiles = x.reshape(channels, grid.n_rows, tile, grid.n_cols, tile).permute(1, 3, 0, 2, 4)
        tiles = tiles.reshape(grid.num_tiles, channels, tile, tile)
        # The release interpolates the (normalised) 896x896 image down to 448 without antialiasing.
        global_view = F.interpolate(x, size=(tile, tile), mode="bicubic", align_corners=False) \
            if x.shape[-2:] != (tile, tile) else x
        out.append(torch.cat([tiles, global_view], dim=0).to(image.dtype))
    return torch.stack(out, dim=0), grid
