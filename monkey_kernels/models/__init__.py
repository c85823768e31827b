"""Reference models accelerated by the package (random weights from configs; no weights ship offline).

Names are imported on first use: the Monkey vision model needs transformers, the image-preparation helpers
do not."""
import importlib

_EXPORTS = {
    "TileGrid": ".image_prep",
    "prepare_images": ".image_prep",
    "tile_grid": ".image_prep",
    **{name: ".monkey_vision" for name in (
        "MonkeyLoraAdapter", "MonkeyResampler", "MonkeyVisionBlock", "MonkeyVisionConfig", "MonkeyVisionModel",
        "MonkeyVisionPreTrainedModel", "MonkeyVisionTransformer", "MonkeyVisualAttention",
        "release_vision_state_dict",
    )},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'monkey_kernels.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
