"""Per-shape choice between the fused Triton GEMM and its cuBLAS-based twin, by measurement.

The triton backend's ``fused_gemm`` (:mod:`.triton_impl`) has two implementations with one contract:

- ``"triton"``: ``monkey_kernels._triton.multi_lora.fused_lora_gemm``, base GEMM and LoRA expand in one pass
  over the output;
- ``"cublas"``: :func:`.cublas_gemm.fused_lora_gemm_cublas`, the base GEMM by ``torch.addmm`` (cuBLAS on a GPU)
  and the LoRA term as one more GEMM in concatenated-K form.

A Triton GEMM slower than cuBLAS loses the fusion's gain, so on CUDA the first call of each shape times both
(CUDA events, interleaved, median of a few repetitions) and keeps the faster. Decisions are keyed by
:class:`GemmKey` (device name, dtype, M rounded up to a power of two, N, K, R_BLOCK, LoRA term or not, and
the Triton / torch versions), kept in memory and in a JSON file, so a second process reuses them:

- ``MONKEY_KERNELS_GEMM=auto|triton|cublas`` (read at every call; default ``auto``) forces a path. ``auto``
  on a non-CUDA device (the interpreter on CPU tensors) is ``triton`` and never times anything.
- ``MONKEY_KERNELS_AUTOTUNE_CACHE``: a directory (the file is ``<dir>/gemm_choices.json``) or a path ending
  in ``.json`` (that file); default ``~/.cache/monkey_kernels/gemm_choices.json``. Read at first use.
  (Both declared in :mod:`monkey_kernels.settings`.)

:func:`gemm_choices` returns the recorded decisions. Nothing here queries a GPU at import, and nothing imports
Triton (its version, part of a decision's key, is read when a key is written).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

import torch

from monkey_kernels import settings

__all__ = [
    "ENV_GEMM",
    "ENV_CACHE",
    "GEMM_MODES",
    "GEMM_PATHS",
    "GemmKey",
    "GemmChooser",
    "gemm_mode",
    "cache_path",
    "default_chooser",
    "gemm_choices",
    "choose_gemm_path",
]

ENV_GEMM = settings.GEMM.name
ENV_CACHE = settings.AUTOTUNE_CACHE.name
GEMM_MODES = settings.GEMM.choices
GEMM_PATHS = ("triton", "cublas")
CACHE_FILE_NAME = settings.AUTOTUNE_CACHE.default.name
TIMING_REPS = 5

logger = logging.getLogger("monkey_kernels")

Timer = Callable[[Mapping[str, Callable[[], object]]], Dict[str, float]]


def gemm_mode() -> str:
    """``MONKEY_KERNELS_GEMM`` (``auto`` when unset or empty), checked."""
    return settings.GEMM.get()


def cache_path() -> Path:
    """The JSON file of decisions (see the module docstring for ``MONKEY_KERNELS_AUTOTUNE_CACHE``)."""
    path = settings.AUTOTUNE_CACHE.get()
    return path if path.suffix == ".json" else path / CACHE_FILE_NAME


def _triton_version() -> str:
    import triton  # noqa: PLC0415 (only when a key is written: choices are made for the Triton backend)

    return triton.__version__


@dataclass(frozen=True)
class GemmKey:
    """What a decision depends on. ``m_bucket``: ``M`` rounded up to a power of two."""

    device_name: str
    dtype: str
    m_bucket: int
    n: int
    k: int
    r_block: int
    has_lora: bool

    @classmethod
    def of(cls, device_name: str, dtype: torch.dtype, m: int, n: int, k: int, r_block: int,
           has_lora: bool) -> "GemmKey":
        if m <= 0:
            raise ValueError(f"m must be positive, got {m}")
        bucket = 1 << (int(m) - 1).bit_length()  # m rounded up to a power of two
        return cls(str(device_name), str(dtype).replace("torch.", ""), bucket, int(n), int(k), int(r_block),
                   bool(has_lora))

    def text(self) -> str:
        """The key of the JSON file (the software stack included: a decision of another Triton or torch
        does not carry over)."""
        return (f"{self.device_name}|{self.dtype}|M{self.m_bucket}|N{self.n}|K{self.k}|R{self.r_block}|"
                f"lora{int(self.has_lora)}|triton{_triton_version()}|torch{torch.__version__}")


def cuda_event_timer(candidates: Mapping[str, Callable[[], object]], reps: int = TIMING_REPS) -> Dict[str, float]:
    """Median milliseconds of each candidate on the current CUDA stream. Each runs once first (Triton's
    compile and autotune, cuBLAS's heuristics); the timed repetitions are interleaved, so clock and
    thermal drift hit every candidate alike."""
    for run in candidates.values():
        run()
    torch.cuda.synchronize()
    events = {name: [] for name in candidates}
    for _ in range(reps):
        for name, run in candidates.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: statistics.median(s.elapsed_time(e) for s, e in pairs) for name, pairs in events.items()}


class GemmChooser:
    """Decisions in memory, backed by one JSON file ``{key text: entry}``; an entry is
    ``{"choice": "triton"|"cublas", "triton_ms": float, "cublas_ms": float}``.

    Args:
        path: the JSON file; ``None``: :func:`cache_path` at first use.
        timer: measures the candidates (default :func:`cuda_event_timer`); tests pass a fake one.
    """

    def __init__(self, path: Optional[os.PathLike] = None, timer: Optional[Timer] = None) -> None:
        self._path = None if path is None else Path(path)
        self._timer = timer or cuda_event_timer
        self._lock = threading.Lock()
        self._decisions: Dict[str, dict] = {}
        self._loaded = False
        self.timings_run = 0  # how many keys were measured by this chooser

    @property
    def path(self) -> Path:
        return self._path if self._path is not None else cache_path()

    def _read_file(self) -> Dict[str, dict]:
        try:
            with open(self.path, "r", encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            logger.warning("monkey-kernels: ignoring unreadable GEMM choice cache %s (%s)", self.path, error)
            return {}
        if not isinstance(data, dict):
            return {}
        return {key: entry for key, entry in data.items()
                if isinstance(entry, dict) and entry.get("choice") in GEMM_PATHS}

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            for key, entry in self._read_file().items():
                self._decisions.setdefault(key, dict(entry, source="file"))
            self._loaded = True

    def lookup(self, key: GemmKey) -> Optional[str]:
        """The recorded choice for ``key``, or ``None``."""
        with self._lock:
            self._ensure_loaded()
            entry = self._decisions.get(key.text())
            return None if entry is None else entry["choice"]

    def record(self, key: GemmKey, timings_ms: Mapping[str, float]) -> str:
        """Keep the faster path for ``key`` (ties go to ``triton``, the fused kernel) and write the file."""
        missing = [p for p in GEMM_PATHS if p not in timings_ms]
        if missing:
            raise ValueError(f"timings_ms must time {GEMM_PATHS}, missing {missing}")
        choice = "cublas" if timings_ms["cublas"] < timings_ms["triton"] else "triton"
        entry = {"choice": choice, **{f"{p}_ms": float(timings_ms[p]) for p in GEMM_PATHS}}
        with self._lock:
            self._ensure_loaded()
            self._decisions[key.text()] = dict(entry, source="measured")
            self._write(key.text(), entry)
        return choice

    def _write(self, key_text: str, entry: dict) -> None:
        # Merge with what other processes wrote meanwhile, then replace atomically (no torn file).
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            merged = self._read_file()
            merged[key_text] = entry
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".gemm_choices.", suffix=".tmp")
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump(merged, stream, indent=1, sort_keys=True)
            os.replace(temporary, path)
        except OSError as error:
            logger.warning("monkey-kernels: could not write the GEMM choice cache %s (%s); kept in memory",
                           path, error)

    def choose(self, key: GemmKey, candidates: Callable[[], Mapping[str, Callable[[], object]]]) -> str:
        """The recorded choice for ``key``, else time ``candidates()`` (``{"triton": run, "cublas": run}``,
        built only when needed) and record the faster."""
        known = self.lookup(key)
        if known is not None:
            return known
        timings = self._timer(candidates())
        self.timings_run += 1
        return self.record(key, timings)

    def decisions(self) -> Dict[str, dict]:
        """``{key text: {"choice", "triton_ms", "cublas_ms", "source": "measured"|"file"}}``: every decision
        this chooser knows, measured here or read from the file."""
        with self._lock:
            self._ensure_loaded()
            return {key: dict(entry) for key, entry in self._decisions.items()}


_default_chooser: Optional[GemmChooser] = None
_default_lock = threading.Lock()
_device_names: Dict[int, str] = {}


def default_chooser() -> GemmChooser:
    """The process-wide chooser ``fused_lora_gemm`` uses."""
    global _default_chooser
    with _default_lock:
        if _default_chooser is None:
            _default_chooser = GemmChooser()
        return _default_chooser


def gemm_choices() -> Dict[str, dict]:
    """The decisions of the process-wide chooser (see :meth:`GemmChooser.decisions`); ``{}`` before any."""
    return default_chooser().decisions()


def _device_name(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_names:
        _device_names[index] = torch.cuda.get_device_name(index)
    return _device_names[index]


def choose_gemm_path(
    device: torch.device,
    dtype: torch.dtype,
    m: int,
    n: int,
    k: int,
    r_block: int,
    has_lora: bool,
    candidates: Callable[[], Mapping[str, Callable[[], object]]],
    chooser: Optional[GemmChooser] = None,
) -> str:
    """``"triton"`` or ``"cublas"`` for one ``fused_lora_gemm`` call of output ``[m, n]``, inner size ``k``.

    Forced by ``MONKEY_KERNELS_GEMM``; under ``auto``: ``triton`` off CUDA (never timed), else the
    chooser's decision, measured on first sight of the key. While a CUDA graph is being captured nothing
    can be timed: a known decision is used, else ``triton`` (not recorded).
    """
    mode = gemm_mode()
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "triton"
    chooser = chooser or default_chooser()
    key = GemmKey.of(_device_name(device), dtype, m, n, k, r_block, has_lora)
    if torch.cuda.is_current_stream_capturing():
        return chooser.lookup(key) or "triton"
    return chooser.choose(key, candidates)
