"""The ``monkey-kernels`` command line: ``info``, ``demo`` and ``bench`` (CPU, tiny sizes).

tests/conftest.py sets TRITON_INTERPRET=1 without a GPU, so in-process runs would pick the (slow) Triton
interpreter by default: every run here names its backends (``--backend`` / ``--backends``).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import require_native
from monkey_kernels import cli

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_info_prints_backends(capsys):
    info = cli.run(["info"])
    out = capsys.readouterr().out
    for key in ("torch", "triton", "transformers", "peft", "cuda", "TRITON_INTERPRET",
                "backend for CPU tensors", "backend for CUDA tensors", "bundled ptxas"):
        assert key in info and key in out
    assert info["backend for CUDA tensors"].startswith("triton")
    if info["native extension"] in ("prebuilt", "jit"):
        assert info["native low-rank GEMMs"].split()[0] in ("avx512", "avx2", "portable")
        assert "runs on tiled kernel" in info["native base GEMM"] or "runs on BLAS" in info["native base GEMM"]
    assert cli.main(["info"]) == 0


def test_module_entry_point_runs_info():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "monkey_kernels", "info"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "backend for CPU tensors" in proc.stdout


def test_demo_small_matches_reference(capsys):
    result = cli.run(["demo", "--config", "small", "--resolution", "224x224", "--batch", "1", "--device", "cpu",
                      "--backend", "torch", "--repeats", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert result["backend"] == "torch" and result["grid"] == [2, 2]
    assert result["output_max_rel_diff"] < 1e-4
    assert result["grad_max_rel_diff"] < 1e-4
    # Timed by the harness: both methods in both modes, ratios paired per round, no peak memory on CPU.
    rows = {(r["method"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(m, mode) for m in ("reference", "patched") for mode in ("fwd", "fwd_bwd")}
    assert all(r["ms"] > 0 and r["peak_memory_bytes"] is None for r in rows.values())
    assert rows[("reference", "fwd")]["ratio_to_base"] == 1.0
    assert result["speedup_forward"] == pytest.approx(1 / rows[("patched", "fwd")]["ratio_to_base"], rel=1e-2)
    # The printed report carries the same numbers, as a table.
    line = next(line for line in out.splitlines() if line.startswith("output"))
    assert float(line.split("max rel diff")[1].split()[0]) < 1e-4
    assert "| case | method | mode | ms | speedup |" in out and "speed-up" in out


def test_bad_arguments_exit_2(capsys):
    for argv in (["demo", "--resolution", "896"], ["demo", "--batch", "0"], ["info", "--nope"], ["frobnicate"],
                 ["bench", "--which", "nothing"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2, argv


def test_failure_exits_1_with_message(capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert cli.main(["demo", "--device", "cuda", "--backend", "torch"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


def _bench_multi_lora(tmp_path, *extra):
    require_native()
    return cli.run(["bench", "--which", "multi_lora", "--quick", "--no-progress", "--out-dir", str(tmp_path),
                    "--widths", "48", "--tokens", "16", "--rounds", "2", "--backends", "native", "torch", *extra])


def test_bench_multi_lora_writes_json_in_the_harness_schema(tmp_path, capsys):
    """Through the CLI at a tiny size: every method timed in both modes, the harness's envelope and file name,
    a markdown table printed, every method's error against float64 tiny."""
    result = _bench_multi_lora(tmp_path, "--no-plot")
    [json_path] = [Path(p) for p in result["json"]]
    assert json_path.parent == tmp_path and json_path.name.startswith("multi_lora_cpu")
    data = json.loads(json_path.read_text())
    assert data == json.loads(json.dumps(result["results"]["multi_lora"]))
    for key in ("schema_version", "device", "threads", "torch", "triton", "transformers", "backend", "date",
                "git_commit", "config", "rows"):
        assert key in data, key
    methods = {(r["method"], r["mode"]) for r in data["rows"]}
    assert {("base", "fwd"), ("fused", "fwd"), ("fused_torch", "fwd"), ("loop", "fwd_bwd"),
            ("fused", "fwd_bwd"), ("peft", "fwd")} <= methods
    assert ("peft", "fwd_bwd") not in methods  # PEFT refuses adapter_names in training
    fused = next(r for r in data["rows"] if r["method"] == "fused")
    assert fused["backend"] == "native" and fused["ms"] > 0 and fused["ratio_to_base"] > 0
    assert max(data["validation_rel_errors"]["w48 b1"].values()) < 1e-4
    assert result["plots"] == []
    assert "| case | method | mode | ms | x base |" in capsys.readouterr().out


def test_bench_multi_lora_plot(tmp_path):
    pytest.importorskip("matplotlib")
    result = _bench_multi_lora(tmp_path, "--modes", "fwd", "--methods", "base", "fused")
    [png] = [Path(p) for p in result["plots"]]
    assert png.suffix == ".png" and png.stat().st_size > 0 and png.stem == Path(result["json"][0]).stem


def test_bench_rejects_pass_through_for_several_benchmarks(tmp_path, capsys):
    assert cli.main(["bench", "--which", "multi_lora", "slp", "--out-dir", str(tmp_path), "--batches", "1"]) == 1
    assert "--which" in capsys.readouterr().err


def test_harness_timer_interleaves_rounds_and_pairs_ratios(monkeypatch):
    """The one timer (monkey_kernels.benchmarking) on a fake clock: each round runs every method once, order rotated;
    ms is the median over rounds and ratio_to_base the median of per-round ratios, so a machine whose speed
    changes between rounds (factors 1 and 5 here) still gives the exact ratio."""
    from monkey_kernels import benchmarking as harness
    clock, calls = [0.0], []
    factors = [1, 5, 1, 5, 1]

    def method(name, cost):
        def run():
            clock[0] += cost * factors[len(calls) // 2] * 1e-3
            calls.append(name)
        return run

    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])
    timings = harness.time_methods({"base": method("base", 1.0), "slow": method("slow", 2.0)}, "cpu",
                                   rounds=5, warmup=0)
    assert calls == ["base", "slow", "slow", "base", "base", "slow", "slow", "base", "base", "slow"]
    assert timings["base"].ms == pytest.approx(1.0) and timings["slow"].ms == pytest.approx(2.0)
    assert timings["slow"].ratio_to_base == pytest.approx(2.0) and timings["base"].ratio_to_base == 1.0
    assert timings["slow"].samples_ms == pytest.approx([2, 10, 2, 10, 2]) and timings["slow"].timer == "perf_counter"
    rows = harness.timing_rows("case", "fwd", timings, batch=1)
    assert [(r["method"], r["ratio_to_base"], r["peak_memory_bytes"], r["batch"]) for r in rows] == [
        ("base", 1.0, None, 1), ("slow", 2.0, None, 1)]
    assert "| case | base | fwd | 1 | 1.00x |" in harness.markdown_table(rows)
    result = harness.make_result("demo_test", "cpu", rows, backend="torch", config={"x": 1})
    assert result["schema_version"] == harness.SCHEMA_VERSION and result["rows"] == rows
    assert harness.result_path("demo_test", "cpu", "2026-01-02").name.startswith("demo_test_cpu")
    assert harness.result_path("demo_test", "cpu", "2026-01-02").name.endswith("_2026-01-02.json")


@pytest.mark.parametrize("kwargs, match", [
    (dict(methods={}), "methods must be a non-empty mapping"),
    (dict(methods={"a": 1}), "must be callable"),
    (dict(methods={"a": lambda: None}, base="b"), "base must be one of"),
    (dict(methods={"a": lambda: None}, rounds=0), "rounds must be"),
    (dict(methods={"a": lambda: None}, cuda_timer="x"), "cuda_timer must be one of"),
])
def test_harness_timer_rejects_bad_arguments(kwargs, match):
    from monkey_kernels import benchmarking as harness
    with pytest.raises(ValueError, match=match):
        harness.time_methods(device="cpu", **kwargs)
