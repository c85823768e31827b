"""Layout constants shared by the kernels and the host code, importable without Triton.

The PyTorch and C++ backends need the same layout facts as the Triton kernels (the width of the LoRA
intermediate ``H``, the codes of the SLP row kinds); keeping them here, in a module that does not import
Triton, lets a CPU user without Triton run those backends.
"""

__all__ = ["rank_block", "KIND_ZERO", "KIND_TEXT", "KIND_BOX", "KIND_IMAGE"]

# Row kinds of the SLP embedding assembly (``kind[t]`` of a flattened token; see ``monkey_kernels._triton.slp``).
KIND_ZERO, KIND_TEXT, KIND_BOX, KIND_IMAGE = 0, 1, 2, 3


def rank_block(r_max: int) -> int:
    """Width of the fp32 intermediate ``H``: ``r_max`` rounded up to a power of two, at least 16
    (the smallest ``tl.dot`` operand)."""
    r_max = int(r_max)
    return max(16, 1 << max(r_max - 1, 0).bit_length())
