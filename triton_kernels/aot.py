"""Ahead-of-time compilation of the kernels for a GPU architecture, on a machine without a GPU.

Triton's compiler and ``ptxas`` ship with the ``triton`` wheel, so the whole compiled path (type checks,
layouts, the matrix instructions chosen, register use and spills) can be checked on a CPU-only machine,
where the kernels otherwise only run through the interpreter. Used by ``tests/test_compile.py``.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_TORCH_TO_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int32": "i32", "int8": "i8"}


@dataclass
class CompiledKernelReport:
    name: str
    arch: int
    num_warps: int
    shared_bytes: int
    registers: int
    local_bytes: int  # per-thread local memory (register spills / stack arrays); 0 is what we want
    matrix_instruction: str  # "wgmma" (Hopper warpgroup MMA), "mma" (Ampere-style), or "none"

    def __str__(self) -> str:
        return (f"{self.name} sm_{self.arch}: {self.matrix_instruction}, {self.registers} regs, "
                f"{self.shared_bytes} B shared, warps {self.num_warps}, local {self.local_bytes} B")


def jit_function(kernel) -> triton.runtime.jit.JITFunction:
    """The plain ``@triton.jit`` function under any ``@triton.autotune`` / heuristics wrappers."""
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def compile_kernel(
    kernel,
    pointer_dtypes: Dict[str, str],
    constexprs: Dict[str, object],
    float_args=("dropout_p",),
    arch: int = 90,
    num_warps: int = 4,
    num_stages: int = 3,
) -> CompiledKernelReport:
    """Compile ``kernel`` for ``sm_<arch>``.

    Args:
        pointer_dtypes: pointer argument → element dtype name (torch spelling, e.g. ``"bfloat16"``).
        constexprs: every ``tl.constexpr`` argument's value (block sizes included).
        float_args: scalar arguments passed as fp32; every other scalar is an int32.
    """
    fn = jit_function(kernel)
    signature = {}
    for name in fn.arg_names:
        if name in pointer_dtypes:
            signature[name] = "*" + _TORCH_TO_TRITON[pointer_dtypes[name]]
        elif name in constexprs:
            signature[name] = "constexpr"
        elif name in float_args:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    missing = [n for n in fn.arg_names if signature[n] == "constexpr" and n not in constexprs]
    if missing:
        raise ValueError(f"constexprs missing for {missing}")
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()})
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    ptx = compiled.asm["ptx"]
    if re.search(r"\bwgmma\.", ptx):
        instruction = "wgmma"
    elif re.search(r"\bmma\.sync", ptx):
        instruction = "mma"
    else:
        instruction = "none"
    registers, local_bytes = resource_usage(compiled.asm["cubin"])
    return CompiledKernelReport(
        name=fn.__name__,
        arch=arch,
        num_warps=compiled.metadata.num_warps,
        shared_bytes=compiled.metadata.shared,
        registers=registers,
        local_bytes=local_bytes,
        matrix_instruction=instruction,
    )


def resource_usage(cubin: bytes) -> tuple:
    """(registers per thread, local + stack bytes per thread) of a cubin, read with the ``cuobjdump``
    that ships with Triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", text))
    if "REG" not in fields:
        raise RuntimeError(f"could not read the resource usage from cuobjdump: {text!r}")
    return int(fields["REG"]), int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))
