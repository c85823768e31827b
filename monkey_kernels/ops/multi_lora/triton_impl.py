"""The multi-LoRA primitives on the Triton kernels (``triton_kernels/multi_lora.py``; the ``triton`` backend).

The launchers are bound directly (no wrapper frame): ``shrink`` = ``segmented_shrink``, ``fused_gemm`` =
``fused_lora_gemm``, ``outer`` = ``segmented_outer``. Importing this module imports Triton.
"""
import monkey_kernels._triton.multi_lora as kernels

__all__ = ["TritonMultiLoRA", "IMPLEMENTATION"]


class TritonMultiLoRA:
    name = "triton"
    shrink = staticmethod(kernels.segmented_shrink)
    fused_gemm = staticmethod(kernels.fused_lora_gemm)
    outer = staticmethod(kernels.segmented_outer)
    dropout_keep_mask = staticmethod(kernels.dropout_keep_mask)


IMPLEMENTATION = TritonMultiLoRA
