"""Test configuration.

Without a GPU the Triton kernels run through Triton's CPU interpreter. ``TRITON_INTERPRET`` is read when
a kernel is defined, so it is set here, before any test module imports the kernels.

Seeds. Every test runs with ``random``, ``numpy`` and ``torch`` (CPU and every CUDA device) seeded from its
own seed, :func:`node_seed` of its node id (CRC-32, so the same on every run and machine, unlike Python's
salted ``hash``): a run is reproducible, and a test's inputs do not depend on which other tests ran before it.
A failing test prints ``seed=N (MONKEY_KERNELS_TEST_SEED=N replays it)`` in a ``seed`` section of its report.

* ``MONKEY_KERNELS_TEST_SEED=N`` runs every selected test with seed ``N`` (replays a printed seed).
* ``MONKEY_KERNELS_FUZZ=1`` draws a fresh random seed for every test (and lets hypothesis draw fresh
  examples): the opt-in search for inputs that fail; a failure prints its seed as above.

Hypothesis tests are derandomized by default (the same examples on every run) and draw fresh examples in
fuzz mode. A module- or session-scoped fixture that draws random numbers calls :func:`seed_fixture` first:
it is built before the per-test seeding, on whichever test of the module needs it first.
"""
import os
import random
import zlib

import numpy
import torch

from monkey_kernels import settings

if not torch.cuda.is_available():
    os.environ.setdefault(settings.TRITON_INTERPRET.name, "1")

import pytest  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402

from monkey_kernels.ops import alloc  # noqa: E402
from monkey_kernels.ops.backends import BACKENDS  # noqa: E402

SEED_ENV = settings.TEST_SEED.name
FUZZ_ENV = settings.FUZZ.name
_SEED_KEY = pytest.StashKey[int]()


def _setting(setting: settings.Setting):
    """A test setting's value; a bad value stops the run with pytest's usage error (the variable named)."""
    try:
        return setting.get()
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None


def fuzz_mode() -> bool:
    """Whether ``MONKEY_KERNELS_FUZZ`` asks for fresh random seeds (and hypothesis examples) on every run."""
    return _setting(settings.FUZZ)


def node_seed(nodeid: str) -> int:
    """The default seed of a test (or fixture) with this node id: its CRC-32, in ``[0, 2**31)``."""
    return zlib.crc32(nodeid.encode("utf-8")) & 0x7FFFFFFF


def choose_seed(nodeid: str) -> int:
    """The seed a test runs with: ``MONKEY_KERNELS_TEST_SEED`` when set, a fresh random one in fuzz mode,
    else :func:`node_seed`. Always in ``[0, 2**32)`` (numpy's range)."""
    forced = _setting(settings.TEST_SEED)
    if forced is not None:
        return forced
    if fuzz_mode():
        return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    return node_seed(nodeid)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device (lazily, when CUDA initialises)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def seed_fixture(request) -> int:
    """Seed the generators for a module- or session-scoped fixture from its own node id and name (these
    fixtures are built before the per-test seeding); returns the seed."""
    seed = choose_seed(f"{request.node.nodeid}::{request.fixturename}")
    seed_everything(seed)
    return seed


@pytest.fixture(autouse=True)
def _seed_every_test(request):
    """Seeds the generators before each test (see the module docstring); the seed is kept for the report."""
    seed = choose_seed(request.node.nodeid)
    request.node.stash[_SEED_KEY] = seed
    seed_everything(seed)
    return seed


@pytest.fixture
def seed(_seed_every_test) -> int:
    """The seed this test runs with, for a test that needs it as a value (e.g. an op's dropout seed)."""
    return _seed_every_test


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    seed = item.stash.get(_SEED_KEY, None)
    if report.failed and seed is not None:
        report.sections.append(("seed", f"seed={seed} ({SEED_ENV}={seed} replays it)"))
    return report


def pytest_report_header(config):
    forced = _setting(settings.TEST_SEED)
    if forced is not None:
        return f"monkey-kernels seeds: every test {forced} ({SEED_ENV})"
    if fuzz_mode():
        return f"monkey-kernels seeds: fresh random per test ({FUZZ_ENV}=1)"
    return f"monkey-kernels seeds: per test from its node id ({FUZZ_ENV}=1 for fresh ones)"


# Hypothesis: the same examples on every run (no example database carried between runs), fresh ones in fuzz mode.
hypothesis_settings.register_profile("monkey_kernels", derandomize=True, database=None)
hypothesis_settings.register_profile("monkey_kernels_fuzz", derandomize=False, print_blob=True)
hypothesis_settings.load_profile("monkey_kernels_fuzz" if fuzz_mode() else "monkey_kernels")


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    """Every buffer a kernel should overwrite starts as NaN for the duration of each test: the Triton launchers'
    and the native ops' (one switch, ``monkey_kernels.ops.alloc``, which ``monkey_kernels._native`` passes to
    the C++ ops); the variable too, for the subprocesses a test starts."""
    monkeypatch.setenv(settings.POISON.name, "1")
    previous = alloc.set_poison(True)
    yield
    alloc.set_poison(previous)


# Set to 1 to skip (instead of fail) the native backend's cases on a machine without a C++ compiler; CI
# builds the extension, so there a missing extension fails every native case.
ALLOW_NO_NATIVE = settings.ALLOW_NO_NATIVE.name


def available_backends() -> list:
    """The backends every shared test matrix runs (one list for all ops, so a backend cannot be forgotten).

    ``native`` is always listed: its cases fail when the extension did not build, unless
    ``MONKEY_KERNELS_ALLOW_NO_NATIVE=1`` (then they are skipped with the loader's reason, see
    :func:`pytest_collection_modifyitems`).
    """
    return list(BACKENDS)


def _missing_native_allowed() -> bool:
    return _setting(settings.ALLOW_NO_NATIVE)


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
