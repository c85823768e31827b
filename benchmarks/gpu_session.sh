#!/usr/bin/env bash
# One GPU session within a time budget, from a fresh copy of the repository (no install, no torch reinstall):
#   bash benchmarks/gpu_session.sh [OUT_DIR] [--budget-s N] [--quick] [--dry-run] [--steps STEP ...]
# (1) compiled-kernel correctness at Monkey sizes vs float64 + the CUDA-graph tests, (2) the multi-LoRA op
# benchmark at batch 1, then 2 and 8 as time allows (with the Triton GEMM vs cuBLAS and both GEMM paths),
# (3) the encoder at 896x896 batch 1 and 4 with CUDA graphs, (4) SLP; the CUDA native extension is built
# only if time is left. Default budget 480 s (--quick: 270 s). Writes at most 4 files to OUT_DIR (default
# gpu_session_out): session.log, results.json, summary.md, cache.tar.gz (Triton + autotune cache, reused by
# the next run). The summary table is printed last. Steps and budget: benchmarks/gpu_plan.py; the runner:
# benchmarks/gpu_session.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 benchmarks/gpu_session.py "$@"
