"""monkey-kernels: fused Triton kernels for per-tile multi-LoRA vision encoders (the Monkey recipe) and the
Spatial Layout Projector (SLP). ``patch_model(model)`` swaps a model's reference modules for fused ones."""
from triton_kernels.segments import SegmentInfo

from .backends import dropout_keep_mask, resolve_backend
from .modules import MultiLoRALinear
from .multi_lora import multi_lora_linear, multi_lora_linear_bwd, multi_lora_linear_fwd, multi_lora_linear_ref
from .patching import NothingToPatchError, PatchReport, PatchRule, patch_model, register_rule, unpatch_model
from .slp import FusedSLPEmbedding, slp_embed
# Importing peft_patch registers the PEFT LoRA rule in the patcher; PEFT itself stays optional.
from .peft_patch import adapter_selection, clear_adapter_rows, set_adapter_rows

__version__ = "0.1.0"

__all__ = [
    "SegmentInfo",
    "MultiLoRALinear",
    "multi_lora_linear_fwd",
    "multi_lora_linear_bwd",
    "multi_lora_linear",
    "multi_lora_linear_ref",
    "dropout_keep_mask",
    "resolve_backend",
    "patch_model",
    "unpatch_model",
    "register_rule",
    "PatchRule",
    "PatchReport",
    "NothingToPatchError",
    "FusedSLPEmbedding",
    "slp_embed",
    "adapter_selection",
    "set_adapter_rows",
    "clear_adapter_rows",
]
