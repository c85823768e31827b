"""The ``monkey-kernels`` command line: ``info``, ``demo`` and ``bench`` (CPU, torch backend, small sizes).

tests/conftest.py sets TRITON_INTERPRET=1 without a GPU, so in-process runs would pick the (slow) Triton
interpreter by default: every run here passes ``--backend torch`` or uses the benchmarks' CPU default (torch).
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

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_info_prints_backends(capsys):
    info = cli.run(["info"])
    out = capsys.readouterr().out
    for key in ("torch", "triton", "transformers", "peft", "cuda", "TRITON_INTERPRET",
                "backend for CPU tensors", "backend for CUDA tensors", "bundled ptxas"):
        assert key in info and key in out
    assert info["backend for CUDA tensors"].startswith("triton")
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
    assert result["timings"]["reference"]["forward_peak_gib"] is None  # n/a on CPU
    # The printed report carries the same numbers.
    line = next(line for line in out.splitlines() if line.startswith("output"))
    assert float(line.split("max rel diff")[1].split()[0]) < 1e-4
    assert "speed-up" in out and "n/a" in out


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
    return cli.run(["bench", "--which", "multi_lora", "--quick", "--no-progress", "--out-dir", str(tmp_path),
                    "--batches", "1", "--cases", "out_proj", "--methods", "base", "fused", *extra])


def test_bench_multi_lora_writes_json(tmp_path):
    result = _bench_multi_lora(tmp_path, "--no-plots")
    [json_path] = [Path(p) for p in result["json"]]
    assert json_path.parent == tmp_path and json_path.stat().st_size > 0
    data = json.loads(json_path.read_text())
    assert {row["method"] for row in data["results"]} == {"base", "fused"}
    assert result["plots"] == []


def test_bench_multi_lora_plot(tmp_path):
    pytest.importorskip("matplotlib")
    result = _bench_multi_lora(tmp_path)
    [png] = [Path(p) for p in result["plots"]]
    assert png.suffix == ".png" and png.stat().st_size > 0


def test_bench_rejects_pass_through_for_several_benchmarks(tmp_path, capsys):
    assert cli.main(["bench", "--which", "multi_lora", "slp", "--out-dir", str(tmp_path), "--batches", "1"]) == 1
    assert "--which" in capsys.readouterr().err


def test_bench_native_cpu_writes_json_and_plot(tmp_path):
    """The native CPU benchmark through the CLI at a tiny size: every method timed, errors against float64 tiny."""
    require_native()
    pytest.importorskip("matplotlib")
    result = cli.run(["bench", "--which", "native_cpu", "--quick", "--out-dir", str(tmp_path), "--widths", "48",
                      "--tokens", "16", "--rounds", "1", "--iters", "1"])
    data = result["results"]["native_cpu"]
    assert [(r["width"], r["mode"]) for r in data["results"]] == [(48, "fwd"), (48, "fwd_bwd")]
    fwd = data["results"][0]
    assert set(fwd["ms"]) >= {"base", "native", "torch", "loop"} and all(v > 0 for v in fwd["ms"].values())
    assert max(fwd["rel_err_vs_fp64"].values()) < 1e-5
    [png] = [Path(p) for p in result["plots"]]
    assert png.stat().st_size > 0
