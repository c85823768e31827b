"""The rule that picks a backend, and the loading of each op's implementation on first use.

Each op (``multi_lora``, ``slp``) has one implementation per backend, in its own folder:
``monkey_kernels/ops/<op>/{triton_impl, native_impl, torch_impl}.py``, each registering a class that
implements the op's protocol (:mod:`monkey_kernels.ops.registry`: :data:`BACKENDS`, ``MultiLoRABackend``,
``SLPBackend``). The op's custom op (and its eager twin) is written once against that protocol and fetches the
implementation with :func:`implementation`.

- ``triton``: the Triton kernels of ``triton_kernels/`` (installed as ``monkey_kernels._triton``). CUDA tensors
  run them compiled; with ``TRITON_INTERPRET=1`` (set before import) the same kernels run on CPU tensors
  through Triton's interpreter.
- ``native``: the C++ extension (``csrc/``, loaded lazily by :mod:`monkey_kernels._native`) for CPU tensors
  (plus the SLP forward on CUDA in CUDA builds).
- ``torch``: vectorized PyTorch on any device (no Python loop over tokens or segments).

Choice: the ``backend=`` argument, else the ``MONKEY_KERNELS_BACKEND`` environment variable (read at every call,
:mod:`monkey_kernels.settings`), else ``triton`` for CUDA tensors or under ``TRITON_INTERPRET=1``; CPU tensors
otherwise get ``native`` when the extension loads and ``torch`` when it does not. The first automatic choice for
each device type is logged once (logger ``monkey_kernels``), with the reason.

Under ``torch.compile`` the choice (and the loading of an implementation) runs once at trace time as a
constant of the graph (``torch.compiler.assume_constant_result``): the extension loader's lock and
``importlib`` never reach Dynamo, so every backend, the automatic one included, compiles with
``fullgraph=True``. A compiled graph keeps the backend it was traced with.
"""
from __future__ import annotations

import importlib
import logging
import threading
from typing import Optional, Sequence

import torch

from monkey_kernels import settings
from monkey_kernels._triton.env import interpreter_active

from .. import _native  # the loader only: the extension itself loads on first use
from .registry import BACKENDS, registered

__all__ = ["BACKENDS", "ENV_BACKEND", "resolve_backend", "implementation", "interpreter_active"]

ENV_BACKEND = settings.BACKEND.name

#: Device types each op's native implementation serves.
_NATIVE_DEVICE_TYPES = {"multi_lora": ("cpu",), "slp": ("cpu", "cuda")}
_loaded: dict = {}

logger = logging.getLogger("monkey_kernels")
_logged_device_types: set = set()
_log_lock = threading.Lock()

_NAMES = {"native": "the native C++ backend", "torch": "the pure-PyTorch backend", "triton": "the Triton backend"}


def _log_choice_once(device_type: str, backend: str, why: str, level: int = logging.INFO) -> None:
    """One line per process and device type, the first time a backend is chosen automatically."""
    with _log_lock:
        if device_type in _logged_device_types:
            return
        _logged_device_types.add(device_type)
    logger.log(level, "monkey-kernels: %s tensors use %s (%s)", device_type.upper(), _NAMES[backend], why)


def _auto_backend(device_type: str) -> str:
    if device_type == "cuda":
        _log_choice_once("cuda", "triton", "CUDA tensors")
        return "triton"
    if interpreter_active():
        _log_choice_once(device_type, "triton", "TRITON_INTERPRET=1: the kernels run in Triton's interpreter")
        return "triton"
    if device_type == "cpu":
        if _native.available():
            origin = {"prebuilt": "prebuilt extension", "jit": "extension JIT-built from csrc/"}
            _log_choice_once("cpu", "native", origin.get(_native.status(), _native.status()))
            return "native"
        reason = _native.status()
        # A user who switched the extension off chose this; anything else is a build problem worth a warning.
        level = logging.INFO if reason.startswith("disabled") else logging.WARNING
        _log_choice_once("cpu", "torch", f"native extension unavailable: {reason}", level)
        return "torch"
    _log_choice_once(device_type, "torch", f"no fused backend for {device_type} tensors")
    return "torch"


@torch.compiler.assume_constant_result
def _resolve(op: str, backend: Optional[str], device_type: str, native_device_types: tuple) -> str:
    """The checked choice, with its implementation loaded (see the module docstring for why it is a
    constant under ``torch.compile``)."""
    chosen = backend if backend is not None else settings.BACKEND.get()
    source = "backend" if backend is not None else ENV_BACKEND
    if chosen == "auto":
        chosen = _auto_backend(device_type)
    elif chosen not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS + ('auto',)}, got {chosen!r}")
    elif chosen == "triton" and device_type != "cuda" and not interpreter_active():
        raise ValueError(
            f"{source}='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before import to run the "
            f"kernels on {device_type} tensors through the Triton interpreter"
        )
    elif chosen == "native":
        if device_type not in native_device_types:
            raise ValueError(f"{source}='native' runs on {'/'.join(native_device_types)} tensors, "
                             f"got {device_type} tensors")
        if not _native.available():
            raise ValueError(f"{source}='native' is unavailable: {_native.status()}")
    if op is not None and (op, chosen) not in _loaded:
        _loaded[(op, chosen)] = _load_implementation(op, chosen)
    return chosen


def _load_implementation(op: str, backend: str):
    """Imports ``monkey_kernels.ops.<op>.<backend>_impl``, which registers its implementation (checked against
    the op's protocol there), and returns that implementation."""
    module = f"monkey_kernels.ops.{op}.{backend}_impl"
    importlib.import_module(module)
    found = registered(op, backend)
    if found is None:
        raise RuntimeError(f"{module} registered no implementation (it must call "
                           f"monkey_kernels.ops.registry.register_backend({op!r}, {backend!r}, ...))")
    return found


def resolve_backend(backend: Optional[str], device, op: Optional[str] = None,
                    native_device_types: Optional[Sequence[str]] = None) -> str:
    """The backend that runs for tensors on ``device``; raises ``ValueError`` for an impossible choice.

    Args:
        backend: ``"triton"``, ``"native"``, ``"torch"``, ``"auto"`` or ``None`` (automatic).
        device: a ``torch.device`` or anything ``torch.device()`` accepts (``"cpu"``, ``"cuda:0"``).
        op: ``"multi_lora"`` or ``"slp"``: also loads that op's implementation for :func:`implementation`
            (and takes the device types its native implementation serves).
        native_device_types: overrides the device types ``native`` may serve (default: the op's; CPU).
    """
    if not isinstance(device, torch.device):
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device must be a torch.device or a device string, got {device!r}") from error
    if op is not None and op not in _NATIVE_DEVICE_TYPES:
        raise ValueError(f"op must be one of {tuple(_NATIVE_DEVICE_TYPES)} or None, got {op!r}")
    if native_device_types is None:
        native_device_types = _NATIVE_DEVICE_TYPES.get(op, ("cpu",))
    return _resolve(op, backend, device.type, tuple(native_device_types))


def implementation(op: str, backend: str):
    """The implementation object of ``op`` on ``backend`` (loaded by :func:`resolve_backend` with ``op``)."""
    impl = _loaded.get((op, backend))
    if impl is None:  # an op called with a backend string that did not come from resolve_backend
        resolve_backend(backend, "cuda" if backend == "triton" and not interpreter_active() else "cpu", op)
        impl = _loaded[(op, backend)]
    return impl
