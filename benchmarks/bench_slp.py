"""Benchmark of the fused ``inputs_embeds`` assembly (``monkey_kernels.slp.slp_embed``) vs the reference.

Cases (full sizes, run on CUDA):

- ``laytextllm``: hidden 4096, seq 4096, batch 8, 512 box placeholders per sequence (pixel boxes + page
  sizes, normalized in the kernel), Llama-2 vocabulary (32000).
- ``monkey``: hidden 4096, seq 2048, batch 8, one image span of 1280 placeholders ((4 tiles + 1) * 256) per
  sequence and 64 boxes, Qwen vocabulary (151936).

Methods, on the same inputs:

- ``reference``: ``SLPEmbeddingRef`` (lookup, projection, per-sequence scatter on a clone), as the public
  models do it.
- ``fused``: ``slp_embed`` with ``validate=True`` (the default: one small host read for the checks).
- ``fused_novalidate``: ``slp_embed(validate=False)``, the CUDA-graph-capturable path; the bandwidth target
  is judged on it.
- ``native`` / ``native_novalidate``: the same two with ``backend="native"``: the C++ ops of
  ``csrc/slp_cpu.cpp`` (forward and backward) on CPU, the CUDA C++ kernel ``csrc/cuda/slp_embed_kernel.cu``
  (forward; the backward is the shared PyTorch one) on a GPU, next to the Triton kernel of ``fused``.
  Measured whenever the native extension loads (and, on a GPU, was built with CUDA); otherwise the JSON
  says why under ``native``.
- ``copy``: ``out.copy_(src)`` of a tensor the size of the output: the device's copy bandwidth.

Bandwidth: the bytes the fused forward must move (write every output row; read the token id, the source
row of each text / image token, the 4 coordinates and page size of each box; the index it builds) over its
time, compared with the copy's ``2 * bytes / time``. Target on GPU: >= 85% of the copy bandwidth.

On CUDA: ``triton.testing.do_bench`` medians, bf16, full sizes. Without CUDA: ``time.perf_counter``
medians, fp32, sizes divided by 8 (hidden by 16), the ``torch`` backend; every such result is labelled
``CPU`` and says nothing about GPU performance.

Run ``PYTHONPATH=. python benchmarks/bench_slp.py --help`` for the options.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from monkey_kernels.models.slp import SLPEmbeddingRef, SpatialLayoutProjector
from monkey_kernels.slp import slp_embed

# Run as a script (python benchmarks/bench_x.py) or imported as benchmarks.bench_x: common.py sits beside it.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, slug  # noqa: E402

__all__ = ["main", "CaseSpec", "FULL_CASES", "METHODS", "TARGET_COPY_FRACTION"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
METHODS = ("copy", "reference", "fused", "fused_novalidate")
NATIVE_METHODS = ("native", "native_novalidate")
TARGET_COPY_FRACTION = 0.85
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BOX_TOKEN_ID = 0
# Largest accepted max|fused - reference| / max|reference| of the forward, per dtype.
TOLERANCES = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-5}


@dataclass(frozen=True)
class CaseSpec:
    name: str
    hidden: int
    seq: int
    batch: int
    vocab: int
    boxes: int  # box placeholders (and boxes) per sequence
    image_tokens: int  # image placeholders (and feature rows) per sequence

    def scaled_down(self) -> "CaseSpec":
        return CaseSpec(self.name, self.hidden // 16, self.seq // 8, min(self.batch, 2), self.vocab // 16,
                        self.boxes // 8, self.image_tokens // 8)


FULL_CASES: Dict[str, CaseSpec] = {
    "laytextllm": CaseSpec("laytextllm", hidden=4096, seq=4096, batch=8, vocab=32000, boxes=512, image_tokens=0),
    "monkey": CaseSpec("monkey", hidden=4096, seq=2048, batch=8, vocab=151936, boxes=64, image_tokens=1280),
}


@dataclass
class Problem:
    case: CaseSpec
    input_ids: torch.Tensor
    table: torch.Tensor
    projector: SpatialLayoutProjector
    embedding: nn.Embedding
    boxes: torch.Tensor
    page_sizes: torch.Tensor
    image_features: Optional[torch.Tensor]
    image_token_id: Optional[int]
    backend: str

    def fused_bytes(self) -> int:
        """Bytes the fused forward has to move at the least (see the module docstring)."""
        c, es = self.case, self.table.element_size()
        tokens = c.batch * c.seq
        text = tokens - c.batch * (c.boxes + c.image_tokens)
        rows = tokens * c.hidden * es  # output
        rows += text * c.hidden * es  # table rows
        rows += c.batch * c.image_tokens * c.hidden * es  # feature rows
        boxes = c.batch * c.boxes * (4 * self.boxes.element_size() + 2 * self.page_sizes.element_size())
        index = tokens * (self.input_ids.element_size() + 4 + 8)  # ids in; kind (int32) and src (int64)
        return rows + boxes + index


def build_problem(case: CaseSpec, dtype: torch.dtype, device: torch.device, backend: str) -> Problem:
    B, S, H, V = case.batch, case.seq, case.hidden, case.vocab
    image_id = V - 1 if case.image_tokens else None
    ids = torch.randint(1, V - 1, (B, S), device=device)
    start = 16  # the image span follows a short prompt, as in Qwen-VL's "<img>...</img>" layout
    if case.image_tokens:
        ids[:, start:start + case.image_tokens] = image_id
    free = torch.arange(start + case.image_tokens, S, device=device)
    for b in range(B):  # setup only: random box-placeholder positions in each sequence
        pick = free[torch.randperm(free.numel(), device=device)[: case.boxes]]
        ids[b, pick] = BOX_TOKEN_ID
    embedding = nn.Embedding(V, H, device=device, dtype=dtype)
    projector = SpatialLayoutProjector(H, device=device, dtype=dtype)
    page_sizes = (torch.rand(B, 2, device=device) * 1500 + 500).round()
    corner = torch.rand(B, case.boxes, 2, device=device)
    boxes = torch.cat([corner, corner + torch.rand_like(corner) * (1 - corner)], dim=-1)
    boxes = (boxes * page_sizes.repeat(1, 2)[:, None]).round().to(dtype)
    feats = torch.randn(B, case.image_tokens, H, device=device, dtype=dtype) if case.image_tokens else None
    return Problem(case, ids, embedding.weight, projector, embedding, boxes, page_sizes.to(dtype), feats,
                   image_id, backend)


def reference_forward(p: Problem) -> torch.Tensor:
    module = SLPEmbeddingRef(p.embedding, p.projector, BOX_TOKEN_ID, p.image_token_id)
    return module(p.input_ids, p.boxes, p.page_sizes, p.image_features)


def fused_forward(p: Problem, validate: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    proj = p.projector.proj
    return slp_embed(
        p.input_ids, p.table, proj.weight, proj.bias, p.boxes, box_token_id=BOX_TOKEN_ID,
        page_sizes=p.page_sizes, image_features=p.image_features, image_token_id=p.image_token_id,
        validate=validate, backend=backend or p.backend,
    )


def native_unavailable(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``backend="native"`` cannot run here (``None``: it can)."""
    from monkey_kernels import _native

    if not _native.available():
        return _native.status()
    if device.type == "cuda":
        from monkey_kernels.slp import _native_has_cuda_kernel

        if not _native_has_cuda_kernel():
            return "the extension was built without CUDA (no CUDA kernel registered)"
    return None


def validate_problem(p: Problem, dtype: torch.dtype, backend: Optional[str] = None) -> float:
    with torch.no_grad():
        expected, got = reference_forward(p).float(), fused_forward(p, backend=backend).float()
    error = (got - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)
    if not error <= TOLERANCES[dtype]:
        raise AssertionError(f"{p.case.name}: fused ({backend or p.backend}) differs from the reference by "
                             f"{error:.3g} (relative to max)")
    return error


class CpuTimer:
    """``time.perf_counter`` median of ``repeats`` calls after ``WARMUP`` untimed ones (first-touch page
    faults and allocator growth stay out of the numbers)."""

    label = "CPU"
    WARMUP = 3

    def __init__(self, repeats: int):
        self.repeats = repeats

    def __call__(self, fn: Callable[[], None]) -> float:
        for _ in range(self.WARMUP):
            fn()
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


class CudaTimer:
    label = "GPU"

    def __init__(self, rep_ms: int):
        self.rep_ms = rep_ms

    def __call__(self, fn: Callable[[], None]) -> float:
        import triton.testing

        return triton.testing.do_bench(fn, rep=self.rep_ms, return_mode="median")


def measure(method: str, p: Problem, timer, dtype: torch.dtype) -> dict:
    c = p.case
    out_bytes = c.batch * c.seq * c.hidden * p.table.element_size()
    row = {"case": c.name, "batch": c.batch, "seq": c.seq, "hidden": c.hidden, "boxes": c.boxes,
           "image_tokens": c.image_tokens, "method": method, "label": timer.label, "fwd_ms": None,
           "fwdbwd_ms": None, "bytes": None, "gb_per_s": None, "fraction_of_copy": None}
    if method == "copy":
        src = torch.empty(c.batch * c.seq * c.hidden, device=p.table.device, dtype=dtype).normal_()
        dst = torch.empty_like(src)
        row["fwd_ms"] = timer(lambda: dst.copy_(src))
        row["bytes"] = 2 * out_bytes
    else:
        forward = reference_forward if method == "reference" else fused_forward
        kwargs = {"validate": False} if method.endswith("_novalidate") else {}
        if method in NATIVE_METHODS:
            kwargs["backend"] = "native"

        def fwd() -> None:
            with torch.no_grad():
                forward(p, **kwargs)

        row["fwd_ms"] = timer(fwd)
        row["bytes"] = p.fused_bytes()
        grad = torch.randn(c.batch, c.seq, c.hidden, device=p.table.device, dtype=dtype)
        trainable = [p.table, p.projector.proj.weight, p.projector.proj.bias]

        def step() -> None:
            for t in trainable:
                t.grad = None
            forward(p, **kwargs).backward(grad)

        row["fwdbwd_ms"] = timer(step)
    row["gb_per_s"] = row["bytes"] / (row["fwd_ms"] * 1e-3) / 1e9
    return row






def _fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else f"{value:{spec}}"


def markdown_table(results: dict) -> str:
    header = ["case", "B x S x H", "boxes", "image tok", "method", "fwd ms", "fwd+bwd ms", "MB moved", "GB/s",
              "of copy BW", "device"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results["results"]:
        lines.append("| " + " | ".join([
            r["case"], f"{r['batch']}x{r['seq']}x{r['hidden']}", str(r["boxes"]), str(r["image_tokens"]),
            r["method"], _fmt(r["fwd_ms"], ".3f"), _fmt(r["fwdbwd_ms"], ".3f"), _fmt(r["bytes"] / 1e6, ".1f"),
            _fmt(r["gb_per_s"], ".1f"), _fmt(r["fraction_of_copy"], ".0%"), r["label"],
        ]) + " |")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time the fused SLP embedding assembly against the reference.")
    parser.add_argument("--cases", nargs="+", choices=list(FULL_CASES), default=list(FULL_CASES))
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--backend", choices=["triton", "torch", "native"], default=None,
                        help="backend of the fused methods; default: triton on CUDA, torch on CPU (triton on CPU "
                             "needs TRITON_INTERPRET=1). The native methods always use backend='native'")
    parser.add_argument("--no-native", action="store_true", help="skip the native / native_novalidate methods")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", dest="small", action="store_true", default=None,
                      help="sizes divided by 8 (hidden by 16), batch <= 2 (default on CPU)")
    size.add_argument("--full", dest="small", action="store_false", help="full sizes (default on CUDA)")
    parser.add_argument("--repeats", type=int, default=30, help="CPU: timed calls per measurement (median)")
    parser.add_argument("--rep-ms", type=int, default=200, help="CUDA: do_bench timing window in ms")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU: torch intra-op threads (default 1: steadier timings on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/slp_<device>_<date>.json)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    on_cuda = args.device == "cuda"
    args.backend = args.backend or ("triton" if on_cuda else "torch")
    if args.backend == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        parser.error("--backend triton on CPU needs TRITON_INTERPRET=1 in the environment (very slow)")
    args.dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    args.small = (not on_cuda) if args.small is None else args.small
    if args.repeats < 1 or args.rep_ms < 1:
        parser.error("--repeats and --rep-ms must be positive")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Runs the benchmark; writes the JSON, prints a markdown table and returns the results dict."""
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    on_cuda = device.type == "cuda"
    timer = CudaTimer(args.rep_ms) if on_cuda else CpuTimer(args.repeats)
    if not on_cuda:
        torch.set_num_threads(args.threads or 1)
    cases = [FULL_CASES[n].scaled_down() if args.small else FULL_CASES[n] for n in args.cases]
    device_label = device_name(device)
    today = datetime.date.today().isoformat()
    out_path = args.out or RESULTS_DIR / f"slp_{slug(device_label)}_{today}.json"
    print(f"SLP embedding benchmark on {device_label} [{timer.label}]: dtype={args.dtype}, backend={args.backend}, "
          f"{'small' if args.small else 'full'} sizes", file=sys.stderr)
    torch.manual_seed(args.seed)
    native_reason = "skipped: --no-native" if args.no_native else native_unavailable(device, dtype)
    methods = METHODS + (NATIVE_METHODS if native_reason is None else ())
    if native_reason is not None:
        print(f"native methods not measured: {native_reason}", file=sys.stderr)
    rows: List[dict] = []
    errors: Dict[str, float] = {}
    with tqdm(total=len(cases) * len(methods), desc="SLP bench", unit="run", disable=args.no_progress) as progress:
        for case in cases:
            problem = build_problem(case, dtype, device, args.backend)
            progress.set_postfix_str(f"{case.name} validating")
            errors[case.name] = validate_problem(problem, dtype)
            if native_reason is None:
                errors[f"{case.name}/native"] = validate_problem(problem, dtype, "native")
            group = []
            for method in methods:
                progress.set_postfix_str(f"{case.name} {method}")
                group.append(measure(method, problem, timer, dtype))
                progress.update(1)
            copy_bw = group[0]["gb_per_s"]
            for row in group:
                row["fraction_of_copy"] = row["gb_per_s"] / copy_bw
                if on_cuda and row["method"] in ("fused_novalidate", "native_novalidate"):
                    row["target"] = {"goal": f">= {TARGET_COPY_FRACTION:.0%} of copy bandwidth",
                                     "met": row["fraction_of_copy"] >= TARGET_COPY_FRACTION}
            rows.extend(group)
            del problem
            if on_cuda:
                torch.cuda.empty_cache()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    results = {
        "device": device_label,
        "device_kind": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "date": today,
        "dtype": args.dtype,
        "backend": args.backend,
        "native": "measured" if native_reason is None else native_reason,
        "config": {
            "sizes": "small" if args.small else "full", "cases": [dict(c.__dict__) for c in cases],
            "timer": "triton.testing.do_bench median" if on_cuda else "time.perf_counter median",
            "repeats": None if on_cuda else args.repeats, "rep_ms": args.rep_ms if on_cuda else None,
            "seed": args.seed, "cpu_threads": None if on_cuda else torch.get_num_threads(),
            "bytes": "fused: output + text/image source rows + boxes/page sizes + ids/kind/src; copy: 2 x output",
        },
        "target_fraction_of_copy": TARGET_COPY_FRACTION if on_cuda else None,
        "validation_relative_errors": errors,
        "results": rows,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(f"### SLP embedding assembly: {device_label} [{timer.label}], {args.dtype}, backend={args.backend}, "
          f"{'small' if args.small else 'full'} sizes")
    print()
    print(markdown_table(results))
    print()
    if on_cuda:
        print(f"Target: fused_novalidate forward >= {TARGET_COPY_FRACTION:.0%} of the device-to-device copy bandwidth.")
    else:
        print("CPU results: a run of the harness at reduced sizes; they say nothing about GPU performance.")
    print(f"Results written to {out_path}")
    return results


if __name__ == "__main__":
    main()
