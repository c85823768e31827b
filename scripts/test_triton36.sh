#!/usr/bin/env bash
# Second test pass: the Triton kernels on Triton 3.6, the oldest supported Triton (the GPU machines' image
# ships torch 2.11 with Triton 3.6), while the first pass ran the installed one (3.9 here).
#
# A virtual environment layered over the current one (--system-site-packages: its torch, this package in
# editable mode, pytest) gets triton==3.6.0 alone (--no-deps: torch is never installed there). It is cached
# in ${MONKEY_KERNELS_CACHE:-~/.cache/monkey_kernels}/venv-triton36 and reused while it still holds 3.6.0.
# It runs the Triton kernel tests of both ops (every kernel, flag set and dtype, forward and backward, through
# the interpreter without a GPU, compiled with one), the cuBLAS twin of the fused GEMM, and the sm_90
# compile check (one config per kernel variant: MONKEY_KERNELS_COMPILE_LEAN=1). About 3 minutes on 2 cores.
# pytest's exit status is this script's.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TRITON_PIN="3.6.0"
# MONKEY_KERNELS_CACHE as the package reads it (monkey_kernels/settings.py: its default, ~ expanded, checked)
VENV="$("$PYTHON" -c 'from monkey_kernels import settings; print(settings.CACHE.get())')/venv-triton36"
VENV_PYTHON="$VENV/bin/python"

has_pin() {
    "$VENV_PYTHON" -c "import sys, triton; sys.exit(triton.__version__ != '$TRITON_PIN')" >/dev/null 2>&1
}

if ! has_pin; then
    "$PYTHON" -m venv --system-site-packages --clear "$VENV"
    "$VENV_PYTHON" -m pip install -q --no-deps "triton==$TRITON_PIN"
fi
# The layered venv must see the base environment's torch, not a torch of its own.
"$VENV_PYTHON" - "$PYTHON" <<'PY'
import subprocess, sys
import torch, triton
base_torch = subprocess.run([sys.argv[1], "-c", "import torch; print(torch.__version__)"],
                            capture_output=True, text=True, check=True).stdout.strip()
if torch.__version__ != base_torch:
    sys.exit(f"the triton {triton.__version__} venv sees torch {torch.__version__}, the base has {base_torch}")
print(f"second pass: triton {triton.__version__}, torch {torch.__version__}")
PY

export MONKEY_KERNELS_COMPILE_LEAN=1  # declared in monkey_kernels/settings.py
exec "$VENV_PYTHON" -m pytest -p no:cacheprovider \
    tests/ops/test_multi_lora.py tests/ops/test_slp.py tests/ops/test_gemm_choice.py tests/ops/test_compile.py \
    -k "triton or grouped_outer or test_gemm_choice or test_compile"
