"""Every environment variable monkey-kernels reads, declared once: name, default, allowed values, meaning, and
when it is read. The package, the native extension's loader (which passes the values the C++ needs: the C++ reads
no environment), the tests, the benchmarks, ``setup.py`` and the scripts all read them through here.

Each variable is a :class:`Setting`; ``SETTING.get()`` reads the environment **now** (a test or a user may change
a variable at run time, e.g. ``MONKEY_KERNELS_BACKEND`` between calls) and returns the checked value, or raises a
``ValueError`` naming the variable and the bad value. Unset and empty mean the default. Flags take ``1`` / ``0``
(also ``true`` / ``false``, ``yes`` / ``no``, ``on`` / ``off``, ``y`` / ``n``, any case).

The README's "Environment variables" table lists the same variables with the same defaults (a test checks it);
``monkey-kernels info`` prints their effective values (:func:`effective`).

Imports nothing heavy (no torch): ``setup.py`` and the command line's ``--help`` read it too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Dict, Optional, Tuple

from monkey_kernels.ops.registry import BACKENDS

__all__ = [
    "Setting", "SETTINGS", "effective", "markdown_table",
    "BACKEND", "POISON", "NO_NATIVE", "NO_JIT", "CACHE", "MALLOC_TUNING", "GEMM", "AUTOTUNE_CACHE", "CPU_GEMM",
    "LOWRANK_ISA", "TRACEBACK", "TRITON_INTERPRET", "TRITON_CACHE_DIR", "TEST_SEED", "FUZZ", "ALLOW_NO_NATIVE",
    "COMPILE_LEAN", "NO_BUILD", "GPU_SESSION_STUB_SLEEP",
]

_TRUE = ("1", "true", "yes", "on", "y")
_MISSING = object()
_parsed: Dict[Tuple[str, Any], Any] = {}  # (name, raw text) -> value, for the texts seen so far (immutable values)
_encoded: Dict[str, Any] = {}


def _lookup(name: str):
    """The variable's raw value now (``str``, or ``bytes`` on POSIX), ``None`` when unset.

    Why not ``os.environ.get``: for an unset variable it raises and catches a ``KeyError`` (about 0.6 us), and the
    native ops read three settings per call. CPython's ``os.environ`` keeps its values in a dict of encoded names
    (``_data``), updated by every write through ``os.environ`` (pytest's ``monkeypatch.setenv`` included): a plain
    dict lookup there (about 0.03 us) sees the same values. Anything else falls back to ``os.environ.get``."""
    environ = os.environ
    data = getattr(environ, "_data", None)
    encode = getattr(environ, "encodekey", None)
    if not isinstance(data, dict) or encode is None:
        return environ.get(name)
    key = _encoded.get(name)
    if key is None:
        key = _encoded[name] = encode(name)
    return data.get(key)
_FALSE = ("0", "false", "no", "off", "n")


@dataclass(frozen=True)
class Setting:
    """One environment variable.

    Attributes:
        name: the variable.
        default: the value when it is unset or empty.
        values: the allowed values, as the README shows them.
        doc: one line: what it does.
        read: when the package reads it (``"every call"``, ``"first load"``, ...).
        parse: the stripped, non-empty text -> the value; raises ``ValueError`` (use :meth:`invalid`).
        choices: the allowed words of a choice setting (compared lower-case), else empty.
        default_text: the default as the README's table writes it.
    """

    name: str
    default: Any
    values: str
    doc: str
    read: str
    parse: Callable[["Setting", str], Any] = field(repr=False)
    choices: Tuple[str, ...] = ()
    default_text: str = ""

    def raw(self) -> Optional[str]:
        """The variable's text now, ``None`` when unset."""
        return os.environ.get(self.name)

    def is_set(self) -> bool:
        """Whether the variable holds a non-empty value now."""
        value = os.environ.get(self.name)
        return value is not None and value.strip() != ""

    def get(self) -> Any:
        """The checked value now (the default when unset or empty); ``ValueError`` naming the variable otherwise."""
        value = _lookup(self.name)
        if value is None:
            return self.default
        key = (self.name, value)
        parsed = _parsed.get(key, _MISSING)
        if parsed is _MISSING:  # parsed once per text: the native ops read three settings per call
            text = (os.fsdecode(value) if isinstance(value, bytes) else value).strip()
            parsed = self.default if text == "" else self.parse(self, text)
            _parsed[key] = parsed
        return parsed

    def invalid(self, text: str, expected: str) -> ValueError:
        return ValueError(f"{self.name} must be {expected}, got {text!r}")


def _flag(setting: Setting, text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise setting.invalid(text, "1 or 0 (also true/false, yes/no, on/off)")


def _choice(setting: Setting, text: str) -> str:
    lowered = text.lower()
    if lowered not in setting.choices:
        words = ", ".join(setting.choices[:-1]) + f" or {setting.choices[-1]}"
        raise setting.invalid(text, words)
    return lowered


def _path(setting: Setting, text: str) -> Path:
    return Path(text).expanduser()


def _seed(setting: Setting, text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise setting.invalid(text, "an integer in [0, 2**32)") from None
    if not 0 <= seed < 2**32:
        raise setting.invalid(text, "an integer in [0, 2**32)")
    return seed


def _step_seconds(setting: Setting, text: str) -> MappingProxyType:
    parsed = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        step, sep, seconds = item.partition("=")
        try:
            parsed[step.strip()] = float(seconds)
        except ValueError:
            raise setting.invalid(text, "step=seconds pairs separated by commas, e.g. op_batch1=12") from None
        if not sep or not step.strip():
            raise setting.invalid(text, "step=seconds pairs separated by commas, e.g. op_batch1=12")
    return MappingProxyType(parsed)


def _flag_setting(name: str, doc: str, read: str, default: bool = False) -> Setting:
    return Setting(name, default, "`1` / `0`", doc, read, _flag, default_text="`1`" if default else "`0`")


def _choice_setting(name: str, choices: Tuple[str, ...], default: str, doc: str, read: str) -> Setting:
    return Setting(name, default, " / ".join(f"`{c}`" for c in choices), doc, read, _choice, choices,
                   default_text=f"`{default}`")


_HOME_CACHE = Path("~/.cache/monkey_kernels")

# --- the package --------------------------------------------------------------------------------------------
BACKEND = _choice_setting(
    "MONKEY_KERNELS_BACKEND", ("auto",) + BACKENDS, "auto",
    "the backend of every op call without `backend=` (`auto`: triton for CUDA tensors and under the Triton "
    "interpreter, native for CPU tensors when the extension loads, else torch)", "every call")
POISON = _flag_setting(
    "MONKEY_KERNELS_POISON",
    "fresh op outputs start as NaN (Triton launchers and C++ ops), so an unwritten element shows; the tests turn "
    "it on (`monkey_kernels.ops.alloc.set_poison` overrides it)", "every call")
NO_NATIVE = _flag_setting(
    "MONKEY_KERNELS_NO_NATIVE", "never load the C++ extension (CPU tensors then use the torch backend)",
    "first load of the extension")
NO_JIT = _flag_setting(
    "MONKEY_KERNELS_NO_JIT", "do not JIT-build the extension from `csrc/` when no prebuilt one imports",
    "first load of the extension")
CACHE = Setting(
    "MONKEY_KERNELS_CACHE", _HOME_CACHE.expanduser(), "a directory",
    "where the JIT-built extension (one folder per torch / Python / CUDA) and the Triton 3.6 test venv live",
    "first load of the extension; `scripts/test_triton36.sh`", _path, default_text="`~/.cache/monkey_kernels`")
MALLOC_TUNING = _flag_setting(
    "MONKEY_KERNELS_MALLOC_TUNING",
    "opt in to raising glibc's mmap / trim thresholds (32 / 128 MiB) for the whole process when the extension "
    "loads (see the CPU speed section)", "first load of the extension")
GEMM = _choice_setting(
    "MONKEY_KERNELS_GEMM", ("auto", "triton", "cublas"), "auto",
    "the Triton backend's fused GEMM: the Triton kernel, its cuBLAS twin, or (`auto`) the faster one, measured "
    "once per shape on CUDA", "every call")
AUTOTUNE_CACHE = Setting(
    "MONKEY_KERNELS_AUTOTUNE_CACHE", _HOME_CACHE.expanduser() / "gemm_choices.json",
    "a directory, or a path ending in `.json`",
    "the file of the per-shape GEMM decisions (`<dir>/gemm_choices.json` for a directory)",
    "first GEMM choice of the process", _path, default_text="`~/.cache/monkey_kernels/gemm_choices.json`")
CPU_GEMM = _choice_setting(
    "MONKEY_KERNELS_CPU_GEMM", ("auto", "blas", "tiled"), "auto",
    "the native ops' base GEMM: BLAS, the register-tiled kernel, or (`auto`) the faster one, measured once per "
    "shape", "every native op call")
LOWRANK_ISA = _choice_setting(
    "MONKEY_KERNELS_LOWRANK_ISA", ("avx512", "avx2", "portable"), "avx512",
    "caps the vector path of the native rank-sized GEMMs (a cap above the CPU's leaves the CPU's best)",
    "every native op call")
TRACEBACK = _flag_setting(
    "MONKEY_KERNELS_TRACEBACK", "`monkey-kernels` shows the traceback of a failure instead of one line",
    "on a command's failure")
TRITON_INTERPRET = Setting(
    "TRITON_INTERPRET", False, "`1` / `0`",
    "Triton's own flag: kernels run on CPU tensors through Triton's interpreter (set it before the kernels are "
    "imported); then `auto` picks triton for CPU tensors too", "every backend choice (Triton: at kernel import)",
    _flag, default_text="`0`")

TRITON_CACHE_DIR = Setting(
    "TRITON_CACHE_DIR", None, "a directory",
    "Triton's own: where it keeps compiled kernels; `benchmarks/gpu_session.py` sets it per step (under "
    "`--cache-dir`) and its dry-run stub writes there", "by Triton; by the GPU session's stub",
    _path, default_text="Triton's (`~/.triton/cache`)")

# --- tests, benchmarks, build -------------------------------------------------------------------------------
TEST_SEED = Setting(
    "MONKEY_KERNELS_TEST_SEED", None, "an integer in [0, 2**32)",
    "tests: every selected test runs with this seed (replays a failure's printed seed)", "each test", _seed,
    default_text="the test's node id (CRC-32)")
FUZZ = _flag_setting(
    "MONKEY_KERNELS_FUZZ", "tests: a fresh random seed per test, and fresh hypothesis examples", "each test")
ALLOW_NO_NATIVE = _flag_setting(
    "MONKEY_KERNELS_ALLOW_NO_NATIVE", "tests: skip the native backend's cases when the extension did not build "
    "(they fail otherwise)", "test collection")
COMPILE_LEAN = _flag_setting(
    "MONKEY_KERNELS_COMPILE_LEAN", "tests: the sm_90 compile check compiles one config per kernel variant",
    "the compile check")
NO_BUILD = _flag_setting(
    "MONKEY_KERNELS_NO_BUILD", "`setup.py` does not build the native extension", "build time")
GPU_SESSION_STUB_SLEEP = Setting(
    "MONKEY_KERNELS_GPU_SESSION_STUB_SLEEP", MappingProxyType({}), "`step=seconds,...`",
    "tests of `benchmarks/gpu_session.py`: its stub steps sleep this long", "each stub step", _step_seconds,
    default_text="none")

#: name -> setting, every variable in the README's order
SETTINGS: Dict[str, Setting] = {s.name: s for s in (
    BACKEND, POISON, NO_NATIVE, NO_JIT, CACHE, MALLOC_TUNING, GEMM, AUTOTUNE_CACHE, CPU_GEMM, LOWRANK_ISA,
    TRACEBACK, TRITON_INTERPRET, TRITON_CACHE_DIR, TEST_SEED, FUZZ, ALLOW_NO_NATIVE, COMPILE_LEAN, NO_BUILD,
    GPU_SESSION_STUB_SLEEP)}


def effective() -> Dict[str, Tuple[str, str]]:
    """``name -> (value, source)`` now: the value as text, ``source`` ``"environment"`` or ``"default"``, or
    ``"invalid"`` with the error as the value."""
    result = {}
    for name, setting in SETTINGS.items():
        try:
            value = setting.get()
        except ValueError as error:
            result[name] = (str(error), "invalid")
            continue
        if isinstance(value, MappingProxyType):
            text = ",".join(f"{key}={seconds:g}" for key, seconds in value.items())
        else:
            text = "on" if value is True else "off" if value is False else "" if value is None else str(value)
        result[name] = (text or "-", "environment" if setting.is_set() else "default")
    return result


def markdown_table() -> str:
    """The README's table of the variables (name, default, values, meaning)."""
    lines = ["| variable | default | values | meaning |", "|---|---|---|---|"]
    lines += [f"| `{s.name}` | {s.default_text} | {s.values} | {s.doc} (read: {s.read}) |" for s in SETTINGS.values()]
    return "\n".join(lines)
