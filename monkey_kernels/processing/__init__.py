"""High-resolution preprocessing for Monkey: an HF image processor and a processor with exact placeholder prefill.

Importing this package registers both with the transformers Auto classes (under ``MonkeyVisionConfig``), so
``AutoImageProcessor.from_pretrained(dir)`` / ``AutoProcessor.from_pretrained(dir)`` return them: transformers
resolves ``"image_processor_type": "MonkeyImageProcessor"`` (``preprocessor_config.json``) and
``"processor_class": "MonkeyProcessor"`` (``processor_config.json``) by class name among registered classes.
"""
from transformers import AutoImageProcessor, AutoProcessor

from ..models import MonkeyVisionConfig
from .image_processing_monkey import (
    ImageLayout,
    MonkeyImageProcessor,
    MonkeyImagesKwargs,
    apply_pixel_budget,
    internvl_candidate_grids,
    internvl_grid,
)
from .processing_monkey import SPAN_FORMATS, MonkeyProcessor

__all__ = [
    "ImageLayout",
    "MonkeyImageProcessor",
    "MonkeyImagesKwargs",
    "MonkeyProcessor",
    "SPAN_FORMATS",
    "apply_pixel_budget",
    "internvl_candidate_grids",
    "internvl_grid",
]

# One class serves both backends transformers may ask for ("torchvision" when it is installed, else "pil"): the
# processor is torch-only either way, and registering both avoids a backend-fallback warning.
AutoImageProcessor.register(
    MonkeyVisionConfig,
    image_processor_classes={"torchvision": MonkeyImageProcessor, "pil": MonkeyImageProcessor},
    exist_ok=True,
)
AutoProcessor.register(MonkeyVisionConfig, MonkeyProcessor, exist_ok=True)
