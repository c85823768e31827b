"""Build script of monkey-kernels.

The Triton kernels are compiled at run time by Triton, so the package builds and installs on machines
without a GPU or CUDA. (The native extension in ``csrc/`` is built here once it exists.)
"""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="monkey-kernels",
    version="0.1.0",
    description="Fused Triton kernels for per-tile multi-LoRA vision encoders (Monkey) and the SLP projector",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["monkey_kernels", "monkey_kernels.*", "triton_kernels", "triton_kernels.*"]),
    python_requires=">=3.10",
    # A range, never a bare pin: an installed torch (CPU or CUDA build) satisfies it and is left alone.
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux'",
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
