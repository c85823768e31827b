"""Loader of the native C++ extension (``csrc/``), lazily, on first use.

The extension registers its ops with the PyTorch dispatcher as ``torch.ops.monkey_kernels_native.*``
(``TORCH_LIBRARY_FRAGMENT``); the Python module itself (``monkey_kernels._C``) only reports how it was
built. Where it comes from, in order:

1. ``prebuilt``: ``monkey_kernels._C``, compiled by ``setup.py`` at install time;
2. ``jit``: compiled now with ``torch.utils.cpp_extension.load`` from the ``csrc/`` sources of a source
   checkout (editable installs), cached under ``$MONKEY_KERNELS_CACHE`` or ``~/.cache/monkey_kernels``
   (the first build takes about a minute; later processes reuse it). ``MONKEY_KERNELS_NO_JIT=1`` skips it.

``MONKEY_KERNELS_NO_NATIVE=1`` disables the extension altogether. With ``MONKEY_KERNELS_MALLOC_TUNING=1``
(opt-in; off by default) loading it also tunes glibc's allocator for the whole process
(:func:`tune_cpu_allocator`, which a program may also call itself). Nothing here runs at ``import
monkey_kernels``: the first :func:`load` (or :func:`available`, :func:`ops`) does the work, and any failure is
recorded (see :func:`status`) instead of raised, so callers fall back to the pure-PyTorch path.

The C++ reads no environment variable: the settings it needs (NaN poisoning of fresh outputs, the base-GEMM
mode ``MONKEY_KERNELS_CPU_GEMM``, the cap ``MONKEY_KERNELS_LOWRANK_ISA``) are read here, through
:mod:`monkey_kernels.settings` and :func:`monkey_kernels.ops.alloc.poison_enabled`, and passed to the extension
(``configure``) when it loads and, when they changed, before every op call (:func:`ops`, :func:`extension`).
"""
from __future__ import annotations

import glob
import importlib
import logging
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import List, Optional

import torch

from monkey_kernels import settings
from monkey_kernels.ops import alloc

__all__ = ["load", "available", "status", "ops", "extension", "sources", "tune_cpu_allocator", "allocator_tuned",
           "ENV_NO_NATIVE", "ENV_NO_JIT", "ENV_CACHE", "ENV_MALLOC_TUNING"]

ENV_NO_NATIVE = settings.NO_NATIVE.name
ENV_NO_JIT = settings.NO_JIT.name
ENV_CACHE = settings.CACHE.name
ENV_MALLOC_TUNING = settings.MALLOC_TUNING.name
OP_NAMESPACE = "monkey_kernels_native"
JIT_NAME = "monkey_kernels_C"

logger = logging.getLogger("monkey_kernels")

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_status: Optional[str] = None  # None: not tried yet
_configured: Optional[tuple] = None  # the settings last passed to the extension

ROOT = Path(__file__).resolve().parent.parent


def sources(root: Path = ROOT, with_cuda: bool = False) -> List[str]:
    """The extension's sources under ``root`` (what ``setup.py`` compiles too): ``csrc/*.cpp``, and with
    CUDA also ``csrc/cuda/*.cpp`` and ``csrc/cuda/*.cu``."""
    found = sorted(glob.glob(str(root / "csrc" / "*.cpp")))
    if with_cuda:
        found += sorted(glob.glob(str(root / "csrc" / "cuda" / "*.cpp")))
        found += sorted(glob.glob(str(root / "csrc" / "cuda" / "*.cu")))
    return found


def _cuda_toolkit() -> bool:
    """A CUDA build of torch with a CUDA toolkit (nvcc) to compile the ``.cu`` sources."""
    if torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME  # noqa: PLC0415 (imports setuptools: keep it lazy)

    return CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


def _cache_dir() -> Path:
    base = settings.CACHE.get()
    # One build per torch/Python/CUDA combination: a torch upgrade must never load a stale binary.
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-" + (
        f"cu{torch.version.cuda}" if torch.version.cuda else "cpu")
    return base / tag.replace("+", "_")


def _jit_build() -> ModuleType:
    from torch.utils import cpp_extension  # noqa: PLC0415

    with_cuda = _cuda_toolkit()
    srcs = sources(ROOT, with_cuda)
    if not srcs:
        raise RuntimeError(f"no C++ sources under {ROOT / 'csrc'} (not a source checkout)")
    build_dir = _cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    logger.info("monkey-kernels: compiling the native extension (first use; cached in %s)", build_dir)
    cflags = ["-O3", "-fopenmp"] + (["-DMONKEY_WITH_CUDA"] if with_cuda else [])
    return cpp_extension.load(
        name=JIT_NAME, sources=srcs, build_directory=str(build_dir), extra_cflags=cflags,
        extra_cuda_cflags=["-O3", "-DMONKEY_WITH_CUDA"] if with_cuda else None, extra_ldflags=["-fopenmp"],
        with_cuda=with_cuda, verbose=False,
    )


def _load_locked() -> Optional[ModuleType]:
    global _module, _status
    if settings.NO_NATIVE.get():
        _status = f"disabled: {ENV_NO_NATIVE}=1"
        return None
    try:
        _module = importlib.import_module("monkey_kernels._C")
        _status = "prebuilt"
    except Exception as error:  # noqa: BLE001 (a missing or broken .so, whatever the reason)
        prebuilt_error = f"{type(error).__name__}: {error}".strip()
        if settings.NO_JIT.get():
            _status = f"disabled: no prebuilt extension ({prebuilt_error}) and {ENV_NO_JIT}=1"
            return None
        try:
            _module = _jit_build()
            _status = "jit"
        except Exception as jit_error:  # noqa: BLE001 (no compiler, no ninja, a compile error, ...)
            message = " ".join(f"{type(jit_error).__name__}: {jit_error}".split())
            _status = f"unavailable: no prebuilt extension ({prebuilt_error}); JIT build failed ({message[:800]})"
            return None
    return _module


# glibc's mallopt parameters (malloc.h) and the values set: see tune_cpu_allocator
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 128 * 1024 * 1024
_allocator_tuned: Optional[bool] = None


def tune_cpu_allocator() -> bool:
    """Raises glibc's mmap and trim thresholds (32 MiB, 128 MiB) once per process; ``True`` if they were set.
    Called when the extension loads with ``MONKEY_KERNELS_MALLOC_TUNING=1`` (an opt-in: it changes how the whole
    process allocates), or by a program that wants it.

    Why: the batched encoder pass allocates activations of every view at once (about 1 MB per tensor at the
    small configs). Above glibc's mmap threshold each such tensor is a fresh ``mmap`` whose pages fault in
    on first touch and go back to the system on free: measured 3,300 page faults and 7.6 ms of system time
    per training step (896², batch 2, one thread; the per-tile reference had none), a tenth of the step.
    With the thresholds raised, freed blocks stay in the heap and are reused (the step then faults twice).
    The cost: up to 128 MiB of freed memory stays with the process instead of going back to the system.

    Skipped (``False``) off glibc, or when the process already chose its own values (glibc's own variables
    ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES``)."""
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return False
    try:
        if not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL(None)
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    except (OSError, ValueError, AttributeError):
        return False
    _allocator_tuned = ok
    return ok


def allocator_tuned() -> bool:
    """Whether :func:`tune_cpu_allocator` raised glibc's thresholds in this process."""
    return bool(_allocator_tuned)


def _native_settings() -> tuple:
    """What the C++ ops need to know, read now: ``(poison, cpu_gemm, lowrank_isa)``."""
    return alloc.poison_enabled(), settings.CPU_GEMM.get(), settings.LOWRANK_ISA.get()


def _configure(module: ModuleType) -> None:
    """Passes the current settings to the extension when they differ from what it was given last (a few
    environment reads per call; the C++ keeps them in atomics)."""
    global _configured
    wanted = _native_settings()
    if wanted != _configured:
        module.configure(*wanted)
        _configured = wanted


def load() -> Optional[ModuleType]:
    """The extension module (cached; loads or JIT-builds it on the first call), or ``None`` when it is
    unavailable; :func:`status` says why. Loading passes the current settings to it (a bad setting is
    reported by the first :func:`ops` call instead) and, with ``MONKEY_KERNELS_MALLOC_TUNING=1``, tunes glibc's
    allocator."""
    if _status is None:
        with _lock:
            if _status is None and _load_locked() is not None:
                try:
                    _configure(_module)
                except ValueError:
                    pass  # the C++ keeps its defaults until ops() passes valid settings or raises the error
                if settings.MALLOC_TUNING.get():
                    tune_cpu_allocator()
    return _module


def available() -> bool:
    """Whether the native ops can run (loads the extension on first call)."""
    return load() is not None


def status() -> str:
    """``"prebuilt"`` or ``"jit"`` (where the loaded extension came from), else ``"disabled: ..."`` or
    ``"unavailable: ..."`` with the reason. Loads the extension on first call."""
    load()
    return _status  # type: ignore[return-value]


def extension() -> ModuleType:
    """The extension module with the current settings passed to it (for its reporting functions, e.g.
    ``lowrank_isa()``, ``tiled_base_gemm()``); raises ``RuntimeError`` with :func:`status` when unavailable and
    ``ValueError`` naming the variable for a bad setting."""
    module = _module if _status is not None else load()  # after the first call: no lock, no function call
    if module is None:
        raise RuntimeError(f"the native extension is not available: {status()}")
    _configure(module)
    return module


def ops():
    """``torch.ops.monkey_kernels_native``, with the current settings passed to the extension (every native op
    call comes through here); raises ``RuntimeError`` with :func:`status` when unavailable and ``ValueError``
    naming the variable for a bad setting."""
    extension()
    return getattr(torch.ops, OP_NAMESPACE)


def _reset_for_tests() -> None:
    """Forget a failed or disabled load so the next call tries again (tests only; a loaded library stays
    loaded: its ops are registered with the dispatcher for the life of the process)."""
    global _status
    with _lock:
        if _module is None:
            _status = None
