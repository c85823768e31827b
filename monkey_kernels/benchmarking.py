"""The one benchmark harness: one timer, one result schema, one file-name scheme, one table, one plot.

Every script in ``benchmarks/`` (through ``benchmarks/common.py``) and the ``monkey-kernels demo`` / ``bench``
commands use it; it lives in the package so that ``demo`` works from an installed wheel. Nothing here
queries the GPU or imports transformers / triton / matplotlib at import time.

Timer
-----
``time_methods(methods, device, *, base=None, rounds=None, iters=1, warmup=1, grad_to_none=None,
cuda_timer="do_bench", rep_ms=100, flush_l2=True) -> Dict[str, Timing]``

- ``methods``: ``{name: callable}`` (no arguments; rotate an input pool inside the callable if caches must
  not flatter). ``base``: the name every ratio is taken against (default: the first method).
- CPU (any non-CUDA device): ``warmup`` untimed calls of each method, then ``rounds`` rounds; each round runs
  every method ``iters`` times (``time.perf_counter`` per call, mean per round), in an order rotated by one each
  round. Per method: ``ms`` = median over rounds, ``ratio_to_base`` = median over rounds of
  ``method / base`` within the round (paired: a shared machine's speed drifts, all methods of a round together).
- CUDA: per round and method one ``cuda_timer`` measurement: ``"do_bench"`` (``triton.testing.do_bench``
  median; it flushes L2 itself), ``"events"`` (CUDA events around each of ``iters`` calls, L2 flushed before
  each when ``flush_l2``), or ``"graph"`` (``triton.testing.do_bench_cudagraph``: the callable replayed from
  a CUDA graph, for small ops whose launch overhead would dominate; falls back to ``do_bench`` when capture
  fails, ``Timing.timer`` says which). Same medians and paired ratios as on CPU.
- ``grad_to_none``: tensors (or ``{name: tensors}``) whose ``.grad`` is reset to ``None`` before every call,
  outside the timed region on CPU / events (as ``do_bench`` does).
- ``Timing``: ``method, ms, ratio_to_base, samples_ms, timer``.

``peak_memory_bytes(fn, device) -> Optional[int]``: CUDA peak allocation above what was allocated before one
call of ``fn``; ``None`` on CPU (no allocator statistics there; ``fn`` is not called).

Schema (``SCHEMA_VERSION``)
---------------------------
``make_result(bench, device, rows, *, backend=None, config=None, **extra) -> dict``: the envelope
``{schema_version, bench, device, device_type, threads, torch, triton, transformers, peft, python, backend,
date, git_commit, malloc_tuning, settings, config, rows, **extra}`` (``device``: the GPU name, or ``"CPU
(<model>)"``; ``backend``: the device's default backend, :func:`default_backend`; ``date``: ISO UTC time;
``git_commit``: ``HEAD`` or ``"unknown"``; versions ``None`` when a package is missing; ``malloc_tuning``: whether
glibc's allocator was tuned in this process (``MONKEY_KERNELS_MALLOC_TUNING=1``, an opt-in that changes CPU
timings); ``settings``: the ``monkey_kernels.settings`` variables set in the environment, name -> text).

``make_row(case, method, mode, ms, ratio_to_base=None, peak_memory_bytes=None, **extra) -> dict`` and
``timing_rows(case, mode, timings, peaks=None, **extra) -> List[dict]``: rows ``{case, method, mode, ms,
ratio_to_base, peak_memory_bytes, **extra}`` (``case`` a string label; ``mode`` e.g. ``"fwd"``,
``"fwd_bwd"``, ``"train_step"``; ``ms`` may be ``None`` for a method that could not run, with a ``note``).

Files
-----
``result_path(bench, device, date=None, results_dir=RESULTS_DIR, suffix=".json") -> Path``:
``benchmarks/results/<bench>_<device-slug>_<YYYY-MM-DD>.json``; ``plot_path(json_path)`` the matching ``.png``.
``write_result(result, path) -> Path`` (creates the folder). ``load_result(path) -> dict``.

Backends
--------
``BACKENDS`` (the one list, ``monkey_kernels.ops.backends.BACKENDS``), ``default_backend(device) -> str``
(``monkey_kernels.resolve_backend(None, device)``: native on CPU when the extension loads, triton on CUDA) and
``other_backends(device, default) -> List[str]`` (the others that can run on ``device``; the Triton interpreter on
CPU is excluded: minutes per call).

Output
------
``markdown_table(rows, columns=None) -> str``: a markdown table (default columns: case, method, mode, ms,
ratio_to_base, peak MiB, then the extra scalar fields of the rows). ``plot_grouped_bars(rows, path, *,
value="ratio_to_base", group_by="case", bar_by="method", panel_by="mode", title="", ylabel=None,
reference_line=1.0) -> Optional[Path]``: one PNG of grouped bars (``None`` when matplotlib is missing).

Command lines: ``add_timer_args(parser, rounds=None, iters=1, warmup=1)`` adds ``--rounds --iters --warmup
--cuda-timer --rep-ms --threads``; ``timer_kwargs(args)`` turns them into :func:`time_methods` keywords (and
applies ``--threads``: call it before building models).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.metadata
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch

from monkey_kernels import settings
from monkey_kernels.ops.backends import BACKENDS

__all__ = [
    "BACKENDS",
    "SCHEMA_VERSION", "RESULTS_DIR", "REPO_ROOT", "CUDA_TIMERS", "Timing", "time_methods", "peak_memory_bytes",
    "make_row", "timing_rows", "make_result", "result_path", "plot_path", "write_result", "load_result",
    "default_backend", "other_backends", "bench_backends", "patched_copies", "markdown_table", "plot_grouped_bars",
    "report", "add_timer_args", "timer_kwargs", "AMP_DTYPES", "add_amp_arg", "autocast_context",
    "cpu_name", "device_name", "slug", "git_commit", "package_version", "synchronize",
]

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent  # the source checkout holding benchmarks/
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
CUDA_TIMERS = ("do_bench", "events", "graph")
_L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H200: 50 MiB)


# ---------------------------------------------------------------------------------------------------------
# Device and environment facts (read at call time)
# ---------------------------------------------------------------------------------------------------------
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


def _as_device(device: Union[torch.device, str, None]) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        return device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be a torch.device or a device string, got {device!r}") from error


def device_name(device: Union[torch.device, str]) -> str:
    """``torch.cuda.get_device_name`` on CUDA, ``"CPU (<model>)"`` otherwise."""
    device = _as_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = cpu_name()
    return f"CPU ({model})" if model else "CPU"


def slug(text: str) -> str:
    """A file-name-safe lower-case form of ``text`` (at most 48 characters)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48].strip("-") or "device"


def package_version(name: str) -> Optional[str]:
    """The installed distribution's version, without importing it (``None`` when not installed)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """``HEAD`` of the repository holding this file, or ``"unknown"`` (no git, not a checkout)."""
    try:
        proc = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = proc.stdout.strip()
    return commit if proc.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else "unknown"


def default_backend(device: Union[torch.device, str]) -> str:
    """The backend users get on ``device``: ``monkey_kernels.resolve_backend(None, device)``."""
    from monkey_kernels import resolve_backend  # noqa: PLC0415 (keeps this module's import light)

    return resolve_backend(None, _as_device(device))


def other_backends(device: Union[torch.device, str], default: str) -> List[str]:
    """The backends other than ``default`` that run on ``device``, in the order triton, native, torch.

    Triton on a non-CUDA device (the interpreter: minutes per call at benchmark sizes) is left out.
    """
    from monkey_kernels import resolve_backend  # noqa: PLC0415

    device = _as_device(device)
    found = []
    for name in BACKENDS:
        if name == default or (name == "triton" and device.type != "cuda"):
            continue
        try:
            resolve_backend(name, device)
        except ValueError:
            continue
        found.append(name)
    return found


def bench_backends(device: Union[torch.device, str], requested: Optional[Sequence[str]] = None) -> List[str]:
    """The backends a bench runs: ``requested`` when given, else the device's default first (the ``fused`` /
    ``patched`` method), then every other backend that runs there."""
    if requested:
        return list(requested)
    default = default_backend(device)
    return [default] + other_backends(device, default)


def patched_copies(reference, backends: Sequence[str]):
    """``(models, reports)``: a patched deep copy of ``reference`` per backend, named ``patched`` (the first) and
    ``patched_<backend>``, and the ``str`` of each copy's patch report under the same names."""
    import copy  # noqa: PLC0415

    from monkey_kernels.patching import patch_model  # noqa: PLC0415

    models, reports = {}, {}
    for i, backend in enumerate(backends):
        name = "patched" if i == 0 else f"patched_{backend}"
        models[name] = copy.deepcopy(reference)
        reports[name] = str(patch_model(models[name], backend=backend))
    return models, reports


def synchronize(device: Union[torch.device, str]) -> None:
    device = _as_device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------
# The timer
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """One method's result: ``ms`` (median over rounds), ``ratio_to_base`` (median of per-round ratios),
    the per-round samples and the timer that produced them (``perf_counter``, ``do_bench``, ``events``,
    ``graph``)."""

    method: str
    ms: float
    ratio_to_base: Optional[float]
    samples_ms: List[float] = field(default_factory=list)
    timer: str = "perf_counter"


def _grad_lists(grad_to_none, names: Sequence[str]) -> Dict[str, List[torch.Tensor]]:
    if grad_to_none is None:
        return {name: [] for name in names}
    if isinstance(grad_to_none, Mapping):
        unknown = set(grad_to_none) - set(names)
        if unknown:
            raise ValueError(f"grad_to_none names methods that are not timed: {sorted(unknown)}")
        return {name: list(grad_to_none.get(name, ())) for name in names}
    tensors = list(grad_to_none)
    return {name: tensors for name in names}


def _reset_grads(tensors: Iterable[torch.Tensor]) -> None:
    for tensor in tensors:
        tensor.grad = None


class _CudaSampler:
    """One CUDA measurement (ms) of a callable, by the chosen timer."""

    def __init__(self, device: torch.device, timer: str, rep_ms: int, iters: int, flush_l2: bool):
        self.device, self.timer, self.rep_ms, self.iters, self.flush_l2 = device, timer, rep_ms, iters, flush_l2
        self._flush = None
        self.used: Dict[str, str] = {}

    def __call__(self, name: str, fn: Callable[[], Any], grads: List[torch.Tensor]) -> float:
        import triton.testing  # noqa: PLC0415 (CUDA path only)

        if self.timer == "graph":
            torch.cuda.synchronize(self.device)  # do_bench_cudagraph runs on a side stream
            try:
                ms = triton.testing.do_bench_cudagraph(fn, rep=self.rep_ms, grad_to_none=grads or None,
                                                       return_mode="median")
                self.used.setdefault(name, "graph")
                return ms
            except RuntimeError as error:
                print(f"[harness] CUDA graph capture of {name} failed ({error}); timing it with do_bench",
                      file=sys.stderr)
                torch.cuda.synchronize(self.device)
                self.used[name] = "do_bench"
        if self.timer in ("do_bench", "graph"):
            self.used.setdefault(name, "do_bench")
            return triton.testing.do_bench(fn, rep=self.rep_ms, grad_to_none=grads or None, return_mode="median")
        self.used.setdefault(name, "events")
        if self.flush_l2 and self._flush is None:
            self._flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=self.device)
        samples = []
        for _ in range(self.iters):
            _reset_grads(grads)
            if self._flush is not None:
                self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return statistics.median(samples)


def time_methods(methods: Mapping[str, Callable[[], Any]], device: Union[torch.device, str, None] = None, *,
                 base: Optional[str] = None, rounds: Optional[int] = None, iters: int = 1, warmup: int = 1,
                 grad_to_none=None, cuda_timer: str = "do_bench", rep_ms: int = 100,
                 flush_l2: bool = True) -> Dict[str, Timing]:
    """Times every method of ``methods`` interleaved in rounds; see the module docstring.

    Returns ``{name: Timing}`` in the order of ``methods``. ``rounds`` defaults to 15 on CPU, 3 on CUDA.
    """
    if not isinstance(methods, Mapping) or not methods:
        raise ValueError("methods must be a non-empty mapping of name -> callable")
    for name, fn in methods.items():
        if not callable(fn):
            raise ValueError(f"methods[{name!r}] must be callable, got {type(fn).__name__}")
    names = list(methods)
    base = names[0] if base is None else base
    if base not in methods:
        raise ValueError(f"base must be one of the methods {names}, got {base!r}")
    device = _as_device(device)
    on_cuda = device.type == "cuda"
    rounds = (3 if on_cuda else 15) if rounds is None else rounds
    for arg, value, low in (("rounds", rounds, 1), ("iters", iters, 1), ("warmup", warmup, 0), ("rep_ms", rep_ms, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{arg} must be an int >= {low}, got {value!r}")
    if cuda_timer not in CUDA_TIMERS:
        raise ValueError(f"cuda_timer must be one of {CUDA_TIMERS}, got {cuda_timer!r}")
    grads = _grad_lists(grad_to_none, names)

    for name in names:  # first-call costs (allocations, lazy loads, autotuning) stay out of the samples
        for _ in range(warmup):
            _reset_grads(grads[name])
            methods[name]()
    synchronize(device)

    cuda_sampler = _CudaSampler(device, cuda_timer, rep_ms, iters, flush_l2) if on_cuda else None
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            fn = methods[name]
            if cuda_sampler is not None:
                samples[name].append(cuda_sampler(name, fn, grads[name]))
                continue
            total = 0.0
            for _ in range(iters):
                _reset_grads(grads[name])
                start = time.perf_counter()
                fn()
                total += time.perf_counter() - start
            samples[name].append(total / iters * 1e3)

    timings = {}
    for name in names:
        ratios = [t / b for t, b in zip(samples[name], samples[base]) if b > 0]
        timings[name] = Timing(
            method=name, ms=statistics.median(samples[name]),
            ratio_to_base=statistics.median(ratios) if ratios else None,
            samples_ms=[round(s, 6) for s in samples[name]],
            timer=cuda_sampler.used.get(name, cuda_timer) if cuda_sampler is not None else "perf_counter",
        )
    return timings


def peak_memory_bytes(fn: Callable[[], Any], device: Union[torch.device, str, None]) -> Optional[int]:
    """Peak CUDA allocation during one ``fn()`` above what was allocated before it; ``None`` (and ``fn`` not
    called) on other devices."""
    device = _as_device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


# ---------------------------------------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------------------------------------
ROW_KEYS = ("case", "method", "mode", "ms", "ratio_to_base", "peak_memory_bytes")


def make_row(case: str, method: str, mode: str, ms: Optional[float], ratio_to_base: Optional[float] = None,
             peak_memory_bytes: Optional[int] = None, **extra: Any) -> dict:
    """One result row (see the module docstring); ``extra`` fields follow the fixed ones."""
    if not isinstance(case, str) or not isinstance(method, str) or not isinstance(mode, str):
        raise ValueError(f"case, method and mode must be strings, got {case!r}, {method!r}, {mode!r}")
    clash = set(extra) & set(ROW_KEYS)
    if clash:
        raise ValueError(f"extra fields must not repeat the fixed ones: {sorted(clash)}")
    row = {"case": case, "method": method, "mode": mode, "ms": ms, "ratio_to_base": ratio_to_base,
           "peak_memory_bytes": peak_memory_bytes}
    row.update(extra)
    return row


def timing_rows(case: str, mode: str, timings: Mapping[str, Timing],
                peaks: Optional[Mapping[str, Optional[int]]] = None, **extra: Any) -> List[dict]:
    """One row per timed method (``timer`` recorded as an extra field)."""
    peaks = peaks or {}
    return [make_row(case, t.method, mode, round(t.ms, 6),
                     None if t.ratio_to_base is None else round(t.ratio_to_base, 4),
                     peaks.get(t.method), timer=t.timer, **extra) for t in timings.values()]


def make_result(bench: str, device: Union[torch.device, str], rows: Sequence[dict], *,
                backend: Optional[str] = None, config: Optional[dict] = None, **extra: Any) -> dict:
    """The result envelope around ``rows``; ``backend`` defaults to :func:`default_backend` of ``device``."""
    device = _as_device(device)
    if backend is None:
        try:
            backend = default_backend(device)
        except ValueError as error:
            backend = f"error: {error}"
    result = {
        "schema_version": SCHEMA_VERSION,
        "bench": bench,
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "peft": package_version("peft"),
        "python": platform.python_version(),
        "backend": backend,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "malloc_tuning": _malloc_tuned(),
        "settings": {name: setting.raw() for name, setting in settings.SETTINGS.items() if setting.is_set()},
        "config": dict(config or {}),
    }
    result.update(extra)
    result["rows"] = [dict(row) for row in rows]
    return result


def _malloc_tuned() -> bool:
    from monkey_kernels import _native  # noqa: PLC0415

    return _native.allocator_tuned()


def result_path(bench: str, device: Union[torch.device, str], date: Optional[str] = None,
                results_dir: Union[Path, str] = RESULTS_DIR, suffix: str = ".json") -> Path:
    """``<results_dir>/<bench>_<device-slug>_<date>.json`` (``date`` defaults to today, UTC)."""
    date = date or datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    return Path(results_dir) / f"{bench}_{slug(device_name(device))}_{date}{suffix}"


def plot_path(json_path: Union[Path, str]) -> Path:
    return Path(json_path).with_suffix(".png")


def _json_default(value):
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_result(result: dict, path: Union[Path, str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    return path


def load_result(path: Union[Path, str]) -> dict:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------------------------
# Output: markdown table, grouped bars
# ---------------------------------------------------------------------------------------------------------
def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "peak_memory_bytes":
        return f"{value / 2**20:.1f}"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if key.startswith("ratio") or key.endswith("ratio") or key.startswith("speedup"):
            return f"{value:.2f}x"
        if abs(value) != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.2e}"
        return f"{value:.4g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


_HEADERS = {"ratio_to_base": "x base", "peak_memory_bytes": "peak MiB"}


def markdown_table(rows: Sequence[dict], columns: Optional[Sequence[str]] = None) -> str:
    """A markdown table of ``rows``: ``columns`` (default: the fixed row keys, then every other scalar field
    in order of appearance, ``peak_memory_bytes`` shown in MiB and dropped when no row has it)."""
    rows = list(rows)
    if columns is None:
        extra = []
        for row in rows:
            for key, value in row.items():
                if key not in ROW_KEYS and key not in extra and not isinstance(value, (dict, list, tuple)):
                    extra.append(key)
        columns = [k for k in ROW_KEYS if k != "peak_memory_bytes" or any(r.get(k) is not None for r in rows)]
        columns += [k for k in extra if k != "timer"]
    lines = ["| " + " | ".join(_HEADERS.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(c, row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def plot_grouped_bars(rows: Sequence[dict], path: Union[Path, str], *, value: str = "ratio_to_base",
                      group_by: Union[str, Sequence[str]] = "case", bar_by: str = "method",
                      panel_by: Optional[str] = "mode", title: str = "", ylabel: Optional[str] = None,
                      reference_line: Optional[float] = 1.0) -> Optional[Path]:
    """Grouped bars of ``value``: one panel per ``panel_by`` value, one tick per ``group_by`` value(s), one
    bar per ``bar_by`` value; rows without ``value`` are skipped. Returns ``path``, or ``None`` when matplotlib
    is not installed or nothing is plottable."""
    try:
        import matplotlib  # noqa: PLC0415 (optional)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    group_keys = [group_by] if isinstance(group_by, str) else list(group_by)
    rows = [r for r in rows if r.get(value) is not None]
    if not rows:
        return None
    panels = list(dict.fromkeys(r.get(panel_by) for r in rows)) if panel_by else [None]
    all_bars = list(dict.fromkeys(r.get(bar_by) for r in rows))
    colors = {bar: plt.get_cmap("tab10" if len(all_bars) <= 10 else "tab20")(i % 20) for i, bar in enumerate(all_bars)}
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 4.5 * len(panels)), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        panel_rows = [r for r in rows if panel_by is None or r.get(panel_by) == panel]
        groups = list(dict.fromkeys(tuple(r.get(k) for k in group_keys) for r in panel_rows))
        bars = [b for b in all_bars if any(r.get(bar_by) == b for r in panel_rows)]  # one colour per bar everywhere
        width = 0.8 / max(1, len(bars))
        for j, bar in enumerate(bars):
            heights = []
            for group in groups:
                match = [r[value] for r in panel_rows
                         if tuple(r.get(k) for k in group_keys) == group and r.get(bar_by) == bar]
                heights.append(match[0] if match else 0.0)
            ax.bar([i + j * width for i in range(len(groups))], heights, width, label=str(bar), color=colors[bar])
        ax.set_xticks([i + width * (len(bars) - 1) / 2 for i in range(len(groups))])
        ax.set_xticklabels(["\n".join(str(g) for g in group) for group in groups], fontsize="small")
        ax.set_ylabel(ylabel or value)
        if panel is not None:
            ax.set_title(str(panel))
        if reference_line is not None:
            ax.axhline(reference_line, color="black", linewidth=0.8, linestyle="--")
        ax.legend(fontsize="x-small")
    fig.suptitle(title, fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(rows: Sequence[dict], columns: Sequence[str], out: Union[Path, str], heading: str, *, plot: bool = True,
           notes: Sequence[str] = (), **plot_options: Any) -> None:
    """What every bench prints last: ``### heading``, the rows as a markdown table (``columns``), ``notes`` lines,
    the PNG plot beside the JSON ``out`` (``plot_grouped_bars`` with ``plot_options``) and the JSON's path."""
    print(f"\n### {heading}\n")
    print(markdown_table(rows, columns))
    for note in notes:
        print(note)
    if plot:
        png = plot_grouped_bars(rows, plot_path(out), **plot_options)
        if png:
            print(f"plot: {png}")
    print(f"results: {out}")


# ---------------------------------------------------------------------------------------------------------
# Command-line plumbing shared by the scripts
# ---------------------------------------------------------------------------------------------------------
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def add_amp_arg(parser: argparse.ArgumentParser, what: str, note: str = "") -> None:
    """Adds ``--amp bf16|fp16`` (default ``None``: no autocast); ``what`` says what stays fp32, ``note`` anything
    the bench does besides (e.g. its fp16 steps' ``GradScaler``)."""
    parser.add_argument("--amp", choices=list(AMP_DTYPES), default=None,
                        help=f"{what} in fp32, every forward of every method under torch.autocast in this dtype "
                             f"(the Trainer's bf16=True / fp16=True){'; ' + note if note else ''}")


def autocast_context(device: torch.device, amp: Optional[str]):
    """``torch.autocast`` in the ``amp`` dtype (a key of ``AMP_DTYPES``) on ``device``, or a no-op context when
    ``amp`` is ``None``: the one way every bench runs its methods under mixed precision."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def add_timer_args(parser: argparse.ArgumentParser, rounds: Optional[int] = None, iters: int = 1,
                   warmup: int = 1) -> None:
    """Adds ``--rounds --iters --warmup --cuda-timer --rep-ms`` (``rounds`` None: 15 on CPU, 3 on CUDA)."""
    group = parser.add_argument_group("timer (benchmarks/common.py)")
    group.add_argument("--rounds", type=int, default=rounds,
                       help="interleaved rounds, each method once per round (default: 15 on CPU, 3 on CUDA)")
    group.add_argument("--iters", type=int, default=iters, help="calls per method per round (CPU / events)")
    group.add_argument("--warmup", type=int, default=warmup, help="untimed calls of each method first")
    group.add_argument("--cuda-timer", choices=CUDA_TIMERS, default="do_bench",
                       help="CUDA: triton do_bench, CUDA events (L2 flushed), or do_bench_cudagraph")
    group.add_argument("--rep-ms", type=int, default=100, help="CUDA do_bench window per measurement (ms)")
    group.add_argument("--threads", type=int, default=None,
                       help="CPU: torch intra-op threads (default: torch's; 1 is steadier on a shared machine)")


def timer_kwargs(args: argparse.Namespace) -> dict:
    """The :func:`time_methods` keywords of the parsed timer options (and applies ``--threads``)."""
    if getattr(args, "threads", None):
        if args.threads < 1:
            raise ValueError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    return dict(rounds=args.rounds, iters=args.iters, warmup=args.warmup, cuda_timer=args.cuda_timer,
                rep_ms=args.rep_ms)
