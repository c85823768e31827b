"""The compiled (GPU) path of every kernel variant, checked without a GPU.

The interpreter runs the kernels' semantics on the CPU; this test compiles the same kernels for sm_90
(Hopper) with Triton's own compiler and ptxas, so type, layout and lowering errors of the compiled path
surface in CI too, and checks that the tensor-core path (wgmma) is the one taken for half-precision GEMMs.
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def compile_reports():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    process = subprocess.run(
        [sys.executable, os.path.join(HERE, os.pardir, "helpers", "compile_kernels.py")],
        capture_output=True, text=True, env=env, timeout=1200,
    )
    assert process.returncode == 0, process.stderr[-4000:]
    reports = [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]
    assert reports, "no kernel variant was compiled"
    return reports


def test_every_variant_compiles_for_sm90(compile_reports):
    failures = [r for r in compile_reports if not r["ok"]]
    assert not failures, "\n".join(f"{r['label']}: {r['error']}" for r in failures)
    kernels = {r["label"].split()[0] for r in compile_reports}
    assert kernels == {"shrink", "gemm", "outer", "slp_embed"}
    for report in compile_reports:
        print(report)


def test_half_precision_variants_use_warpgroup_mma(compile_reports):
    half = [r for r in compile_reports if r["ok"] and not r["label"].startswith("slp_embed")
            and ("float16" in r["label"] or "bfloat16" in r["label"])]
    assert half
    slow = [r["label"] for r in half if r["instruction"] != "wgmma"]
    assert not slow, f"variants off the Hopper tensor-core path: {slow}"
