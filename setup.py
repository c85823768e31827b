"""Build script of monkey-kernels.

The Triton kernels are compiled at run time by Triton, so the package builds and installs on machines
without a GPU or CUDA. The native extension ``monkey_kernels._C`` (``csrc/``) is compiled here with
``torch.utils.cpp_extension`` (ninja when installed): the CPU ops always, plus the CUDA sources
(``csrc/cuda/``, ``-DMONKEY_WITH_CUDA``) when torch is a CUDA build and a CUDA toolkit (nvcc) is present.

The extension is optional: when it cannot be built (no compiler, a compile error, torch missing at build
time) the build prints a warning and installs the package without it; at run time
``monkey_kernels._native`` then JIT-builds it from ``csrc/`` on first use, or the pure-PyTorch path runs.
``MONKEY_KERNELS_NO_BUILD=1`` skips the build. Install without build isolation
(``pip install --no-build-isolation -e .``) so the extension compiles against the installed torch.
"""
import glob
import os
import sys
import traceback
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
EXT_NAME = "monkey_kernels._C"
TRITON_PACKAGE = "monkey_kernels._triton"

# The one declaration of the environment variables (light: no torch); this checkout's, whatever is installed.
sys.path.insert(0, str(ROOT))
from monkey_kernels import settings  # noqa: E402


def _warn(message: str) -> None:
    # print, not warnings.warn: pip shows a build's stderr with -v only, but this must be seen in logs
    bar = "=" * 100
    print(f"\n{bar}\nWARNING (monkey-kernels): {message}\n{bar}\n", file=sys.stderr, flush=True)


def native_extension():
    """``(ext_modules, cmdclass)`` for the extension, or ``([], {})`` when it is not to be built."""
    if settings.NO_BUILD.get():
        _warn(f"{settings.NO_BUILD.name}=1: not building the native extension ({EXT_NAME}).")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as error:  # noqa: BLE001
        _warn(f"torch is not importable at build time ({error}); installing without the native extension. "
              "Install torch first and build with --no-build-isolation to get it.")
        return [], {}

    # Relative paths: setuptools wants sources relative to setup.py.
    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    # -fopenmp compiles at::parallel_for's OpenMP region into our code; at load time the libgomp.so.1 that
    # torch already loaded satisfies the link (same soname), so there is one OpenMP runtime and one pool.
    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++20 from torch 2.10,
    # C++17 before).
    cxx = ["-O3", "-fopenmp"]
    if with_cuda:
        extension = CUDAExtension(
            EXT_NAME, sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DMONKEY_WITH_CUDA"], "nvcc": ["-O3", "-DMONKEY_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        extension = CppExtension(EXT_NAME, sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension that warns and drops the extension instead of failing the install (like
        flash-attention's setup.py): a machine without a compiler still gets the package."""

        def run(self):
            try:
                super().run()
            except (Exception, SystemExit) as error:  # noqa: BLE001 (compiler missing, compile/link error)
                detail = "".join(traceback.format_exception_only(type(error), error)).strip()
                _warn(
                    f"building the native extension {EXT_NAME} failed; installing without it.\n{detail[-2000:]}\n"
                    "monkey_kernels will JIT-build it from csrc/ on first use where possible, else use the "
                    "pure-PyTorch path (see monkey_kernels._native.status())."
                )
                # Forget the extension so the install steps after the build do not look for its .so.
                self.extensions = []
                self.distribution.ext_modules = []

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

        def get_output_mapping(self):
            return super().get_output_mapping() if self.extensions else {}

    return [extension], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extension()

setup(
    name="monkey-kernels",
    version="0.1.0",
    description="Fused Triton kernels for per-tile multi-LoRA vision encoders (Monkey) and the SLP projector",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    # The repository's top-level triton_kernels/ folder installs as monkey_kernels._triton: the top-level name
    # triton_kernels is OpenAI's package (imported by vLLM and sglang), which it must not shadow.
    packages=find_packages(include=["monkey_kernels", "monkey_kernels.*"]) + [TRITON_PACKAGE],
    package_dir={TRITON_PACKAGE: "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    # A range, never a bare pin: an installed torch (CPU or CUDA build) satisfies it and is left alone.
    install_requires=[
        "torch>=2.11",
        "triton>=3.6,<3.10; platform_system == 'Linux'",
        "transformers>=5.0,<6",  # the reference models are PreTrainedModels; patches are tested on 5.x
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "peft": ["peft>=0.21,<0.22"],
        "plots": ["matplotlib"],
        "test": ["pytest>=8", "hypothesis", "peft>=0.21,<0.22", "matplotlib"],
    },
    entry_points={"console_scripts": ["monkey-kernels=monkey_kernels.cli:main"]},
    license="Apache-2.0",
)
