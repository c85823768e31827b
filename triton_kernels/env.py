"""Facts about how Triton runs here, read at call time (never a GPU query at import)."""
import os


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``, which Triton
    reads when a kernel is defined: set it before importing the kernel modules)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
