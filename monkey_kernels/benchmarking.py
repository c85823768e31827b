"""Helpers shared by the benchmark scripts: device naming, result-file naming and a host-clock timer."""
from __future__ import annotations

import platform
import re
import statistics
import time
from typing import Callable, Optional

import torch


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` on CUDA, ``"CPU (<model>)"`` otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = cpu_name()
    return f"CPU ({model})" if model else "CPU"


def slug(text: str) -> str:
    """A file-name-safe lower-case form of ``text`` (at most 48 characters)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48].strip("-") or "device"


def triton_version() -> Optional[str]:
    try:
        import triton  # noqa: PLC0415 (optional on CPU-only machines)
    except ImportError:
        return None
    return triton.__version__


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of ``fn`` over ``iters`` runs after ``warmup`` runs (the device synchronised around each)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
