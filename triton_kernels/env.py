"""Facts about how Triton runs here, read at call time (never a GPU query at import), and the one place
that knows which Triton version is installed (supported: 3.6 to 3.9). Importable without Triton: the
PyTorch and C++ backends read :func:`interpreter_active` too."""
from monkey_kernels import settings


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``, which Triton
    reads when a kernel is defined: set it before importing the kernel modules)."""
    return settings.TRITON_INTERPRET.get()


def triton_version() -> tuple:
    """``(major, minor)`` of the installed Triton, e.g. ``(3, 6)``."""
    import triton  # noqa: PLC0415 (this module must import without Triton)

    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def install_interpreter_compat() -> None:
    """Make Triton 3.6's interpreter run our kernels as Triton 3.9's does (a no-op on 3.9 and when the
    interpreter is off).

    Under the interpreter every scalar is a 1-element numpy array, and a scalar used as a loop bound
    (``range(seg_first, seg_last + 1)`` with bounds read from memory) is converted by ``tensor.__index__``.
    Triton 3.6 does that with ``int(array)``, which recent NumPy (2.4 here; deprecated since 1.25) refuses
    for a 1-D array ("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.9 squeezes
    the array first. This installs 3.9's conversion into 3.6's per-launch patching of ``tl.tensor``.
    Compiled kernels are untouched.
    """
    if not interpreter_active() or triton_version() >= (3, 9):
        return
    from triton.runtime import interpreter  # noqa: PLC0415 (only under the interpreter)

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_monkey_kernels_compat", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # set through the scope, so the interpreter restores tl.tensor after the launch as usual
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._monkey_kernels_compat = True
    interpreter._patch_lang_tensor = patch_lang_tensor
