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
# When PYTHON is itself a virtual environment, `venv --system-site-packages` layers over the interpreter it was
# made from, not over PYTHON's environment: its site-packages (this package's editable install, whose finder maps
# monkey_kernels._triton to this checkout's triton_kernels/) are added here, after the venv's own (triton 3.6
# first) and before the interpreter's global ones (which may hold another checkout's editable install).
BASE_SITE="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
VENV_SITE="$("$VENV_PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ "$BASE_SITE" != "$("$PYTHON" -c 'import sys, sysconfig; print(sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["purelib"])')" ]; then
    echo "import site; site.addsitedir(r'$BASE_SITE')" > "$VENV_SITE/_monkey_kernels_base_env.pth"
else
    rm -f "$VENV_SITE/_monkey_kernels_base_env.pth"
fi
# The layered venv must see the base environment's torch, not a torch of its own.
"$VENV_PYTHON" - "$PYTHON" <<'PY'
import subprocess, sys
import torch, triton
base_torch = subprocess.run([sys.argv[1], "-c", "import torch; print(torch.__version__)"],
                            capture_output=True, text=True, check=True).stdout.strip()
if torch.__version__ != base_torch:
    sys.exit(f"the triton {triton.__version__} venv sees torch {torch.__version__}, the base has {base_torch}")
import monkey_kernels._triton.multi_lora as kernels
checked = subprocess.run([sys.argv[1], "-c", "import monkey_kernels._triton.multi_lora as k; print(k.__file__)"],
                         capture_output=True, text=True, check=True).stdout.strip()
if kernels.__file__ != checked:
    sys.exit(f"the triton {triton.__version__} venv imports the kernels of {kernels.__file__}, the base {checked}")
print(f"second pass: triton {triton.__version__}, torch {torch.__version__}, kernels {kernels.__file__}")
PY

export MONKEY_KERNELS_COMPILE_LEAN=1  # declared in monkey_kernels/settings.py
exec "$VENV_PYTHON" -m pytest -p no:cacheprovider \
    tests/ops/test_multi_lora.py tests/ops/test_slp.py tests/ops/test_gemm_choice.py tests/ops/test_compile.py \
    -k "triton or grouped_outer or test_gemm_choice or test_compile"
