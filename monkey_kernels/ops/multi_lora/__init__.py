"""The segmented multi-LoRA linear (one LoRA adapter per segment of rows, fused with the base GEMM).

- :mod:`.api`: :func:`multi_lora_linear` (validate -> resolve backend -> call) and :func:`dropout_keep_mask`;
- :mod:`.checks`: the one checker of its arguments (:class:`MultiLoRAProblem`);
- :mod:`.op`: the custom op pair with fakes and autograd, and its eager twin;
- :mod:`.torch_impl`, :mod:`.native_impl`, :mod:`.triton_impl`: the backends, each registered against
  :class:`~monkey_kernels.ops.registry.MultiLoRABackend` (Triton kernels and launchers in ``triton_kernels/``);
- :mod:`.cublas_gemm`, :mod:`.gemm_choice`: the triton backend's cuBLAS twin of its fused GEMM and the per-shape
  choice between the two;
- :mod:`.reference`: :func:`multi_lora_linear_ref`, the per-segment loop.
"""
from .api import dropout_keep_mask, multi_lora_linear
from .checks import normalize_ranks
from .op import multi_lora_linear_bwd, multi_lora_linear_fwd
from .reference import multi_lora_linear_ref

__all__ = ["multi_lora_linear", "multi_lora_linear_ref", "multi_lora_linear_fwd", "multi_lora_linear_bwd",
           "normalize_ranks", "dropout_keep_mask"]
