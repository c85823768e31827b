"""Monkey's fine-tuning recipe with DeepSpeed: the HF ``Trainer`` + ZeRO-2 (``examples/ds_config_zero2.json``,
Monkey's config with its "auto" values) + bf16 + gradient checkpointing + gradient accumulation, 2 ranks on CPU
(DeepSpeed's CPU accelerator, gloo) under ``torch.distributed.run``. ``tests/helpers/ds_zero2_check.py`` trains the
PATCHED and the UNPATCHED Monkey classifier from the same seed on the same images, in bf16 and in fp32; they must
log the same losses and gradient norms and end with the same fp32 master weights (fp32: to float rounding; bf16:
within the error bf16 itself makes).

``deepspeed`` is an optional test dependency (``scripts/setup_env.sh`` installs it): without it the test skips.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="deepspeed is not installed (scripts/setup_env.sh installs it: "
                    "DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8)")

from helpers import ds_zero2_check as worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300  # a hung collective must not hang CI; a launch takes ~20 s on 2 cores


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MONKEY_KERNELS_BACKEND="torch")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "helpers" / "ds_zero2_check.py"), "--out", str(out)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    found = {}
    for case in worker.CASES:
        path = out / f"{case}.pt"
        if not path.exists():
            pytest.fail(f"the 2-rank DeepSpeed launch wrote no result for {case} (exit {proc.returncode}):\n{tail}")
        found[case] = torch.load(path, weights_only=False)
        if "error" in found[case]:
            pytest.fail(f"{case} failed on 2 ranks:\n{found[case]['error']}\n{tail}")
    assert proc.returncode == 0, tail
    return found


def _weight_error(run: dict, reference: dict) -> float:
    """``|w - w_ref| / |w_ref - w_0|`` over all trainable tensors together (Adam under bf16 turns the noise of
    near-zero gradient entries, e.g. the resampler's key bias, into full-size steps, so single tensors are noisy)."""
    initial = reference["initial"]
    diff = torch.cat([(run["master"][n] - reference["master"][n]).flatten() for n in initial])
    update = torch.cat([(reference["master"][n] - initial[n]).flatten() for n in initial])
    return (diff.norm() / update.norm()).item()


@pytest.mark.parametrize("case", worker.CASES)
def test_zero2_recipe_trains_the_recipe_parameters(results, case):
    result = results[case]
    assert result["engine"] == "DeepSpeedEngine" and result["checkpointing"]
    assert result["dtype"] == (torch.bfloat16 if case.endswith("bf16") else torch.float32)
    assert len(result["losses"]) == worker.STEPS and all(torch.isfinite(torch.tensor(result["losses"])))
    assert not result["frozen_changed"], f"frozen weights changed: {result['frozen_changed']}"
    initial = result["initial"]
    assert any(n.endswith("lora_scale") for n in initial) and "classifier.weight" in initial
    assert not any(n.endswith(("attn.in_proj.weight", "mlp.c_fc.weight", "conv1.weight")) for n in initial)
    unmoved = [n for n in initial if torch.equal(result["master"][n], initial[n])]
    assert not unmoved, f"trainable weights that did not train: {unmoved}"


def test_zero2_fp32_patched_equals_unpatched(results):
    """fp32: the same losses and gradient norms to float rounding; weights after 4 ZeRO-2 AdamW steps within
    1e-3 of the update (seen: 1.4e-4)."""
    patched, unpatched = results["patched_fp32"], results["unpatched_fp32"]
    assert patched["losses"] == pytest.approx(unpatched["losses"], rel=1e-5)
    assert patched["grad_norms"] == pytest.approx(unpatched["grad_norms"], rel=1e-5)
    assert _weight_error(patched, unpatched) < 1e-3


def test_zero2_bf16_patched_matches_unpatched(results):
    """bf16 (DeepSpeed casts the module to bf16, fp32 master weights in the optimizer): losses and gradient norms
    within bf16 noise, and the patched weights as close to the unpatched bf16 run as that run is to fp32
    (seen: 3.3e-2 vs 4.3e-2)."""
    patched, unpatched = results["patched_bf16"], results["unpatched_bf16"]
    assert patched["losses"] == pytest.approx(unpatched["losses"], rel=1e-2)
    assert patched["grad_norms"] == pytest.approx(unpatched["grad_norms"], rel=2e-2)
    bf16_error = _weight_error(unpatched, results["unpatched_fp32"])
    assert _weight_error(patched, unpatched) <= 2 * bf16_error + 1e-2
