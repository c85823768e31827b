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
def poison_kernel_outputs():
    """Every buffer a kernel should overwrite starts as NaN for the duration of each test."""
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


def kernel_device(backend: str) -> torch.device:
    """Where a backend's kernels run in this session: CUDA when present, else the CPU (interpreter)."""
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")
