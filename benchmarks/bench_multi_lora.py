"""Benchmark of the segmented multi-LoRA linear (``monkey_kernels.multi_lora_linear``) against its baselines.

Every image has five segments of ``tokens`` rows: adapters 0, 1, 2, 3, then one base-only segment (id -1),
so ``M = 5 * tokens * batch``. Cases:

- Monkey's layers (the default on CUDA, bf16, 1024 tokens): ``qkv`` 1664 -> 4992 r16, ``out_proj``
  1664 -> 1664 r16, ``c_proj`` 8192 -> 1664 r32 with a separate LoRA input of width 1664 and a residual.
  ``--small`` divides widths and tokens by 8.
- Square layers ``w<width>`` (``--widths``; the default on CPU: 256 512 1024, fp32, 1024 tokens, r16).

Methods (all on the same inputs, timed interleaved by ``benchmarks/common.py``; ``base`` is the ratio's
denominator):

- ``base``: ``F.linear(U, W, bias)`` (+ residual). Its fwd_bwd has only ``U`` requiring grad (``W`` frozen), so
  its backward is ``dX = dY @ W`` alone.
- ``fused``: ``multi_lora_linear`` with the device's DEFAULT backend (native on CPU when the extension loads,
  triton on CUDA); ``fused_<backend>``: the same with each other backend that runs on the device.
- ``fused_blas`` (native default): ``fused`` with ``MONKEY_KERNELS_CPU_GEMM=blas`` around forward and backward, so
  its base GEMM is BLAS's, as in ``base``: the LoRA's own cost (``fused`` may run the base GEMM by the native
  register-tiled kernel where that measured faster on the machine).
- ``loop``: base + a Python loop over segments (Monkey's reference).
- ``peft_masked``: base + every adapter on all rows, masked to its rows (PEFT's mixed batch, by hand).
- ``peft``: a real PEFT ``LoraModel`` with 4 adapters called with ``adapter_names=`` (forward only: PEFT
  refuses ``adapter_names`` in training; cases where V is U only).
- ``unfused`` (CUDA): base + the Triton shrink + a separate expand pass over ``Y``; forward only.
- ``triton_gemm`` (CUDA, ``--gemm``): the fused Triton GEMM kernel with no LoRA term, against ``base``
  (cuBLAS) -- the question "is our GEMM as fast as cuBLAS"; ``fused_r0``: ``multi_lora_linear`` with every
  rank 0; ``fused_gemm_<choice>``: ``fused`` with ``MONKEY_KERNELS_GEMM=<choice>`` (triton / cublas) set around
  each call, when ``monkey_kernels.ops.multi_lora.gemm_choice`` exists (its per-shape decisions go into the JSON).

Modes: ``fwd`` (``torch.no_grad``) and ``fwd_bwd`` (``U``, ``V``, ``A``, ``B``, ``scale`` trainable). Every
method's output (and the fused gradients) is first checked against a float64 loop on the same inputs; a
mismatch stops the run, so no wrong result is timed. Targets (fused, printed on CUDA): fwd <= 1.08x base,
fwd_bwd <= 1.15x base, >= 1.4x faster than unfused; on CPU: fwd_bwd <= 1.2x base, fused <= every other backend.

``PYTHONPATH=. python benchmarks/bench_multi_lora.py --help``; results in
``benchmarks/results/multi_lora_<device>_<date>.json`` (+ ``.png``).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from monkey_kernels import settings
from monkey_kernels.ops.backends import BACKENDS

# Run as a script (python benchmarks/bench_x.py) or imported as benchmarks.bench_x: common.py sits beside it.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_timer_args, default_backend, make_result, other_backends, peak_memory_bytes,  # noqa: E402
                    report, result_path, time_methods, timer_kwargs, timing_rows, write_result)

__all__ = ["main", "CaseSpec", "MONKEY_CASES", "TARGETS", "CPU_TARGETS", "gemm_decisions"]

SEGMENT_ADAPTERS = (0, 1, 2, 3, -1)  # one image: four adapter segments, then a base-only segment
NUM_ADAPTERS = 4
ADAPTER_SCALES = (0.5, 1.0, 1.5, 2.0)
SMALL_DIVISOR = 8
GEMM_ENV = settings.GEMM.name
GEMM_CHOICES = ("triton", "cublas")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Largest accepted max|method - float64 loop| / max|loop| (forward, gradients) per dtype.
TOLERANCES = {torch.bfloat16: (3e-2, 5e-2), torch.float16: (5e-3, 1e-2), torch.float32: (1e-4, 2e-4)}
TARGETS = {"fwd": 1.08, "fwd_bwd": 1.15, "speedup_vs_unfused": 1.4}  # GPU, the fused op
CPU_TARGETS = {"fwd_bwd": 1.2}  # CPU at width 256, and fused (the default backend) <= every other backend


@dataclass(frozen=True)
class CaseSpec:
    """One layer: ``Y = U W^T + bias + s[a] (V A[a]^T) B[a]^T (+ residual)`` with ``U: [M, K]``."""

    name: str
    in_features: int
    out_features: int
    rank: int
    lora_in_features: Optional[int] = None  # width of a separate LoRA input V; None: V is U
    has_residual: bool = False

    @property
    def k_lora(self) -> int:
        return self.lora_in_features or self.in_features

    def scaled_down(self, divisor: int) -> "CaseSpec":
        return CaseSpec(self.name, self.in_features // divisor, self.out_features // divisor, self.rank,
                        None if self.lora_in_features is None else self.lora_in_features // divisor,
                        self.has_residual)


MONKEY_CASES: Dict[str, CaseSpec] = {
    "qkv": CaseSpec("qkv", 1664, 4992, 16),
    "out_proj": CaseSpec("out_proj", 1664, 1664, 16),
    "c_proj": CaseSpec("c_proj", 8192, 1664, 32, lora_in_features=1664, has_residual=True),
}


def width_case(width: int, rank: int = 16) -> CaseSpec:
    return CaseSpec(f"w{width}", width, width, rank)


# ---------------------------------------------------------------------------------------------------------
# The problem of one (case, batch): weights, segments, a pool of input sets
# ---------------------------------------------------------------------------------------------------------
@dataclass
class InputSet:
    u: torch.Tensor
    v: Optional[torch.Tensor]
    residual: Optional[torch.Tensor]
    grad_out: torch.Tensor

    @property
    def lora_input(self) -> torch.Tensor:
        return self.u if self.v is None else self.v

    @property
    def leaves(self) -> List[torch.Tensor]:
        return [t for t in (self.u, self.v) if t is not None]


class Problem:
    def __init__(self, case: CaseSpec, batch: int, tokens: int, dtype: torch.dtype, device: torch.device,
                 pool_size: int):
        from monkey_kernels import SegmentInfo  # noqa: PLC0415

        ids = list(SEGMENT_ADAPTERS) * batch
        self.case, self.batch, self.tokens, self.dtype, self.device = case, batch, tokens, dtype, device
        self.segments = SegmentInfo.from_batch(ids, tokens, device=device)
        self.host_segments = [(g * tokens, (g + 1) * tokens, a) for g, a in enumerate(ids)]
        M, K, N, r, kl = len(ids) * tokens, case.in_features, case.out_features, case.rank, case.k_lora
        self.num_rows = M

        def randn(*shape, std=1.0, grad=False):
            return (torch.randn(*shape, device=device, dtype=dtype) * std).requires_grad_(grad)

        # Scaled so base and LoRA terms are both O(1): validation checks the LoRA term for real.
        self.weight = randn(N, K, std=K ** -0.5)
        self.bias = randn(N, std=0.1)
        self.lora_a = randn(NUM_ADAPTERS, r, kl, std=kl ** -0.5, grad=True)
        self.lora_b = randn(NUM_ADAPTERS, N, r, std=r ** -0.5, grad=True)
        self.scale = torch.tensor(ADAPTER_SCALES, device=device, dtype=torch.float32, requires_grad=True)
        self.pool = [InputSet(randn(M, K, grad=True), randn(M, kl, grad=True) if case.lora_in_features else None,
                              randn(M, N) if case.has_residual else None, randn(M, N))
                     for _ in range(pool_size)]
        self._peft = None

    @property
    def trainable(self) -> List[torch.Tensor]:
        return [t for s in self.pool for t in s.leaves] + [self.lora_a, self.lora_b, self.scale]

    def rotation(self) -> Iterator[InputSet]:
        return itertools.cycle(self.pool)

    def peft_model(self):
        """A PEFT ``LoraModel`` over a copy of ``W`` with the same 4 adapters (``None``: PEFT missing, or V is
        not U)."""
        if self._peft is not None or self.case.lora_in_features is not None:
            return self._peft
        try:
            from peft import LoraConfig, get_peft_model  # noqa: PLC0415
        except ImportError:
            return None

        class Wrapper(torch.nn.Module):
            def __init__(self, linear):
                super().__init__()
                self.proj = linear

            def forward(self, x):
                return self.proj(x)

        N, K, r = self.case.out_features, self.case.in_features, self.case.rank
        linear = torch.nn.Linear(K, N, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            linear.bias.copy_(self.bias)
        model = None
        for a in range(NUM_ADAPTERS):  # lora_alpha / r = scale[a]: PEFT's scaling is the same factor
            config = LoraConfig(r=r, lora_alpha=ADAPTER_SCALES[a] * r, target_modules=["proj"], lora_dropout=0.0,
                                init_lora_weights=False)
            if model is None:
                model = get_peft_model(Wrapper(linear), config, adapter_name=f"tile{a}",
                                       autocast_adapter_dtype=False)
            else:
                model.add_adapter(f"tile{a}", config, autocast_adapter_dtype=False)
        with torch.no_grad():
            for a in range(NUM_ADAPTERS):
                model.base_model.model.proj.lora_A[f"tile{a}"].weight.copy_(self.lora_a[a])
                model.base_model.model.proj.lora_B[f"tile{a}"].weight.copy_(self.lora_b[a])
        names = [f"tile{a}" if a >= 0 else "__base__" for _, _, a in self.host_segments]
        self._peft = (model.to(self.device).eval(), names)
        return self._peft


# ---------------------------------------------------------------------------------------------------------
# The methods: (problem, inputs) -> Y
# ---------------------------------------------------------------------------------------------------------
def base_forward(p: Problem, x: InputSet, weight=None, bias=None) -> torch.Tensor:
    out = F.linear(x.u, p.weight if weight is None else weight, p.bias if bias is None else bias)
    return out if x.residual is None else out + x.residual


def loop_forward(p: Problem, x: InputSet, params=None) -> torch.Tensor:
    weight, bias, lora_a, lora_b, scale = params or (p.weight, p.bias, p.lora_a, p.lora_b, p.scale)
    out = base_forward(p, x, weight, bias)
    v = x.lora_input
    pieces = []
    for start, end, adapter in p.host_segments:
        piece = out[start:end]
        if adapter >= 0:
            piece = piece + scale[adapter].to(out.dtype) * ((v[start:end] @ lora_a[adapter].t()) @ lora_b[adapter].t())
        pieces.append(piece)
    return torch.cat(pieces)


def peft_masked_forward(p: Problem, x: InputSet) -> torch.Tensor:
    out = base_forward(p, x)
    v = x.lora_input
    for adapter in range(NUM_ADAPTERS):
        mask = (p.segments.row_adapter == adapter).to(out.dtype)[:, None]
        out = out + mask * (p.scale[adapter].to(out.dtype) * (v @ p.lora_a[adapter].t()) @ p.lora_b[adapter].t())
    return out


def peft_forward(p: Problem, x: InputSet) -> torch.Tensor:
    model, names = p.peft_model()
    out = model(x.u.view(len(names), p.tokens, -1), adapter_names=names).reshape(p.num_rows, -1)
    return out if x.residual is None else out + x.residual


def fused_forward(p: Problem, x: InputSet, backend: Optional[str] = None, ranks=None) -> torch.Tensor:
    from monkey_kernels import multi_lora_linear  # noqa: PLC0415

    return multi_lora_linear(x.u, p.weight, p.bias, p.lora_a, p.lora_b, p.scale, p.segments, ranks=ranks,
                             lora_input=x.v, residual=x.residual, backend=backend)


def unfused_forward(p: Problem, x: InputSet) -> torch.Tensor:
    """The base GEMM, then the shrink kernel and the triton backend's expand-only GEMM (its per-shape path)."""
    from monkey_kernels._triton.multi_lora import segmented_shrink  # noqa: PLC0415
    from monkey_kernels.ops.layout import rank_block  # noqa: PLC0415
    from monkey_kernels.ops.multi_lora.triton_impl import TritonMultiLoRA  # noqa: PLC0415

    base = base_forward(p, x)
    ranks = torch.full((NUM_ADAPTERS,), p.case.rank, device=p.device, dtype=torch.int32)
    h = segmented_shrink(x.lora_input, p.lora_a, p.segments, ranks, rank_block(p.case.rank))
    return TritonMultiLoRA.fused_gemm(None, None, None, h, p.lora_b, p.scale, base, p.segments, ranks,
                                      out_features=p.case.out_features, out_dtype=base.dtype)


def triton_gemm_forward(p: Problem, x: InputSet) -> torch.Tensor:
    """The fused Triton GEMM kernel with no LoRA term (the Triton launcher itself: never the cuBLAS path)."""
    from monkey_kernels._triton.multi_lora import fused_lora_gemm  # noqa: PLC0415

    ranks = torch.zeros(NUM_ADAPTERS, device=p.device, dtype=torch.int32)
    return fused_lora_gemm(x.u, p.weight, p.bias, None, None, None, x.residual, p.segments, ranks,
                           out_features=p.case.out_features, out_dtype=x.u.dtype)


@contextlib.contextmanager
def _env(name: str, value: str):
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


# Methods that run with an environment variable set around forward AND backward (the ops read it per call).
METHOD_ENV = {"fused_blas": (settings.CPU_GEMM.name, "blas")}


def _method_env(method: str):
    return _env(*METHOD_ENV[method]) if method in METHOD_ENV else contextlib.nullcontext()


def method_forwards(p: Problem, default: str, others: Sequence[str], methods: Sequence[str],
                    gemm: bool) -> Dict[str, Callable[[InputSet], torch.Tensor]]:
    """``{method: inputs -> Y}`` for the methods that apply to this problem and device."""
    on_cuda = p.device.type == "cuda"
    table: Dict[str, Callable[[InputSet], torch.Tensor]] = {"base": lambda x: base_forward(p, x)}
    if "fused" in methods:
        table["fused"] = lambda x: fused_forward(p, x, default)
        for name in others:
            table[f"fused_{name}"] = lambda x, name=name: fused_forward(p, x, name)
        if default == "native":  # the same with the base GEMM pinned to BLAS: the LoRA's cost over F.linear's GEMM
            table["fused_blas"] = lambda x: fused_forward(p, x, default)
    if "loop" in methods:
        table["loop"] = lambda x: loop_forward(p, x)
    if "peft_masked" in methods:
        table["peft_masked"] = lambda x: peft_masked_forward(p, x)
    if "peft" in methods and p.peft_model() is not None:
        table["peft"] = lambda x: peft_forward(p, x)
    if "unfused" in methods and on_cuda:
        table["unfused"] = lambda x: unfused_forward(p, x)
    if gemm and on_cuda:
        zero_ranks = torch.zeros(NUM_ADAPTERS, device=p.device, dtype=torch.int32)
        table["triton_gemm"] = lambda x: triton_gemm_forward(p, x)
        table["fused_r0"] = lambda x: fused_forward(p, x, default, ranks=zero_ranks)
        if gemm_decisions() is not None:
            for choice in GEMM_CHOICES:
                def with_choice(x, choice=choice):
                    with _env(GEMM_ENV, choice):
                        return fused_forward(p, x, default)
                table[f"fused_gemm_{choice}"] = with_choice
    return table


FORWARD_ONLY = ("peft", "unfused", "triton_gemm", "fused_r0")


def gemm_decisions():
    """``monkey_kernels.ops.multi_lora.gemm_choice.gemm_choices()`` (the per-shape GEMM path decisions), or ``None``
    when that module does not exist in this version."""
    try:
        from monkey_kernels.ops.multi_lora import gemm_choice  # noqa: PLC0415
    except ImportError:
        return None
    try:
        return gemm_choice.gemm_choices()
    except Exception as error:  # noqa: BLE001 - a report, not a failure of the benchmark
        return {"error": f"{type(error).__name__}: {error}"}


# ---------------------------------------------------------------------------------------------------------
# Validation against float64
# ---------------------------------------------------------------------------------------------------------
def _rel(actual: Optional[torch.Tensor], expected: torch.Tensor) -> float:
    if actual is None:
        return float("inf")
    expected = expected.detach().double()
    return ((actual.detach().double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def validate(p: Problem, forwards: Dict[str, Callable]) -> Dict[str, float]:
    """Each method's Y (and every fused method's gradients) against a float64 loop; raises on a mismatch."""
    x = p.pool[0]
    d = torch.float64
    x64 = InputSet(*(None if t is None else t.detach().to(d).requires_grad_(t.requires_grad)
                     for t in (x.u, x.v, x.residual, x.grad_out)))
    params64 = [t.detach().to(d).requires_grad_(t.requires_grad)
                for t in (p.weight, p.bias, p.lora_a, p.lora_b, p.scale)]
    expected = loop_forward(p, x64, params64)
    wrt64 = x64.leaves + params64[2:]
    expected_grads = torch.autograd.grad(expected, wrt64, x64.grad_out)
    wrt = x.leaves + [p.lora_a, p.lora_b, p.scale]
    names = ["dU", "dV"][: len(x.leaves)] + ["dA", "dB", "dscale"]
    fwd_tol, grad_tol = TOLERANCES[p.dtype]
    errors: Dict[str, float] = {}
    for method, forward in forwards.items():
        if method in ("base", "triton_gemm", "fused_r0"):
            continue
        if method.startswith("fused"):
            with _method_env(method):
                out = forward(x)
                grads = torch.autograd.grad(out, wrt, x.grad_out)
            for name, got, want in zip(names, grads, expected_grads):
                errors[f"{method}.{name}"] = _rel(got, want)
        else:
            with torch.no_grad():
                out = forward(x)
        errors[f"{method}.Y"] = _rel(out, expected)
    if "triton_gemm" in forwards:
        with torch.no_grad():
            errors["triton_gemm.Y"] = _rel(forwards["triton_gemm"](x), base_forward(p, x))
    for key, error in errors.items():
        tolerance = fwd_tol if key.endswith(".Y") else grad_tol
        if not error <= tolerance:  # also catches NaN
            raise AssertionError(f"{p.case.name} batch={p.batch}: {key} differs from the float64 loop by "
                                 f"{error:.3g} (relative to max), above the {tolerance:g} allowed for {p.dtype}")
    return errors


# ---------------------------------------------------------------------------------------------------------
# Timing one problem
# ---------------------------------------------------------------------------------------------------------
def timed_calls(p: Problem, forwards: Dict[str, Callable], mode: str) -> Dict[str, Callable[[], None]]:
    calls = {}
    for method, forward in forwards.items():
        if mode == "fwd_bwd" and method in FORWARD_ONLY:
            continue
        rotation = p.rotation()
        if mode == "fwd":
            def call(forward=forward, rotation=rotation, method=method):
                with torch.no_grad(), _method_env(method):
                    forward(next(rotation))
        else:
            def call(forward=forward, rotation=rotation, method=method):
                x = next(rotation)
                with _method_env(method):
                    forward(x).backward(x.grad_out)
        calls[method] = call
    return calls


def flops(p: Problem, method: str, mode: str) -> float:
    """Useful FLOPs: base ``2 M K N``; LoRA ``2 M_lora r (K_lora + N)`` over the rows with an adapter; fwd_bwd
    counts 2x the base (forward + dX) and 3x the LoRA."""
    c = p.case
    base = 2.0 * p.num_rows * c.in_features * c.out_features
    lora_rows = sum(e - s for s, e, a in p.host_segments if a >= 0)
    lora = 0.0 if method in ("base", "triton_gemm", "fused_r0") else 2.0 * lora_rows * c.rank * (c.k_lora + c.out_features)
    return base + lora if mode == "fwd" else 2.0 * base + 3.0 * lora


def check_targets(rows: List[dict], on_cuda: bool) -> None:
    """Adds ``target`` / ``target_met`` to the ``fused`` rows (and the speed-up over unfused on CUDA)."""
    by = {(r["case"], r["mode"], r["method"]): r for r in rows}
    for row in rows:
        if row["method"] != "fused" or row["ratio_to_base"] is None:
            continue
        if on_cuda:
            goal = TARGETS.get(row["mode"])
            unfused = by.get((row["case"], row["mode"], "unfused"))
            if unfused is not None and unfused["ms"] and row["ms"]:
                row["speedup_vs_unfused"] = round(unfused["ms"] / row["ms"], 3)
                row["speedup_target_met"] = row["speedup_vs_unfused"] >= TARGETS["speedup_vs_unfused"]
        else:
            goal = CPU_TARGETS.get(row["mode"])
            others = [r["ratio_to_base"] for (c, m, meth), r in by.items()
                      if c == row["case"] and m == row["mode"] and meth.startswith("fused_")
                      and r["ratio_to_base"] is not None and not meth.startswith("fused_gemm")
                      and meth not in METHOD_ENV]
            if others:
                row["le_other_backends"] = row["ratio_to_base"] <= min(others)
        if goal is not None:
            row["target"] = f"<= {goal}x base"
            row["target_met"] = row["ratio_to_base"] <= goal


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------
METHODS = ("base", "fused", "loop", "peft_masked", "peft", "unfused")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(MONKEY_CASES), default=None,
                        help="Monkey's layers (default on CUDA; on CPU: none unless given)")
    parser.add_argument("--widths", type=int, nargs="+", default=None,
                        help="square layers K = N = width (default on CPU: 256 512 1024; --quick: 256)")
    parser.add_argument("--rank", type=int, default=16, help="rank of the square layers")
    parser.add_argument("--tokens", type=int, default=None, help="rows per segment (default 1024; /8 with --small)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="base is always added; fused includes one column per other available backend")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                        help="backends of the fused methods, the first being 'fused' (default: the device's "
                             "default backend, then the others that run there)")
    parser.add_argument("--gemm", action="store_true",
                        help="CUDA: also the Triton GEMM without LoRA, the zero-rank fused op and both GEMM paths")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="images (default: 1 2 8 CUDA, 1 CPU)")
    parser.add_argument("--modes", nargs="+", choices=["fwd", "fwd_bwd"], default=["fwd", "fwd_bwd"])
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    parser.add_argument("--small", action="store_true", help=f"Monkey cases' widths and tokens divided by {SMALL_DIVISOR}")
    parser.add_argument("--pool-size", type=int, default=2, help="input sets rotated between calls")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one small size, few rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    add_timer_args(parser)
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = args.device.type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.cases is None and args.widths is None:
        if on_cuda:
            args.cases = list(MONKEY_CASES) if not args.quick else ["out_proj"]
        else:
            args.widths = [256] if args.quick else [256, 512, 1024]
    args.cases, args.widths = args.cases or [], args.widths or []
    args.batches = args.batches or ([1] if args.quick or not on_cuda else [1, 2, 8])
    args.dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    if args.rounds is None and args.quick:
        args.rounds = 1 if on_cuda else 3
    for name in ("rank", "pool_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if any(b < 1 for b in args.batches) or any(w < 1 for w in args.widths):
        parser.error("--batches and --widths must be positive")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Runs the benchmark; writes the JSON (+ PNG), prints a markdown table and returns the result."""
    args = parse_args(argv)
    device, dtype = args.device, DTYPES[args.dtype]
    on_cuda = device.type == "cuda"
    if args.backends:
        from monkey_kernels import resolve_backend  # noqa: PLC0415

        try:
            for name in args.backends:
                resolve_backend(name, device)
        except ValueError as error:
            raise SystemExit(f"--backends: {error}")
        default, others = args.backends[0], list(args.backends[1:])
    else:
        default = default_backend(device)
        others = other_backends(device, default)
    divisor = SMALL_DIVISOR if args.small else 1
    cases = [(MONKEY_CASES[n].scaled_down(divisor), args.tokens or 1024 // divisor) for n in args.cases]
    cases += [(width_case(w, args.rank), args.tokens or 1024) for w in args.widths]
    methods = ["base"] + [m for m in args.methods if m != "base"]
    torch.manual_seed(args.seed)
    rows: List[dict] = []
    validation: Dict[str, Dict[str, float]] = {}
    with tqdm(total=len(cases) * len(args.batches) * len(args.modes), desc="multi-LoRA bench", unit="run",
              disable=args.no_progress) as progress:
        for case, tokens in cases:
            for batch in args.batches:
                p = Problem(case, batch, tokens, dtype, device, args.pool_size)
                forwards = method_forwards(p, default, others, methods, args.gemm)
                label = f"{case.name} b{batch}"
                validation[label] = validate(p, forwards)
                for mode in args.modes:
                    progress.set_postfix_str(f"{label} {mode}")
                    calls = timed_calls(p, forwards, mode)
                    grads = p.trainable if mode == "fwd_bwd" else None
                    timings = time_methods(calls, device, base="base", grad_to_none=grads, **timer_kwargs(args))
                    peaks = None
                    if on_cuda:
                        peaks = {}
                        for m, c in calls.items():
                            for t in p.trainable:  # gradients of the timed calls are not this call's memory
                                t.grad = None
                            peaks[m] = peak_memory_bytes(c, device)
                    for row in timing_rows(label, mode, timings, peaks, batch=batch, M=p.num_rows,
                                           K=case.in_features, N=case.out_features, rank=case.rank,
                                           K_lora=case.k_lora):
                        row["backend"] = (default if row["method"] == "fused" else row["method"][6:]
                                          if row["method"][6:] in others else None)
                        row["tflops"] = round(flops(p, row["method"], mode) / (row["ms"] * 1e-3) / 1e12, 4)
                        rows.append(row)
                    progress.update(1)
                del p, forwards
                if on_cuda:
                    torch.cuda.empty_cache()
    check_targets(rows, on_cuda)
    config = dict(dtype=args.dtype, segment_adapters_per_image=list(SEGMENT_ADAPTERS), batches=args.batches,
                  cases=[c.__dict__ | {"tokens": t} for c, t in cases], methods=methods, fused_backend=default,
                  other_backends=others, pool_size=args.pool_size, seed=args.seed, timer=timer_kwargs(args),
                  targets=TARGETS if on_cuda else CPU_TARGETS)
    result = make_result("multi_lora", device, rows, config=config, validation_rel_errors=validation,
                         gemm_choices=gemm_decisions() if on_cuda else None)
    out = write_result(result, args.out or result_path("multi_lora", device))
    columns = (["case", "method", "mode", "ms", "ratio_to_base", "tflops", "peak_memory_bytes", "target_met"]
               if on_cuda else ["case", "method", "mode", "ms", "ratio_to_base", "target_met", "le_other_backends"])
    report(rows, columns, out, f"multi-LoRA linear: {result['device']}, {result['threads']} threads, {args.dtype}, "
           f"fused = {default} backend{'' if on_cuda else ' (CPU timings)'}", plot=not args.no_plot,
           title=f"multi-LoRA linear: {result['device']}, {args.dtype}", ylabel="time / base (lower is better)")
    return result


if __name__ == "__main__":
    main()
