"""monkey-kernels: fused Triton kernels for per-tile multi-LoRA vision encoders (the Monkey recipe)."""
from triton_kernels.segments import SegmentInfo

from .backends import dropout_keep_mask, resolve_backend
from .modules import MultiLoRALinear
from .multi_lora import MultiLoRALinearFunction, multi_lora_linear, multi_lora_linear_ref

__version__ = "0.1.0"

__all__ = [
    "SegmentInfo",
    "MultiLoRALinear",
    "MultiLoRALinearFunction",
    "multi_lora_linear",
    "multi_lora_linear_ref",
    "dropout_keep_mask",
    "resolve_backend",
]
