"""Benchmark of the fused ``inputs_embeds`` assembly (``monkey_kernels.ops.slp.slp_embed``) vs the reference.

Cases (full sizes, run on CUDA):

- ``laytextllm``: hidden 4096, seq 4096, batch 8, 512 box placeholders per sequence (pixel boxes + page
  sizes, normalized in the kernel), Llama-2 vocabulary (32000).
- ``monkey``: hidden 4096, seq 2048, batch 8, one image span of 1280 placeholders ((4 tiles + 1) * 256) per
  sequence and 64 boxes, Qwen vocabulary (151936).

Methods, on the same inputs:

- ``reference``: ``SLPEmbeddingRef`` (lookup, projection, per-sequence scatter on a clone), as the public
  models do it.
- ``fused``: ``slp_embed`` with ``validate=True`` (the default: one small host read for the checks) and the
  device's DEFAULT backend (native on CPU when the extension loads, triton on CUDA).
- ``fused_novalidate``: ``slp_embed(validate=False)``, the CUDA-graph-capturable path; the bandwidth target
  is judged on it.
- ``fused_<backend>`` / ``fused_<backend>_novalidate``: the same with each other backend that runs on the
  device (native: ``csrc/slp_cpu.cpp`` on CPU, ``csrc/cuda/slp_embed_kernel.cu`` on a GPU when built with
  CUDA); a backend that cannot run is listed with its reason under ``skipped_backends`` in the JSON.
- ``copy``: ``out.copy_(src)`` of a tensor the size of the output: the device's copy bandwidth (the ``fwd``
  ratio's base; ``fwd_bwd`` ratios are to ``reference``).

Bandwidth: the bytes the fused forward must move (write every output row; read the token id, the source
row of each text / image token, the 4 coordinates and page size of each box; the index it builds) over its
time, compared with the copy's ``2 * bytes / time``. Target on GPU: >= 85% of the copy bandwidth.

Timing: ``benchmarks/common.py`` (interleaved rounds on CPU, ``do_bench`` medians on CUDA). On CUDA: bf16,
full sizes. Without CUDA: fp32, sizes divided by 8 (hidden by 16), one thread by default; CPU numbers say
nothing about GPU performance. Results: ``benchmarks/results/slp_<device>_<date>.json``.

Run ``PYTHONPATH=. python benchmarks/bench_slp.py --help`` for the options.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from monkey_kernels import slp_embed
from monkey_kernels.ops.backends import BACKENDS
from monkey_kernels.ops.slp.reference import SLPEmbeddingRef, SpatialLayoutProjector

# Run as a script (python benchmarks/bench_x.py) or imported as benchmarks.bench_x: common.py sits beside it.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_timer_args, bench_backends, make_result, report, result_path, time_methods,  # noqa: E402
                    timer_kwargs, timing_rows, write_result)

__all__ = ["main", "CaseSpec", "FULL_CASES", "TARGET_COPY_FRACTION"]

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


def validate_problem(p: Problem, dtype: torch.dtype, backend: Optional[str] = None) -> float:
    with torch.no_grad():
        expected, got = reference_forward(p).float(), fused_forward(p, backend=backend).float()
    error = (got - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)
    if not error <= TOLERANCES[dtype]:
        raise AssertionError(f"{p.case.name}: fused ({backend or p.backend}) differs from the reference by "
                             f"{error:.3g} (relative to max)")
    return error


def method_calls(p: Problem, backends: Sequence[str], mode: str, dtype: torch.dtype) -> Dict[str, Callable[[], None]]:
    """``{method: call}`` for one mode: ``copy`` (fwd only), ``reference``, then per backend the validating and
    the non-validating fused call (``fused*`` for the first backend, ``fused_<backend>*`` for the others)."""
    c = p.case
    calls: Dict[str, Callable[[], None]] = {}
    grad = torch.randn(c.batch, c.seq, c.hidden, device=p.table.device, dtype=dtype)
    trainable = [p.table, p.projector.proj.weight, p.projector.proj.bias]
    if mode == "fwd":
        src = torch.empty(c.batch * c.seq * c.hidden, device=p.table.device, dtype=dtype).normal_()
        dst = torch.empty_like(src)
        calls["copy"] = lambda: dst.copy_(src)
    variants = [("reference", reference_forward, {})]
    for i, backend in enumerate(backends):
        name = "fused" if i == 0 else f"fused_{backend}"
        variants += [(name, fused_forward, {"backend": backend}),
                     (f"{name}_novalidate", fused_forward, {"backend": backend, "validate": False})]
    for name, forward, kwargs in variants:
        if mode == "fwd":
            def call(forward=forward, kwargs=kwargs):
                with torch.no_grad():
                    forward(p, **kwargs)
        else:
            def call(forward=forward, kwargs=kwargs):
                for t in trainable:
                    t.grad = None
                forward(p, **kwargs).backward(grad)
        calls[name] = call
    return calls


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time the fused SLP embedding assembly against the reference.")
    parser.add_argument("--cases", nargs="+", choices=list(FULL_CASES), default=list(FULL_CASES))
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                        help="backends of the fused methods, the first being 'fused' (default: the device's "
                             "default backend, then the others that run there)")
    parser.add_argument("--modes", nargs="+", choices=["fwd", "fwd_bwd"], default=["fwd", "fwd_bwd"])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", dest="small", action="store_true", default=None,
                      help="sizes divided by 8 (hidden by 16), batch <= 2 (default on CPU)")
    size.add_argument("--full", dest="small", action="store_false", help="full sizes (default on CUDA)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: the first case, few rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/slp_<device>_<date>.json)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    add_timer_args(parser)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    on_cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    args.small = (not on_cuda) if args.small is None else args.small
    if args.quick:
        args.cases = args.cases[:1]
        if args.rounds is None:
            args.rounds = 1 if on_cuda else 3
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Runs the benchmark; writes the JSON, prints a markdown table and returns the result."""
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    on_cuda = device.type == "cuda"
    if not on_cuda and args.threads is None:
        args.threads = 1  # steadier timings on a shared machine; --threads overrides
    timer_kwargs(args)
    backends = bench_backends(device, args.backends)
    if not args.backends:
        if on_cuda and "native" not in backends:
            backends.append("native")  # the CUDA C++ kernel, when the extension was built with CUDA (else skipped)
    cases = [FULL_CASES[n].scaled_down() if args.small else FULL_CASES[n] for n in args.cases]
    torch.manual_seed(args.seed)
    rows: List[dict] = []
    errors: Dict[str, float] = {}
    skipped: Dict[str, str] = {}
    with tqdm(total=len(cases) * len(args.modes), desc="SLP bench", unit="run", disable=args.no_progress) as progress:
        for case in cases:
            problem = build_problem(case, dtype, device, backends[0])
            for backend in list(backends):
                try:
                    errors[f"{case.name}/{backend}"] = validate_problem(problem, dtype, backend)
                except (ValueError, RuntimeError, NotImplementedError) as error:
                    if backend == backends[0]:
                        raise
                    skipped[backend] = f"{type(error).__name__}: {error}"
                    backends.remove(backend)
            for mode in args.modes:
                progress.set_postfix_str(f"{case.name} {mode}")
                calls = method_calls(problem, backends, mode, dtype)
                timings = time_methods(calls, device, base="copy" if mode == "fwd" else "reference",
                                       **timer_kwargs(args))
                group = timing_rows(case.name, mode, timings, batch=case.batch, seq=case.seq, hidden=case.hidden,
                                    boxes=case.boxes, image_tokens=case.image_tokens)
                copy_gbps = None
                for row in group:
                    name = row["method"]
                    row["backend"] = None if name in ("copy", "reference") else (
                        backends[0] if name.startswith("fused_novalidate") or name == "fused"
                        else name[len("fused_"):].replace("_novalidate", ""))
                    moved = (2 * case.batch * case.seq * case.hidden * problem.table.element_size()
                             if name == "copy" else problem.fused_bytes())
                    if mode == "fwd":
                        row["gb_per_s"] = round(moved / (row["ms"] * 1e-3) / 1e9, 3)
                        if name == "copy":
                            copy_gbps = row["gb_per_s"]
                for row in group:
                    if mode == "fwd" and copy_gbps:
                        row["fraction_of_copy"] = round(row["gb_per_s"] / copy_gbps, 4)
                        if on_cuda and row["method"].endswith("_novalidate"):
                            row["target_met"] = row["fraction_of_copy"] >= TARGET_COPY_FRACTION
                rows.extend(group)
                progress.update(1)
            del problem
            if on_cuda:
                torch.cuda.empty_cache()
    config = dict(sizes="small" if args.small else "full", cases=[dict(c.__dict__) for c in cases], dtype=args.dtype,
                  backends=backends, seed=args.seed, timer=timer_kwargs(args),
                  bytes="fused: output + text/image source rows + boxes/page sizes + ids/kind/src; copy: 2 x output",
                  target_fraction_of_copy=TARGET_COPY_FRACTION)
    result = make_result("slp", device, rows, config=config, validation_rel_errors=errors, skipped_backends=skipped)
    out = write_result(result, args.out or result_path("slp", device))
    report(rows, ["case", "method", "mode", "ms", "ratio_to_base", "gb_per_s", "fraction_of_copy", "target_met"],
           out, f"SLP embedding assembly: {result['device']}, {result['threads']} threads, {args.dtype}, "
           f"fused = {backends[0]} backend, {'small' if args.small else 'full'} sizes",
           notes=[f"backends not measured: {skipped}"] if skipped else (), plot=not args.no_plot,
           title=f"SLP embedding: {result['device']}, {args.dtype}", ylabel="time / copy (fwd), / reference (fwd_bwd)")
    return result


if __name__ == "__main__":
    main()
