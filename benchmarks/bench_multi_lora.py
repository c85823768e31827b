"""Benchmark of the segmented multi-LoRA linear (``monkey_kernels.multi_lora_linear``) on Monkey's shapes.

One run times forward and forward+backward of three layers of Monkey's vision encoder, each with a batch
of images whose rows are split into 1024-token segments: per image four adapters (ids 0..3) and one
base-only segment (id -1). Methods, all on the same inputs:

- ``base``: ``F.linear(U, W, bias)`` (+ residual): the lower bound. Its forward+backward (only ``U``
  requires grad, so backward is ``dX = dY @ W`` alone) is the denominator of every fwd+bwd ratio.
- ``loop``: base + a Python loop over segments (Monkey's reference implementation).
- ``peft_masked``: base + every adapter run on all rows and masked to its own rows (PEFT's mixed batch).
- ``unfused``: base + the Triton shrink kernel + a separate expand pass over ``Y`` (the serving-kernel
  design); forward only, Triton backend only.
- ``fused``: ``multi_lora_linear`` (shrink, then the base GEMM with the expand in its epilogue).

On CUDA: ``triton.testing.do_bench`` medians (forward under a CUDA graph where capture works), bf16,
full shapes. Without CUDA: ``time.perf_counter`` medians, fp32, shapes scaled down by 8, the ``torch``
backend; every such result is labelled ``CPU`` and says nothing about GPU performance.

Run ``PYTHONPATH=. python benchmarks/bench_multi_lora.py --help`` for the options.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from monkey_kernels.multi_lora import multi_lora_linear
from triton_kernels.segments import SegmentInfo

# Run as a script (python benchmarks/bench_x.py) or imported as benchmarks.bench_x: common.py sits beside it.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, slug, triton_version  # noqa: E402

__all__ = ["main", "CaseSpec", "FULL_CASES", "METHODS", "TARGETS"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"

SEGMENT_ADAPTERS = (0, 1, 2, 3, -1)  # one image: four adapter segments, then a base-only segment
NUM_ADAPTERS = 4
ADAPTER_SCALES = (0.5, 1.0, 1.5, 2.0)
FULL_TOKENS_PER_SEGMENT = 1024
SMALL_DIVISOR = 8  # --small divides every width and the tokens per segment by this

METHODS = ("base", "loop", "peft_masked", "unfused", "fused")
METHODS_WITH_BACKWARD = ("base", "loop", "peft_masked", "fused")

# Goals for the fused op on GPU. They are printed next to GPU results only.
TARGETS = {
    "fused_fwd_ratio_to_base_max": 1.08,
    "fused_fwdbwd_ratio_to_base_dx_max": 1.15,
    "fused_speedup_vs_unfused_min": 1.4,
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Largest accepted max|fused - loop| / max|loop| (forward, gradients) per dtype.
TOLERANCES = {torch.bfloat16: (3e-2, 5e-2), torch.float16: (5e-3, 1e-2), torch.float32: (1e-3, 2e-3)}


@dataclass(frozen=True)
class CaseSpec:
    """One layer: ``Y = U W^T + bias + s[a] (V A[a]^T) B[a]^T (+ residual)`` with ``U: [M, K]``."""

    name: str
    in_features: int  # K
    out_features: int  # N
    rank: int
    lora_in_features: Optional[int] = None  # width of a separate LoRA input V; None: V is U
    has_residual: bool = False

    @property
    def k_lora(self) -> int:
        return self.lora_in_features if self.lora_in_features is not None else self.in_features

    def scaled_down(self, divisor: int) -> "CaseSpec":
        """The same layer with every width divided by ``divisor`` (the rank is kept)."""
        return CaseSpec(
            name=self.name,
            in_features=self.in_features // divisor,
            out_features=self.out_features // divisor,
            rank=self.rank,
            lora_in_features=None if self.lora_in_features is None else self.lora_in_features // divisor,
            has_residual=self.has_residual,
        )


FULL_CASES: Dict[str, CaseSpec] = {
    "qkv": CaseSpec("qkv", in_features=1664, out_features=4992, rank=16),
    "out_proj": CaseSpec("out_proj", in_features=1664, out_features=1664, rank=16),
    "c_proj": CaseSpec("c_proj", in_features=8192, out_features=1664, rank=32, lora_in_features=1664,
                       has_residual=True),
}


# ---------------------------------------------------------------------------------------------------------
# Problem: weights, segments and a pool of input sets for one (case, batch)
# ---------------------------------------------------------------------------------------------------------
@dataclass
class InputSet:
    """One set of per-call activations; the timed functions rotate through several of them."""

    u: torch.Tensor
    v: Optional[torch.Tensor]  # None: the LoRA input is u
    residual: Optional[torch.Tensor]
    grad_out: torch.Tensor

    @property
    def lora_input(self) -> torch.Tensor:
        return self.u if self.v is None else self.v

    @property
    def leaves(self) -> List[torch.Tensor]:
        return [t for t in (self.u, self.v) if t is not None]


@dataclass
class Problem:
    case: CaseSpec
    batch: int
    backend: str
    segments: SegmentInfo
    host_segments: List[Tuple[int, int, int]]  # (start row, end row, adapter id) known on the host
    weight: torch.Tensor
    bias: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: torch.Tensor
    ranks: torch.Tensor
    pool: List[InputSet]

    @property
    def num_rows(self) -> int:
        return self.segments.num_rows

    @property
    def lora_rows(self) -> int:
        return sum(end - start for start, end, adapter in self.host_segments if adapter >= 0)

    @property
    def adapters_in_use(self) -> List[int]:
        return sorted({adapter for _, _, adapter in self.host_segments if adapter >= 0})

    @property
    def trainable(self) -> List[torch.Tensor]:
        leaves = [t for inputs in self.pool for t in inputs.leaves]
        return leaves + [self.lora_a, self.lora_b, self.scale]

    def rotation(self) -> Iterator[InputSet]:
        return itertools.cycle(self.pool)

    def flops(self, method: str) -> Tuple[float, float]:
        """Useful FLOPs of (forward, forward+backward).

        Base ``2 M K N``; LoRA ``2 M_lora r (K_lora + N)`` over the rows that carry an adapter, whatever
        a method spends on other rows. Backward: ``dX`` costs one base GEMM (``W`` is frozen) and the
        LoRA gradients (``dY B``, ``dB``, ``dA``, ``dV``) twice the LoRA forward.
        """
        case = self.case
        base = 2.0 * self.num_rows * case.in_features * case.out_features
        lora = 0.0 if method == "base" else 2.0 * self.lora_rows * case.rank * (case.k_lora + case.out_features)
        return base + lora, 2.0 * base + 3.0 * lora


def build_problem(case: CaseSpec, batch: int, tokens_per_segment: int, dtype: torch.dtype,
                  device: torch.device, backend: str, pool_size: int) -> Problem:
    ids = list(SEGMENT_ADAPTERS) * batch
    segments = SegmentInfo.from_batch(ids, tokens_per_segment, device=device)
    host_segments = [(g * tokens_per_segment, (g + 1) * tokens_per_segment, a) for g, a in enumerate(ids)]
    M, K, N, r, k_lora = segments.num_rows, case.in_features, case.out_features, case.rank, case.k_lora

    def randn(*shape, std=1.0, grad=False):
        return (torch.randn(*shape, device=device, dtype=dtype) * std).requires_grad_(grad)

    # Scaled so the base and LoRA terms are both O(1): validation then checks the LoRA term for real.
    weight = randn(N, K, std=K ** -0.5)
    bias = randn(N, std=0.1)
    lora_a = randn(NUM_ADAPTERS, r, k_lora, std=k_lora ** -0.5, grad=True)
    lora_b = randn(NUM_ADAPTERS, N, r, std=r ** -0.5, grad=True)
    scale = torch.tensor(ADAPTER_SCALES, device=device, dtype=torch.float32, requires_grad=True)
    ranks = torch.full((NUM_ADAPTERS,), r, device=device, dtype=torch.int32)
    pool = [
        InputSet(
            u=randn(M, K, grad=True),
            v=randn(M, k_lora, grad=True) if case.lora_in_features is not None else None,
            residual=randn(M, N) if case.has_residual else None,
            grad_out=randn(M, N),
        )
        for _ in range(pool_size)
    ]
    return Problem(case, batch, backend, segments, host_segments, weight, bias, lora_a, lora_b, scale,
                   ranks, pool)


# ---------------------------------------------------------------------------------------------------------
# The methods: (problem, inputs) -> Y
# ---------------------------------------------------------------------------------------------------------
def base_forward(problem: Problem, inputs: InputSet) -> torch.Tensor:
    out = F.linear(inputs.u, problem.weight, problem.bias)
    if inputs.residual is not None:
        out = out + inputs.residual
    return out


def loop_forward(problem: Problem, inputs: InputSet) -> torch.Tensor:
    out = base_forward(problem, inputs)
    v = inputs.lora_input
    for start, end, adapter in problem.host_segments:
        if adapter >= 0:
            delta = (v[start:end] @ problem.lora_a[adapter].t()) @ problem.lora_b[adapter].t()
            out[start:end] += problem.scale[adapter] * delta
    return out


def peft_masked_forward(problem: Problem, inputs: InputSet) -> torch.Tensor:
    out = base_forward(problem, inputs)
    v = inputs.lora_input
    for adapter in problem.adapters_in_use:
        mask = (problem.segments.row_adapter == adapter).to(out.dtype)[:, None]
        delta = problem.scale[adapter] * (v @ problem.lora_a[adapter].t()) @ problem.lora_b[adapter].t()
        out = out + mask * delta
    return out


def unfused_forward(problem: Problem, inputs: InputSet) -> torch.Tensor:
    from triton_kernels.multi_lora import fused_lora_gemm, rank_block, segmented_shrink  # needs Triton

    base = base_forward(problem, inputs)
    h = segmented_shrink(inputs.lora_input, problem.lora_a, problem.segments, problem.ranks,
                         rank_block(problem.case.rank))
    return fused_lora_gemm(
        None, None, None, h, problem.lora_b, problem.scale, base, problem.segments, problem.ranks,
        out_features=problem.case.out_features, out_dtype=base.dtype,
    )


def fused_forward(problem: Problem, inputs: InputSet) -> torch.Tensor:
    return multi_lora_linear(
        inputs.u, problem.weight, problem.bias, problem.lora_a, problem.lora_b, problem.scale,
        problem.segments, lora_input=inputs.v, residual=inputs.residual, backend=problem.backend,
    )


METHOD_FORWARDS: Dict[str, Callable[[Problem, InputSet], torch.Tensor]] = {
    "base": base_forward,
    "loop": loop_forward,
    "peft_masked": peft_masked_forward,
    "unfused": unfused_forward,
    "fused": fused_forward,
}


def forward_call(method: str, problem: Problem) -> Callable[[], None]:
    forward, rotation = METHOD_FORWARDS[method], problem.rotation()

    def call() -> None:
        with torch.no_grad():
            forward(problem, next(rotation))

    return call


def fwdbwd_call(method: str, problem: Problem) -> Callable[[], None]:
    forward, rotation = METHOD_FORWARDS[method], problem.rotation()

    def call() -> None:
        inputs = next(rotation)
        forward(problem, inputs).backward(inputs.grad_out)

    return call


# ---------------------------------------------------------------------------------------------------------
# Validation: every method is checked against the loop before anything is timed
# ---------------------------------------------------------------------------------------------------------
def _relative_error(actual: Optional[torch.Tensor], expected: Optional[torch.Tensor]) -> float:
    """``max|actual - expected| / max|expected|`` (the scale of the result, not of each element)."""
    if actual is None or expected is None:
        raise AssertionError("a gradient is missing")
    expected = expected.detach().float()
    diff = (actual.detach().float() - expected).abs().max().item()
    return diff / max(expected.abs().max().item(), 1e-30)


def validate(problem: Problem, methods: Sequence[str], dtype: torch.dtype) -> Dict[str, float]:
    """Assert that each method's output (and the fused op's gradients) match the loop; returns the errors."""
    inputs = problem.pool[0]
    fwd_tol, grad_tol = TOLERANCES[dtype]
    wrt = inputs.leaves + [problem.lora_a, problem.lora_b, problem.scale]
    names = ["dU", "dV"][: len(inputs.leaves)] + ["dA", "dB", "dscale"]
    reference = loop_forward(problem, inputs)
    reference_grads = torch.autograd.grad(reference, wrt, inputs.grad_out)
    errors: Dict[str, float] = {}
    for method in methods:
        if method in ("base", "loop") or (method == "unfused" and problem.backend != "triton"):
            continue
        if method == "fused":
            out = fused_forward(problem, inputs)
            grads = torch.autograd.grad(out, wrt, inputs.grad_out)
            for name, grad, expected in zip(names, grads, reference_grads):
                errors[f"fused.{name}"] = _relative_error(grad, expected)
        else:
            with torch.no_grad():
                out = METHOD_FORWARDS[method](problem, inputs)
        errors[f"{method}.Y"] = _relative_error(out, reference)
    for key, error in errors.items():
        tolerance = fwd_tol if key.endswith(".Y") else grad_tol
        if not error <= tolerance:  # also catches NaN
            raise AssertionError(
                f"{problem.case.name} batch={problem.batch}: {key} differs from the loop reference by "
                f"{error:.3g} (relative to max |reference|), above the {tolerance:g} allowed for {dtype}"
            )
    return errors


# ---------------------------------------------------------------------------------------------------------
# Timers
# ---------------------------------------------------------------------------------------------------------
class CpuTimer:
    """``time.perf_counter`` median of ``repeats`` calls after one warm-up call."""

    label = "CPU"

    def __init__(self, repeats: int):
        self.repeats = repeats

    def _median_ms(self, fn: Callable[[], None], grad_to_none: Sequence[torch.Tensor]) -> float:
        times = []
        for i in range(self.repeats + 1):
            for tensor in grad_to_none:
                tensor.grad = None
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if i > 0:
                times.append(elapsed * 1e3)
        return statistics.median(times)

    def forward(self, fn: Callable[[], None]) -> Tuple[float, str]:
        return self._median_ms(fn, ()), "perf_counter"

    def fwdbwd(self, fn: Callable[[], None], grad_to_none: Sequence[torch.Tensor]) -> float:
        return self._median_ms(fn, grad_to_none)

    def peak_memory_mb(self, fn: Callable[[], None], grad_to_none: Sequence[torch.Tensor]) -> Optional[float]:
        return None  # the CPU allocator keeps no peak statistics


class CudaTimer:
    """``triton.testing.do_bench`` medians (L2 flushed between calls); forward replayed from a CUDA graph
    when it can be captured (no launch overhead, as a captured serving step would run)."""

    label = "GPU"

    def __init__(self, rep_ms: int):
        self.rep_ms = rep_ms

    def forward(self, fn: Callable[[], None]) -> Tuple[float, str]:
        import triton.testing

        torch.cuda.synchronize()  # do_bench_cudagraph runs on a side stream that does not wait for ours
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=self.rep_ms, return_mode="median"), "cuda_graph"
        except RuntimeError as error:
            print(f"\nCUDA graph capture failed ({error}); timing this forward with do_bench", file=sys.stderr)
            torch.cuda.synchronize()
            return triton.testing.do_bench(fn, rep=self.rep_ms, return_mode="median"), "do_bench"

    def fwdbwd(self, fn: Callable[[], None], grad_to_none: Sequence[torch.Tensor]) -> float:
        import triton.testing

        return triton.testing.do_bench(fn, rep=self.rep_ms, grad_to_none=list(grad_to_none), return_mode="median")

    def peak_memory_mb(self, fn: Callable[[], None], grad_to_none: Sequence[torch.Tensor]) -> Optional[float]:
        """Peak allocation above what was allocated before the call (inputs and weights excluded)."""
        for tensor in grad_to_none:
            tensor.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        for tensor in grad_to_none:
            tensor.grad = None
        return peak / 2**20


# ---------------------------------------------------------------------------------------------------------
# Measuring and reporting
# ---------------------------------------------------------------------------------------------------------
def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _tflops(flops: float, ms: Optional[float]) -> Optional[float]:
    return None if ms is None or ms <= 0 else flops / (ms * 1e-3) / 1e12


def measure(method: str, problem: Problem, timer, triton_backend: bool) -> dict:
    """Times one method on one problem; ratios and targets are filled in by :func:`finish_rows`."""
    case = problem.case
    row = {
        "case": case.name, "batch": problem.batch, "M": problem.num_rows, "K": case.in_features,
        "N": case.out_features, "K_lora": case.k_lora, "rank": case.rank, "method": method,
        "label": timer.label, "fwd_ms": None, "fwdbwd_ms": None, "fwd_ratio_to_base": None,
        "fwdbwd_ratio_to_base_dx": None, "tflops_fwd": None, "tflops_fwdbwd": None, "peak_mem_mb": None,
        "peak_mem_fwdbwd_mb": None, "fwd_timer": None, "note": None,
    }
    if method == "unfused" and not triton_backend:
        row["note"] = "n/a: needs the triton backend (CUDA, or TRITON_INTERPRET=1)"
        return row
    flops_fwd, flops_fwdbwd = problem.flops(method)
    forward = forward_call(method, problem)
    row["fwd_ms"], row["fwd_timer"] = timer.forward(forward)
    row["tflops_fwd"] = _tflops(flops_fwd, row["fwd_ms"])
    row["peak_mem_mb"] = timer.peak_memory_mb(forward, ())
    if method in METHODS_WITH_BACKWARD:
        step = fwdbwd_call(method, problem)
        row["fwdbwd_ms"] = timer.fwdbwd(step, problem.trainable)
        row["tflops_fwdbwd"] = _tflops(flops_fwdbwd, row["fwdbwd_ms"])
        row["peak_mem_fwdbwd_mb"] = timer.peak_memory_mb(step, problem.trainable)
    else:
        row["note"] = "forward only (bwd n/a)"
    return row


def finish_rows(rows: List[dict], check_targets: bool) -> None:
    """Ratios to ``base`` of the same (case, batch); on GPU, the fused op's targets."""
    by_method = {row["method"]: row for row in rows}
    base = by_method.get("base", {})
    for row in rows:
        row["fwd_ratio_to_base"] = _ratio(row["fwd_ms"], base.get("fwd_ms"))
        row["fwdbwd_ratio_to_base_dx"] = _ratio(row["fwdbwd_ms"], base.get("fwdbwd_ms"))
    fused, unfused = by_method.get("fused"), by_method.get("unfused")
    if fused is None:
        return
    fused["speedup_vs_unfused"] = _ratio(unfused and unfused["fwd_ms"], fused["fwd_ms"])
    if check_targets:
        checks = {
            "fwd_ratio_to_base": (fused["fwd_ratio_to_base"], "<=", TARGETS["fused_fwd_ratio_to_base_max"]),
            "fwdbwd_ratio_to_base_dx": (fused["fwdbwd_ratio_to_base_dx"], "<=",
                                        TARGETS["fused_fwdbwd_ratio_to_base_dx_max"]),
            "speedup_vs_unfused": (fused["speedup_vs_unfused"], ">=", TARGETS["fused_speedup_vs_unfused_min"]),
        }
        fused["targets"] = {
            name: {"value": value, "goal": f"{op} {goal}",
                   "met": None if value is None else (value <= goal if op == "<=" else value >= goal)}
            for name, (value, op, goal) in checks.items()
        }


def _fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _targets_cell(row: dict) -> str:
    parts = []
    for name, short in (("fwd_ratio_to_base", "fwd"), ("fwdbwd_ratio_to_base_dx", "fwd+bwd"),
                        ("speedup_vs_unfused", "vs unfused")):
        check = row.get("targets", {}).get(name)
        if check is not None:
            verdict = {True: "ok", False: "MISS", None: "n/a"}[check["met"]]
            parts.append(f"{short} {_fmt(check['value'], '.2f', 'x')} ({check['goal']}) {verdict}")
    return "; ".join(parts)


def markdown_table(results: dict) -> str:
    show_targets = results["device_kind"] == "cuda"
    header = ["case", "batch", "M", "K->N (r)", "method", "fwd ms", "fwd / base", "fwd+bwd ms",
              "fwd+bwd / base dX", "TFLOP/s fwd", "peak MB fwd", "device"]
    if show_targets:
        header.append("targets")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results["results"]:
        shape = f"{row['K']}->{row['N']} ({row['rank']})"
        if row["K_lora"] != row["K"]:
            shape = f"{row['K']}->{row['N']} (r{row['rank']}, V {row['K_lora']})"
        cells = [
            row["case"], str(row["batch"]), str(row["M"]), shape, row["method"],
            _fmt(row["fwd_ms"], ".3f"), _fmt(row["fwd_ratio_to_base"], ".2f", "x"),
            _fmt(row["fwdbwd_ms"], ".3f"), _fmt(row["fwdbwd_ratio_to_base_dx"], ".2f", "x"),
            _fmt(row["tflops_fwd"], ".2f"), _fmt(row["peak_mem_mb"], ".1f"), row["label"],
        ]
        if show_targets:
            cells.append(_targets_cell(row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------






def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time the fused multi-LoRA linear against base / loop / PEFT-masked / unfused baselines.",
    )
    parser.add_argument("--cases", nargs="+", choices=list(FULL_CASES), default=list(FULL_CASES))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--batches", nargs="+", type=int, default=None,
                        help="images per batch (default: 1 2 8 on CUDA, 1 2 on CPU)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--backend", choices=["triton", "torch"], default=None,
                        help="backend of the fused op (default: triton on CUDA, torch on CPU; triton on CPU "
                             "needs TRITON_INTERPRET=1 and is very slow)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", dest="small", action="store_true", default=None,
                      help=f"widths and tokens per segment divided by {SMALL_DIVISOR} (default on CPU)")
    size.add_argument("--full", dest="small", action="store_false", help="Monkey's shapes (default on CUDA)")
    parser.add_argument("--repeats", type=int, default=20, help="CPU: timed calls per measurement (median)")
    parser.add_argument("--rep-ms", type=int, default=100, help="CUDA: do_bench timing window in ms")
    parser.add_argument("--pool-size", type=int, default=4,
                        help="distinct input sets rotated between calls, so caches do not flatter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/multi_lora_<device>_<date>.json)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    on_cuda = args.device == "cuda"
    if args.backend is None:
        args.backend = "triton" if on_cuda else "torch"
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if args.backend == "triton" and not on_cuda and not interpreting:
        parser.error("--backend triton on CPU needs TRITON_INTERPRET=1 in the environment (very slow)")
    if args.batches is None:
        args.batches = [1, 2, 8] if on_cuda else [1, 2]
    if any(batch < 1 for batch in args.batches):
        parser.error("--batches must be positive")
    if args.dtype is None:
        args.dtype = "bf16" if on_cuda else "fp32"
    if args.small is None:
        args.small = not on_cuda
    if args.repeats < 1 or args.rep_ms < 1 or args.pool_size < 1:
        parser.error("--repeats, --rep-ms and --pool-size must be positive")
    if "base" not in args.methods:
        args.methods = ["base"] + list(args.methods)  # every ratio is taken against base
    args.methods = [m for m in METHODS if m in args.methods]
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Runs the benchmark; writes the JSON, prints a markdown table and returns the results dict."""
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    on_cuda = device.type == "cuda"
    timer = CudaTimer(args.rep_ms) if on_cuda else CpuTimer(args.repeats)
    divisor = SMALL_DIVISOR if args.small else 1
    tokens_per_segment = FULL_TOKENS_PER_SEGMENT // divisor
    cases = [FULL_CASES[name].scaled_down(divisor) for name in args.cases]
    device_label = device_name(device)
    today = datetime.date.today().isoformat()
    out_path = args.out or RESULTS_DIR / f"multi_lora_{slug(device_label)}_{today}.json"

    print(f"multi-LoRA benchmark on {device_label} [{timer.label}]: dtype={args.dtype}, backend={args.backend}, "
          f"{'small' if args.small else 'full'} shapes, {tokens_per_segment} tokens per segment", file=sys.stderr)
    torch.manual_seed(args.seed)
    rows: List[dict] = []
    validation: Dict[str, Dict[str, float]] = {}
    combos = len(cases) * len(args.batches) * len(args.methods)
    with tqdm(total=combos, desc="multi-LoRA bench", unit="run", disable=args.no_progress) as progress:
        for case in cases:
            for batch in args.batches:
                problem = build_problem(case, batch, tokens_per_segment, dtype, device, args.backend,
                                        args.pool_size)
                progress.set_postfix_str(f"{case.name} b={batch} validating")
                errors = validate(problem, args.methods, dtype)
                validation[f"{case.name}/batch{batch}"] = errors
                group = []
                for method in args.methods:
                    progress.set_postfix_str(f"{case.name} b={batch} {method}")
                    group.append(measure(method, problem, timer, args.backend == "triton"))
                    progress.update(1)
                finish_rows(group, check_targets=on_cuda)
                rows.extend(group)
                del problem
                if on_cuda:
                    torch.cuda.empty_cache()

    results = {
        "device": device_label,
        "device_kind": device.type,
        "torch": torch.__version__,
        "triton": triton_version(),
        "date": today,
        "dtype": args.dtype,
        "backend": args.backend,
        "config": {
            "shapes": "small" if args.small else "full", "tokens_per_segment": tokens_per_segment,
            "segment_adapters_per_image": list(SEGMENT_ADAPTERS), "batches": args.batches,
            "cases": args.cases, "methods": args.methods, "pool_size": args.pool_size,
            "timer": "do_bench (forward: do_bench_cudagraph)" if on_cuda else "time.perf_counter median",
            "repeats": None if on_cuda else args.repeats, "rep_ms": args.rep_ms if on_cuda else None,
            "seed": args.seed,
        },
        "targets": TARGETS if on_cuda else None,
        "validation_relative_errors": validation,
        "results": rows,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")

    print()
    print(f"### multi-LoRA linear: {device_label} [{timer.label}], {args.dtype}, backend={args.backend}, "
          f"{'small' if args.small else 'full'} shapes")
    print()
    print(markdown_table(results))
    print()
    if on_cuda:
        print(f"Targets (fused): fwd <= {TARGETS['fused_fwd_ratio_to_base_max']}x base; fwd+bwd <= "
              f"{TARGETS['fused_fwdbwd_ratio_to_base_dx_max']}x base fwd+dX; >= "
              f"{TARGETS['fused_speedup_vs_unfused_min']}x faster than unfused.")
    else:
        print("CPU results: smoke test of the harness at reduced shapes; they say nothing about GPU performance.")
    print(f"Results written to {out_path}")
    return results


if __name__ == "__main__":
    main()
