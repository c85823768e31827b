#!/usr/bin/env bash
# Everything a GPU session should run, in one command (compiled-kernel correctness first, then timings).
# Usage on a GPU machine, from the repository root:  bash benchmarks/gpu_session.sh [OUT_DIR]
# Writes two logs and three JSON results under OUT_DIR (default benchmarks/results; the device tool
# brings back at most 8 files) and prints a short summary last.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
python3 -m pip install -q --no-build-isolation --no-deps -e . >/dev/null 2>&1 || true
log="$out/gpu_session.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
# 1. correctness of the compiled kernels (conftest runs them on CUDA when a GPU is present)
python3 -m pytest -q -x tests/test_multi_lora.py tests/test_modules.py tests/test_slp.py tests/test_patching.py \
    tests/test_cuda_graphs.py tests/test_torch_compile.py \
    2>&1 | tee "$out/gpu_tests.log" | tail -3
# 2. timings (each benchmark checks its results against the reference before timing)
for bench in multi_lora slp; do
    python3 "benchmarks/bench_$bench.py" --out "$out/${bench}_gpu.json" 2>>"$log" | tee -a "$log"
done
python3 benchmarks/bench_monkey_encoder.py --cuda-graph --out "$out/monkey_encoder_gpu.json" 2>>"$log" | tee -a "$log"
echo "summary:"; tail -1 "$out/gpu_tests.log"
