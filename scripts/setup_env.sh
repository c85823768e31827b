#!/usr/bin/env bash
# Sets up a fresh machine for monkey-kernels: torch (only if missing), then the package and its test deps.
# A machine that already has torch (a CUDA build on a GPU box, say) keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    # Pinned: an unpinned torch pulls the newest CUDA build (several GB); 2.13.0 is the CPU wheel we test.
    "$PYTHON" -m pip install -q "torch==2.13.0"
fi
# The editable install below builds without isolation (no second torch in a build env): it needs a
# setuptools that builds PEP 660 wheels on its own.
"$PYTHON" -m pip install -q "setuptools>=70.1"
# The native extension (csrc/) compiles in setup.py through torch.utils.cpp_extension: ninja builds the
# sources in parallel (without it the build still works, one file at a time, much slower).
if ! command -v ninja >/dev/null 2>&1 && ! "$PYTHON" -c "import ninja" >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q ninja
fi
"$PYTHON" -m pip install -q --no-build-isolation -e ".[test]"
# Optional test dependency: DeepSpeed (tests/models/test_deepspeed.py runs Monkey's ZeRO-2 recipe on 2 CPU ranks and
# skips without it). PyPI ships it as an sdist: DS_BUILD_OPS=0 builds no C++/CUDA op now (the few used are
# JIT-built when first needed), --no-build-isolation builds against the installed torch, and the constraint pins
# torch to the installed build so pip can never swap it (deepspeed only asks for torch>=2.0). Not in setup.py's
# extras for the same reason: an extra cannot pin torch to what is installed. About 10-20 s.
if ! "$PYTHON" -c "import deepspeed" >/dev/null 2>&1; then
    torch_pin=$(mktemp)
    "$PYTHON" -c "import torch; print(f'torch=={torch.__version__}')" > "$torch_pin"
    # Optional: a failed install (no package index, say) leaves the DeepSpeed tests skipped, not the setup failed.
    DS_BUILD_OPS=0 "$PYTHON" -m pip install -q --no-build-isolation -c "$torch_pin" "deepspeed==0.19.8" ||
        echo "warning: deepspeed could not be installed; tests/models/test_deepspeed.py will skip" >&2
    rm -f "$torch_pin"
fi
"$PYTHON" -c "import torch, triton, monkey_kernels; print(f'torch {torch.__version__}, triton {triton.__version__}, monkey_kernels {monkey_kernels.__version__}, cuda available: {torch.cuda.is_available()}')"
"$PYTHON" -c "from monkey_kernels import _native; print(f'native extension: {_native.status()}')"
