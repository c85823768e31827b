"""monkey-kernels: fused Triton kernels for per-tile multi-LoRA vision encoders (the Monkey recipe) and the
Spatial Layout Projector (SLP). ``patch_model(model)`` swaps a model's reference modules for fused ones.

Every public name is imported on first use (PEP 562 ``__getattr__``): ``import monkey_kernels`` loads neither
transformers nor PEFT nor Triton, so command-line calls and CPU-only users start fast.
"""
import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "SegmentInfo": "monkey_kernels.ops.segments",
    "multi_lora_linear": "monkey_kernels.ops.multi_lora",
    "multi_lora_linear_ref": "monkey_kernels.ops.multi_lora",
    "multi_lora_linear_fwd": "monkey_kernels.ops.multi_lora",
    "multi_lora_linear_bwd": "monkey_kernels.ops.multi_lora",
    "dropout_keep_mask": "monkey_kernels.ops.multi_lora",
    "slp_embed": "monkey_kernels.ops.slp",
    "resolve_backend": "monkey_kernels.ops.backends",
    "MultiLoRALinear": "monkey_kernels.modules",
    "FusedSLPEmbedding": "monkey_kernels.modules",
    "patch_model": "monkey_kernels.patching",
    "unpatch_model": "monkey_kernels.patching",
    "register_rule": "monkey_kernels.patching",
    "PatchRule": "monkey_kernels.patching",
    "PatchReport": "monkey_kernels.patching",
    "NothingToPatchError": "monkey_kernels.patching",
    "adapter_selection": "monkey_kernels.rules.peft_lora",
    "set_adapter_rows": "monkey_kernels.rules.peft_lora",
    "clear_adapter_rows": "monkey_kernels.rules.peft_lora",
    "grow_tile_adapters": "monkey_kernels.growth",
    "rebuild_optimizer": "monkey_kernels.growth",
    "add_new_adapters_to_optimizer": "monkey_kernels.growth",
    "nearest_tile_sources": "monkey_kernels.growth",
    "MonkeyImageProcessor": "monkey_kernels.processing",
    "MonkeyProcessor": "monkey_kernels.processing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'monkey_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
