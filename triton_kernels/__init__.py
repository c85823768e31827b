"""Pure Triton kernels of monkey-kernels and their host launchers (no ``nn.Module`` here).

This folder installs as ``monkey_kernels._triton`` (``setup.py`` maps it there), never as a top-level package:
the name ``triton_kernels`` belongs to OpenAI's kernel package, which vLLM and sglang import. Import the kernels
as ``monkey_kernels._triton.multi_lora`` / ``monkey_kernels._triton.slp``. Only kernels and their launchers live
here (plus ``env.py`` and ``aot.py``): the segment metadata and the other non-Triton helpers the launchers share live
with the ops (``monkey_kernels.ops.segments``, ``.alloc``, ``.layout``), and so do the cuBLAS twin of the fused GEMM
and the per-shape choice between the two (``monkey_kernels.ops.multi_lora.cublas_gemm``, ``.gemm_choice``).
Nothing is imported here: a kernel module imports Triton when it is first imported.
"""
