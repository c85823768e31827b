"""The GPU session script on CPU: arguments, the budget plan, timeouts, and what it writes (``--dry-run``).

``benchmarks/gpu_session.sh`` runs ``benchmarks/gpu_session.py`` with the plan of ``benchmarks/gpu_plan.py``;
``--dry-run`` replaces every GPU step by a stub, so the plumbing runs here in seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import gpu_plan  # noqa: E402
import gpu_session  # noqa: E402

from monkey_kernels import settings  # noqa: E402

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_session.sh"


# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------
def test_arguments_and_defaults():
    args = gpu_plan.parse_args([])
    assert (args.out_dir, args.budget_s, args.quick, args.dry_run) == (gpu_plan.DEFAULT_OUT_DIR, 480, False, False)
    assert gpu_plan.parse_args(["--quick"]).budget_s == 270
    args = gpu_plan.parse_args(["out", "--budget-s", "300", "--quick", "--steps", "correctness", "slp"])
    assert (args.out_dir, args.budget_s, args.quick, args.steps) == ("out", 300, True, ["correctness", "slp"])


@pytest.mark.parametrize("argv", [["--budget-s", "abc"], ["--budget-s", "5"], ["--steps", "nothing"], ["a", "b"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_plan.parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The budget
# ---------------------------------------------------------------------------------------------------------
def _spent(planned) -> float:
    return sum(t + gpu_plan.KILL_GRACE_S for _, t in planned if t is not None) + gpu_plan.FINISH_RESERVE_S


@pytest.mark.parametrize("quick", [False, True])
def test_timeouts_never_sum_above_the_budget(quick):
    for budget in range(21, 1200, 13):
        planned = gpu_plan.plan(budget, quick)
        assert _spent(planned) <= budget, (budget, planned)
        for step, timeout in planned:
            assert timeout is None or step.min_s <= timeout <= step.want(quick)


def test_steps_run_in_order_and_the_defaults_fit_the_essentials():
    full = {s.name: t for s, t in gpu_plan.plan(480, quick=False)}
    assert list(full) == list(gpu_plan.STEP_NAMES)
    assert all(full[name] is not None for name in ("environment", "correctness", "op_batch1", "encoder", "slp",
                                                     "plora"))
    quick = {s.name: t for s, t in gpu_plan.plan(270, quick=True)}
    assert list(quick) == ["environment", "correctness", "op_batch1", "encoder", "slp", "plora"]  # batch 1 only
    assert all(t is not None for t in quick.values())


def test_small_budgets_skip_later_steps_but_keep_correctness():
    planned = {s.name: t for s, t in gpu_plan.plan(100, quick=False)}
    assert planned["correctness"] is not None
    assert all(planned[name] is None for name in ("op_batch1", "op_batch2_8", "encoder", "build_native"))
    # Nothing fits: everything is skipped rather than started without its minimum.
    assert all(t is None for _, t in gpu_plan.plan(22, quick=True))


def test_step_timeout_rules():
    steps = {s.name: s for s in gpu_plan.STEPS}
    later = [steps["slp"]]
    reserve = gpu_plan.FINISH_RESERVE_S + gpu_plan.KILL_GRACE_S
    # plenty of time: the step's wanted timeout
    assert gpu_plan.step_timeout(steps["encoder"], 1000, later, False) == steps["encoder"].want_s
    # later required steps keep their minimum (and the kill grace)
    assert (gpu_plan.step_timeout(steps["encoder"], reserve + 60, later, False)
            == 60 - steps["slp"].min_s - gpu_plan.KILL_GRACE_S)
    # a required step squeezes the later ones rather than being skipped; an optional one is skipped
    assert gpu_plan.step_timeout(steps["encoder"], reserve + 45, later, False) == 45
    assert gpu_plan.step_timeout(steps["op_batch2_8"], reserve + 40, later, False) is None
    # below its own minimum: skipped
    assert gpu_plan.step_timeout(steps["encoder"], reserve + steps["encoder"].min_s - 1, [], False) is None


def test_step_selection():
    assert "op_batch2_8" not in [s.name for s in gpu_plan.steps_for(quick=True)]
    assert [s.name for s in gpu_plan.steps_for(False, ["slp_native", "slp"])] == ["slp"]  # needs build_native
    with pytest.raises(ValueError, match="steps must be among"):
        gpu_plan.steps_for(False, ["bogus"])


def test_step_commands_name_existing_scripts_and_the_required_options(tmp_path):
    steps = {s.name: s for s in gpu_plan.STEPS}
    op = gpu_session.step_command(steps["op_batch1"], tmp_path, False, False)
    assert "--gemm" in op and op[op.index("--batches") + 1] == "1"
    encoder = gpu_session.step_command(steps["encoder"], tmp_path, False, False)
    assert "--cuda-graph" in encoder and encoder[encoder.index("--batches") + 1:][:2] == ["1", "4"]
    quick_encoder = gpu_session.step_command(steps["encoder"], tmp_path, True, False)
    assert quick_encoder[quick_encoder.index("--batches") + 1:][:2] == ["1", "--cuda-graph"]
    correctness = gpu_session.step_command(steps["correctness"], tmp_path, False, False)
    for step in gpu_plan.STEPS:
        for part in gpu_session.step_command(step, tmp_path, False, False):
            if part.endswith(".py") and "/" in part:
                assert Path(part).is_file(), part
    assert any(p.endswith("test_cuda_graphs.py") for p in correctness)
    env = gpu_session.step_env(steps["encoder"], tmp_path / "cache", tmp_path)
    assert env[settings.NO_JIT.name] == "1"
    assert env[settings.TRITON_CACHE_DIR.name].startswith(str(tmp_path / "cache"))
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO_ROOT)
    assert settings.NO_JIT.name not in gpu_session.step_env(steps["build_native"], tmp_path, tmp_path)


def test_a_step_past_its_timeout_is_killed(tmp_path):
    log = gpu_session.Log(tmp_path / "log")
    start = time.monotonic()
    outcome = gpu_session.run_step([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                                   1, dict(os.environ), log)
    log.close()
    assert outcome["status"] == "timeout" and time.monotonic() - start < 15
    assert "started" in (tmp_path / "log").read_text()


# ---------------------------------------------------------------------------------------------------------
# Summary and cache
# ---------------------------------------------------------------------------------------------------------
def test_summary_judges_the_targets():
    results = {
        "op_batch1": {"rows": [
            dict(case="qkv b1", method="fused", mode="fwd", ratio_to_base=1.05, speedup_vs_unfused=1.2),
            dict(case="qkv b1", method="fused", mode="fwd_bwd", ratio_to_base=1.3),
            dict(case="qkv b1", method="triton_gemm", mode="fwd", ratio_to_base=0.98)]},
        "encoder": {"rows": [
            dict(case="896x896 b1", method="reference", mode="inference", speedup=1.0, peak_memory_bytes=100),
            dict(case="896x896 b1", method="patched", mode="inference", speedup=2.5, peak_memory_bytes=120)]},
        "slp": {"rows": [dict(case="monkey", method="fused_novalidate", mode="fwd", fraction_of_copy=0.9)]},
        "plora": {"rows": [
            dict(case="1 img", method="reference", mode="fwd", speedup_vs_reference=1.0),
            dict(case="1 img", method="fused", mode="fwd", roofline_ratio=1.04, speedup_vs_reference=1.4),
            dict(case="1 img", method="fused", mode="fwd_bwd", roofline_ratio=1.2, speedup_vs_reference=0.9)]},
        "textmonkey": {"rows": [
            dict(case="896x896 per_window b1", method="reference", mode="inference", speedup=1.0),
            dict(case="896x896 per_window b1", method="patched", mode="inference", speedup=2.1),
            dict(case="896x896 per_window b1", method="patched", mode="train_step", speedup=0.95)]},
    }
    rows = gpu_session.summarize(results, {"tests": 10, "failures": 1, "errors": 0, "skipped": 0, "failed": []})
    met = {(r["target"], r["case"]): r["met"] for r in rows}
    assert met[("correctness", "10 tests, 0 skipped")] is False
    assert met[("op_fwd", "qkv b1")] is True and met[("op_fwd_bwd", "qkv b1")] is False
    assert met[("op_vs_unfused", "qkv b1")] is False
    assert met[("encoder_inference", "896x896 b1 patched")] is False  # fast enough, but more memory
    assert met[("slp_copy_fraction", "monkey fused_novalidate")] is True
    assert met[("info", "qkv b1 triton_gemm / F.linear")] is True
    assert met[("plora_roofline", "1 img fwd")] is True and met[("plora_vs_reference", "1 img fwd")] is True
    assert met[("plora_roofline", "1 img fwd_bwd")] is False and met[("plora_vs_reference", "1 img fwd_bwd")] is False
    assert met[("textmonkey_inference", "896x896 per_window b1")] is True
    assert met[("textmonkey_train_step", "896x896 per_window b1")] is False
    assert not any(r["target"].startswith("plora") and "reference" in r["case"] for r in rows)


def test_cache_tarball_stays_within_the_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_session, "MAX_FILE_BYTES", 64 * 1024)
    cache = tmp_path / "cache"
    for kernel in range(3):
        folder = cache / "triton" / f"k{kernel}"
        folder.mkdir(parents=True)
        (folder / "kernel.cubin").write_bytes(os.urandom(4096))
        (folder / "kernel.json").write_text("{}")
        (folder / "kernel.ptx").write_bytes(os.urandom(40 * 1024))  # incompressible IR: too much in all
    tarball = tmp_path / "cache.tar.gz"
    note = gpu_session.save_cache(cache, tarball)
    assert tarball.stat().st_size <= 64 * 1024, note
    with tarfile.open(tarball) as archive:
        names = set(archive.getnames())
    assert {f"triton/k{k}/kernel.cubin" for k in range(3)} <= names and not any(n.endswith(".ptx") for n in names)
    restored = tmp_path / "restored"
    assert "restored" in gpu_session.restore_cache(tarball, restored)
    assert (restored / "triton" / "k0" / "kernel.cubin").read_bytes() == (cache / "triton" / "k0" / "kernel.cubin").read_bytes()


# ---------------------------------------------------------------------------------------------------------
# The whole script, dry run
# ---------------------------------------------------------------------------------------------------------
def _run_script(out_dir: Path, cache_dir: Path, *extra, env=None, timeout=60):
    return subprocess.run(["bash", str(SCRIPT), str(out_dir), "--dry-run", "--cache-dir", str(cache_dir), *extra],
                          capture_output=True, text=True, timeout=timeout, env=env or dict(os.environ))


def test_dry_run_writes_at_most_8_small_files_and_prints_the_summary_last(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    start = time.monotonic()
    proc = _run_script(out, cache, "--quick")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.monotonic() - start < 30
    files = list(out.iterdir())
    assert 0 < len(files) <= gpu_plan.MAX_FILES and all(f.stat().st_size <= gpu_plan.MAX_FILE_BYTES for f in files)
    assert {f.name for f in files} == {"session.log", "results.json", "summary.md", "cache.tar.gz"}
    results = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in results["session"]["steps"]] == ["environment", "correctness", "op_batch1", "encoder", "slp",
                                                                "plora"]
    assert all(s["status"] == "ok" for s in results["session"]["steps"])
    assert results["session"]["dry_run"] is True and results["correctness"]["tests"] == 2
    assert {r["target"] for r in results["summary"]} >= {"correctness", "op_fwd", "encoder_inference",
                                                           "slp_copy_fraction", "plora_roofline"}
    summary = (out / "summary.md").read_text()
    assert summary.startswith("**DRY RUN")
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the table is printed last
    # A second run restores the cache the first one saved.
    second = _run_script(out, cache, "--quick", "--steps", "environment")
    assert second.returncode == 0 and "restored" in second.stdout


def test_dry_run_with_a_small_budget_skips_steps_and_finishes_within_it(tmp_path):
    """70 s for op_batch1, encoder, slp with op_batch1 taking 12 s: the encoder's minimum (40 s) no longer fits
    and it is skipped, SLP still runs, and the run ends inside the budget."""
    env = dict(os.environ, **{gpu_session.STUB_SLEEP_ENV: "op_batch1=12"})
    start = time.monotonic()
    proc = _run_script(tmp_path / "out", tmp_path / "cache", "--budget-s", "70", "--steps", "op_batch1", "encoder",
                       "slp", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.monotonic() - start < 70
    steps = {s["name"]: s for s in json.loads((tmp_path / "out" / "results.json").read_text())["session"]["steps"]}
    assert list(steps) == ["op_batch1", "encoder", "slp"]
    assert steps["op_batch1"]["status"] == "ok" and steps["op_batch1"]["seconds"] >= 12
    assert steps["encoder"]["status"].startswith("skipped") and steps["slp"]["status"] == "ok"
    for step in steps.values():  # even a step that ran to its timeout would have ended inside the budget
        if step["timeout_s"] is not None:
            assert step["started_at_s"] + step["timeout_s"] + gpu_plan.KILL_GRACE_S + gpu_plan.FINISH_RESERVE_S <= 70


# ---------------------------------------------------------------------------------------------------------
# The correctness step's checks, on CPU at reduced sizes (so a GPU session never fails on a harness bug)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer, dropout_p", [("in_proj", 0.0), ("mlp_c_proj", 0.0), ("mlp_c_proj", 0.1)])
def test_correctness_checks_run_at_reduced_sizes_on_cpu(layer, dropout_p):
    import torch

    import gpu_correctness

    gpu_correctness.check_multi_lora(layer, torch.float32, dropout_p, device="cpu", backend="torch", divisor=16)


def test_correctness_check_of_slp_runs_at_reduced_sizes_on_cpu():
    import torch

    import gpu_correctness

    gpu_correctness.check_slp("monkey", torch.bfloat16, device="cpu", backend="torch", divisor=16)


def test_correctness_checks_catch_a_wrong_result(monkeypatch):
    """The check is not vacuous: a LoRA term off by 1 % fails it."""
    import torch

    import gpu_correctness
    import monkey_kernels

    real = monkey_kernels.multi_lora_linear

    def wrong(*args, **kwargs):
        return real(*args, **kwargs) * 1.01

    monkeypatch.setattr(monkey_kernels, "multi_lora_linear", wrong)
    with pytest.raises(AssertionError, match="error"):
        gpu_correctness.check_multi_lora("out_proj", torch.float32, device="cpu", backend="torch", divisor=16)


@pytest.mark.parametrize("layer", ["in_proj", "mlp_c_proj"])
def test_autocast_correctness_check_runs_at_reduced_sizes_on_cpu(layer):
    import torch

    import gpu_correctness

    gpu_correctness.check_multi_lora_autocast(layer, torch.bfloat16, device="cpu", backend="torch", divisor=16)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_encoder_autocast_check_runs_at_reduced_sizes_on_cpu(backend):
    import torch

    import gpu_correctness
    from monkey_kernels.ops.backends import BACKENDS

    if backend not in BACKENDS:
        pytest.skip(f"backend {backend!r} not in this build")
    gpu_correctness.check_encoder_autocast(torch.bfloat16, device="cpu", backend=backend, divisor=16)


def test_encoder_autocast_check_catches_a_wrong_result(monkeypatch):
    """The model-level judge is not vacuous: a patched encoder whose output is off by 5 % fails it (bf16
    autocast: the unpatched model's own error is ~0.5 %, the limit 3x that plus a floor)."""
    import torch

    import gpu_correctness
    import monkey_kernels

    real = monkey_kernels.patch_model

    def patch_then_skew(model, **kwargs):
        report = real(model, **kwargs)
        model.register_forward_hook(lambda module, args, out: out * 1.05)
        return report

    monkeypatch.setattr(monkey_kernels, "patch_model", patch_then_skew)
    with pytest.raises(AssertionError, match="output: error"):
        gpu_correctness.check_encoder_autocast(torch.bfloat16, device="cpu", backend="torch", divisor=16)


def test_amp_step_times_the_encoder_under_bf16_autocast(tmp_path, monkeypatch):
    """The amp step's command, run on CPU at the small config (1 layer, one round): every forward of both
    methods under bf16 autocast over fp32 weights, the JSON records it, the patched output is the reference's
    within bf16 rounding, and the summary reads its rows."""
    import torch

    amp_step = next(s for s in gpu_plan.STEPS if s.name == "amp")
    command = gpu_session.step_command(amp_step, tmp_path, False, False)
    assert command[command.index("--amp") + 1] == "bf16" and command[command.index("--layers") + 1] == "12"
    import bench_monkey_encoder  # benchmarks/ is on sys.path (above)

    seen = []
    real_forward = bench_monkey_encoder.MonkeyVisionModel.forward

    def recording_forward(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(bench_monkey_encoder.MonkeyVisionModel, "forward", recording_forward)
    out = tmp_path / "amp.json"
    result = bench_monkey_encoder.main(["--device", "cpu", "--amp", "bf16", "--layers", "1", "--quick", "--rounds",
                                        "1", "--warmup", "0", "--backends", "torch", "--out", str(out), "--no-plot"])
    assert seen and all(seen)
    data = json.loads(out.read_text())
    assert data["config"]["amp"] == "bf16" and data["config"]["dtype"] == "float32"
    assert data["config"]["model"]["layers"] == 1
    patched = [r for r in data["rows"] if r["method"] == "patched"]
    assert {r["mode"] for r in patched} == {"inference", "train_step"}
    assert all(0 < r["rel_diff_to_reference"] < 2e-2 for r in patched)
    rows = gpu_session.summarize({"amp": result}, None)
    assert {r["target"] for r in rows} == {"amp_inference", "amp_train_step"}
