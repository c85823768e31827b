"""The one settings module (``monkey_kernels.settings``): every environment variable the code base reads is declared
there, the README's table lists exactly those with the same defaults, bad values are refused with a ValueError
naming the variable and the value, and no other module reads the environment for them (Python or C++)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from monkey_kernels import settings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def _readme_rows() -> dict:
    """``name -> (default, values)`` of the README's "Environment variables" table."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Environment variables\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"^\| `([A-Z0-9_]+)` \| (.*?) \| (.*?) \| .* \|$", line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3))
    return rows


def test_the_readme_table_lists_every_setting_with_its_default():
    rows = _readme_rows()
    assert sorted(rows) == sorted(settings.SETTINGS), "README table and monkey_kernels.settings differ"
    for name, setting in settings.SETTINGS.items():
        assert rows[name] == (setting.default_text, setting.values), name
    # The table is the generated one, row for row.
    assert settings.markdown_table() in README.read_text(encoding="utf-8")


def _variables_in_code() -> set:
    """Every MONKEY_KERNELS_* name written anywhere in the code base (Python, C++, shell)."""
    found = set()
    for folder in ("monkey_kernels", "triton_kernels", "csrc", "tests", "benchmarks", "scripts", "examples"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".cpp", ".h", ".cu", ".sh") and path.is_file():
                found |= set(re.findall(r"MONKEY_KERNELS_[A-Z0-9_]*[A-Z0-9]", path.read_text(encoding="utf-8")))
    found |= set(re.findall(r"MONKEY_KERNELS_[A-Z0-9_]*[A-Z0-9]", (ROOT / "setup.py").read_text(encoding="utf-8")))
    return found


def test_every_variable_named_in_the_code_is_declared():
    assert _variables_in_code() <= set(settings.SETTINGS), _variables_in_code() - set(settings.SETTINGS)


def test_no_module_reads_a_declared_variable_around_the_settings():
    """``os.environ.get`` / ``getenv`` of a declared name (as a literal) appears nowhere but in the settings."""
    pattern = re.compile(r"(environ\.get|environ\[|getenv)\(?\s*[\"'](MONKEY_KERNELS_\w+|TRITON_INTERPRET)[\"']")
    offenders = []
    for folder in ("monkey_kernels", "triton_kernels", "csrc", "benchmarks", "tests/conftest.py", "tests/ops",
                   "tests/tools", "setup.py"):
        base = ROOT / folder
        for path in ([base] if base.is_file() else base.rglob("*")):
            if path.suffix in (".py", ".cpp", ".h", ".cu") and path.is_file() and path.name != "settings.py":
                offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in pattern.finditer(path.read_text())]
    assert offenders == []
    assert "getenv" not in "".join(p.read_text() for p in (ROOT / "csrc").rglob("*") if p.is_file())


@pytest.mark.parametrize("setting, value, expected", [
    (settings.BACKEND, " Torch ", "torch"),
    (settings.BACKEND, "", "auto"),
    (settings.POISON, "yes", True),
    (settings.POISON, "0", False),
    (settings.CPU_GEMM, "TILED", "tiled"),
    (settings.LOWRANK_ISA, "avx2", "avx2"),
    (settings.GEMM, " CUBLAS ", "cublas"),
    (settings.TEST_SEED, "4294967295", 2**32 - 1),
    (settings.GPU_SESSION_STUB_SLEEP, "op_batch1=12, encoder=0.5", {"op_batch1": 12.0, "encoder": 0.5}),
    (settings.MALLOC_TUNING, None, False),
])
def test_values_are_parsed(monkeypatch, setting, value, expected):
    if value is None:
        monkeypatch.delenv(setting.name, raising=False)
    else:
        monkeypatch.setenv(setting.name, value)
    assert setting.get() == expected


def test_paths_default_under_the_home_cache_and_expand_the_user(monkeypatch, tmp_path):
    monkeypatch.delenv(settings.CACHE.name, raising=False)
    assert settings.CACHE.get() == Path.home() / ".cache" / "monkey_kernels"
    monkeypatch.setenv(settings.CACHE.name, "~/elsewhere")
    assert settings.CACHE.get() == Path.home() / "elsewhere"
    monkeypatch.setenv(settings.AUTOTUNE_CACHE.name, str(tmp_path))
    assert settings.AUTOTUNE_CACHE.get() == tmp_path


@pytest.mark.parametrize("setting, value, message", [
    (settings.BACKEND, "cuda-magic", "MONKEY_KERNELS_BACKEND must be auto, triton, native or torch, got 'cuda-magic'"),
    (settings.POISON, "maybe", "MONKEY_KERNELS_POISON must be 1 or 0 .*, got 'maybe'"),
    (settings.NO_NATIVE, "2", "MONKEY_KERNELS_NO_NATIVE must be 1 or 0"),
    (settings.CPU_GEMM, "cublas", "MONKEY_KERNELS_CPU_GEMM must be auto, blas or tiled, got 'cublas'"),
    (settings.LOWRANK_ISA, "sse", "MONKEY_KERNELS_LOWRANK_ISA must be avx512, avx2 or portable, got 'sse'"),
    (settings.GEMM, "cutlass", "MONKEY_KERNELS_GEMM must be auto, triton or cublas, got 'cutlass'"),
    (settings.TEST_SEED, "-1", r"MONKEY_KERNELS_TEST_SEED must be an integer in \[0, 2\*\*32\), got '-1'"),
    (settings.TEST_SEED, "seven", "MONKEY_KERNELS_TEST_SEED must be an integer"),
    (settings.GPU_SESSION_STUB_SLEEP, "op_batch1", "MONKEY_KERNELS_GPU_SESSION_STUB_SLEEP must be step=seconds"),
    (settings.GPU_SESSION_STUB_SLEEP, "a=b", "MONKEY_KERNELS_GPU_SESSION_STUB_SLEEP must be step=seconds"),
    (settings.TRITON_INTERPRET, "sometimes", "TRITON_INTERPRET must be 1 or 0"),
])
def test_bad_values_raise_naming_the_variable_and_the_value(monkeypatch, setting, value, message):
    monkeypatch.setenv(setting.name, value)
    with pytest.raises(ValueError, match=message):
        setting.get()
    assert settings.effective()[setting.name][1] == "invalid"


def test_a_bad_backend_variable_fails_the_op_call_naming_it(monkeypatch):
    import torch

    from monkey_kernels import resolve_backend

    monkeypatch.setenv(settings.BACKEND.name, "fast")
    with pytest.raises(ValueError, match="MONKEY_KERNELS_BACKEND must be .*, got 'fast'"):
        resolve_backend(None, torch.device("cpu"))


def test_effective_values_name_their_source(monkeypatch):
    monkeypatch.setenv(settings.GEMM.name, "cublas")
    monkeypatch.delenv(settings.CPU_GEMM.name, raising=False)
    current = settings.effective()
    assert set(current) == set(settings.SETTINGS)
    assert current[settings.GEMM.name] == ("cublas", "environment")
    assert current[settings.CPU_GEMM.name] == ("auto", "default")


def test_info_prints_every_setting(monkeypatch, capsys):
    from monkey_kernels import cli

    monkeypatch.setenv(settings.LOWRANK_ISA.name, "portable")
    info = cli.run(["info"])
    out = capsys.readouterr().out
    assert set(info["settings"]) == set(settings.SETTINGS)
    assert info["settings"][settings.LOWRANK_ISA.name] == "portable (environment)"
    assert all(name in out for name in settings.SETTINGS)


def test_importing_the_settings_imports_no_torch():
    code = "import sys; from monkey_kernels import settings; print('torch' in sys.modules, len(settings.SETTINGS))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", str(len(settings.SETTINGS))]
