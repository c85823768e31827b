"""Reference models accelerated by the package (random weights from configs; no weights ship offline)."""
from .image_prep import TileGrid, prepare_images, tile_grid
from .monkey_vision import (
    MonkeyLoraAdapter,
    MonkeyResampler,
    MonkeyVisionBlock,
    MonkeyVisionConfig,
    MonkeyVisionModel,
    MonkeyVisionPreTrainedModel,
    MonkeyVisionTransformer,
    MonkeyVisualAttention,
    release_vision_state_dict,
)

__all__ = [
    "MonkeyLoraAdapter",
    "MonkeyResampler",
    "MonkeyVisionBlock",
    "MonkeyVisionConfig",
    "MonkeyVisionModel",
    "MonkeyVisionPreTrainedModel",
    "MonkeyVisionTransformer",
    "MonkeyVisualAttention",
    "TileGrid",
    "prepare_images",
    "release_vision_state_dict",
    "tile_grid",
]
