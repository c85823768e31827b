"""Test configuration.

Without a GPU the Triton kernels run through Triton's CPU interpreter. ``TRITON_INTERPRET`` is read when
a kernel is defined, so it is set here, before any test module imports the kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from triton_kernels import alloc  # noqa: E402


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    """Every buffer a kernel should overwrite starts as NaN for the duration of each test: the Triton launchers'
    (``triton_kernels.alloc``) and the native ops' (``csrc/outputs.h`` reads the environment variable)."""
    monkeypatch.setenv("MONKEY_KERNELS_POISON", "1")
    previous = alloc.set_poison(True)
    yield
    alloc.set_poison(previous)


@pytest.fixture(autouse=True)
def fresh_random_inputs():
    """Fresh random inputs on every run (seeded from the OS); the seed is printed, and
    ``MONKEY_KERNELS_TEST_SEED=<seed>`` replays it."""
    replay = os.environ.get("MONKEY_KERNELS_TEST_SEED")
    seed = int(replay) if replay else int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
    yield


# Set to 1 to skip (instead of fail) the native backend's cases on a machine without a C++ compiler; CI
# builds the extension, so there a missing extension fails every native case.
ALLOW_NO_NATIVE = "MONKEY_KERNELS_ALLOW_NO_NATIVE"


def available_backends() -> list:
    """The backends every shared test matrix runs (one list for all ops, so a backend cannot be forgotten).

    ``native`` is always listed: its cases fail when the extension did not build, unless
    ``MONKEY_KERNELS_ALLOW_NO_NATIVE=1`` (then they are skipped with the loader's reason, see
    :func:`pytest_collection_modifyitems`).
    """
    return ["triton", "native", "torch"]


def _missing_native_allowed() -> bool:
    return os.environ.get(ALLOW_NO_NATIVE, "0") not in ("", "0")


def require_native():
    """``torch.ops.monkey_kernels_native`` for a test that needs the extension; without it the test fails with
    the loader's reason, or is skipped under ``MONKEY_KERNELS_ALLOW_NO_NATIVE=1``."""
    from monkey_kernels import _native  # noqa: PLC0415 (loads the extension only for tests that need it)

    if not _native.available():
        reason = f"native extension unavailable: {_native.status()}"
        if _missing_native_allowed():
            pytest.skip(f"{reason}; {ALLOW_NO_NATIVE}=1")
        pytest.fail(f"{reason} (set {ALLOW_NO_NATIVE}=1 to skip)")
    return _native.ops()


def pytest_collection_modifyitems(config, items):
    if not _missing_native_allowed():
        return
    native = [item for item in items
              if getattr(item, "callspec", None) is not None and item.callspec.params.get("backend") == "native"]
    if not native:
        return
    from monkey_kernels import _native  # noqa: PLC0415 (loads, or JIT-builds, only when native cases exist)

    if not _native.available():
        skip = pytest.mark.skip(reason=f"native extension unavailable ({_native.status()}); {ALLOW_NO_NATIVE}=1")
        for item in native:
            item.add_marker(skip)


def kernel_device(backend: str) -> torch.device:
    """Where a backend's kernels run in this session: CUDA when present, else the CPU (interpreter)."""
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")
