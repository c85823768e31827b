"""Benchmark (CPU): the native C++ multi-LoRA backend vs the pure-PyTorch backend vs the per-tile reference loop
vs PEFT's mixed batch, against the base ``F.linear`` alone.

Monkey-like shapes: 5 tiles of ``--tokens`` (1024) tokens (4 tiles with adapters 0..3 and the global view
without adapter, id -1), width ``K = N`` in ``--widths`` (256, 512, 1024), LoRA rank ``--rank`` (16), fp32,
``torch.get_num_threads()`` left as it is. Methods:

- ``base``: ``F.linear(x, W, b)`` alone (no LoRA: the lower bound and the ratio's denominator);
- ``native``: ``multi_lora_linear(..., backend="native")`` (csrc/multi_lora_cpu.cpp);
- ``torch``: ``multi_lora_linear(..., backend="torch")`` (vectorized PyTorch);
- ``loop``: the reference modules, an ``nn.Linear`` base plus per-adapter ``nn.Linear`` A/B pairs applied tile by
  tile in a Python loop (``multi_lora_linear_ref``-like);
- ``peft``: a PEFT ``LoraModel`` over the same ``nn.Linear`` with 4 adapters, called with ``adapter_names=`` (its
  masked loop over adapters). PEFT refuses ``adapter_names`` in training, so it has forward numbers only.

Modes: ``fwd`` (``torch.no_grad()``) and ``fwd_bwd`` (input and LoRA weights and scales trainable, base weight
frozen, ``out.backward(g)`` with a fixed ``g``). Timing: ``common.time_it`` medians, repeated in interleaved rounds
(every method once per round); ``ms`` is the best round's, and the ratio to ``base`` is the median over rounds of
the ratio within a round (paired: a shared 2-core machine drifts by +-10 % over seconds, all methods together). Each method's
output is first compared with a float64 reference (relative error in the JSON). CPU timings only: they say
nothing about a GPU. Results: ``benchmarks/results/native_cpu_<cpu>_<date>.json`` and a printed table.

Run ``PYTHONPATH=. python benchmarks/bench_native_cpu.py --help`` for the options.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_name, device_name, slug, time_it  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
METHODS = ("base", "native", "torch", "loop", "peft")
ADAPTER_IDS = [0, 1, 2, 3, -1]  # 4 tiles with their adapters + the global view without adapter
CPU = torch.device("cpu")


class Problem:
    """Weights and inputs of one width, shared by every method (the PEFT and loop modules hold copies)."""

    def __init__(self, width: int, tokens: int, rank: int, seed: int = 0):
        from monkey_kernels import SegmentInfo  # noqa: PLC0415

        g = torch.Generator().manual_seed(seed)
        num_adapters = max(ADAPTER_IDS) + 1
        self.width, self.tokens, self.rank = width, tokens, rank
        self.x = torch.randn(len(ADAPTER_IDS), tokens, width, generator=g)
        self.weight = torch.randn(width, width, generator=g) * width**-0.5
        self.bias = torch.randn(width, generator=g) * 0.1
        self.lora_a = torch.randn(num_adapters, rank, width, generator=g) * width**-0.5
        self.lora_b = torch.randn(num_adapters, width, rank, generator=g) * rank**-0.5
        self.scale = torch.rand(num_adapters, generator=g) + 0.5
        self.grad_out = torch.randn(len(ADAPTER_IDS), tokens, width, generator=g)
        self.segments = SegmentInfo.from_batch(ADAPTER_IDS, tokens)
        self.names = [f"tile{a}" if a >= 0 else "__base__" for a in ADAPTER_IDS]
        self.loop_modules = self._loop_modules()
        self.peft_model = self._peft_model()

    def _loop_modules(self):
        base = torch.nn.Linear(self.width, self.width)
        adapters = torch.nn.ModuleList()
        with torch.no_grad():
            base.weight.copy_(self.weight)
            base.bias.copy_(self.bias)
            for a in range(self.lora_a.shape[0]):
                down = torch.nn.Linear(self.width, self.rank, bias=False)
                up = torch.nn.Linear(self.rank, self.width, bias=False)
                down.weight.copy_(self.lora_a[a])
                up.weight.copy_(self.lora_b[a])
                adapters.append(torch.nn.Sequential(down, up))
        base.requires_grad_(False)
        return base, adapters, torch.nn.Parameter(self.scale.clone())

    def _peft_model(self):
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

        linear = torch.nn.Linear(self.width, self.width)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            linear.bias.copy_(self.bias)
        model = None
        for a in range(self.lora_a.shape[0]):
            # lora_alpha / r = scale[a]: PEFT's scaling is the same per-adapter factor
            config = LoraConfig(r=self.rank, lora_alpha=float(self.scale[a]) * self.rank, target_modules=["proj"],
                                lora_dropout=0.0, init_lora_weights=False)
            if model is None:
                model = get_peft_model(Wrapper(linear), config, adapter_name=f"tile{a}")
            else:
                model.add_adapter(f"tile{a}", config)
        with torch.no_grad():
            for a in range(self.lora_a.shape[0]):
                model.base_model.model.proj.lora_A[f"tile{a}"].weight.copy_(self.lora_a[a])
                model.base_model.model.proj.lora_B[f"tile{a}"].weight.copy_(self.lora_b[a])
        return model.eval()

    def reference(self) -> torch.Tensor:
        from monkey_kernels import multi_lora_linear_ref  # noqa: PLC0415

        d = torch.float64
        return multi_lora_linear_ref(self.x.to(d), self.weight.to(d), self.bias.to(d), self.lora_a.to(d),
                                     self.lora_b.to(d), self.scale.to(d), self.segments)


def forward_fn(method: str, p: Problem, x: torch.Tensor, lora_a, lora_b, scale) -> Callable[[], torch.Tensor]:
    from monkey_kernels import multi_lora_linear  # noqa: PLC0415

    if method == "base":
        return lambda: F.linear(x, p.weight, p.bias)
    if method in ("native", "torch"):
        return lambda: multi_lora_linear(x, p.weight, p.bias, lora_a, lora_b, scale, p.segments, backend=method)
    if method == "loop":
        base, adapters, loop_scale = p.loop_modules

        def loop():
            tiles = []
            for i, a in enumerate(ADAPTER_IDS):
                out = base(x[i])
                if a >= 0:
                    out = out + loop_scale[a] * adapters[a](x[i])
                tiles.append(out)
            return torch.stack(tiles)

        return loop
    if method == "peft":
        return lambda: p.peft_model(x, adapter_names=p.names)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def make_calls(method: str, p: Problem, mode: str) -> Optional[Callable[[], None]]:
    if method == "peft" and (p.peft_model is None or mode == "fwd_bwd"):
        return None
    if mode == "fwd":
        fn = forward_fn(method, p, p.x, p.lora_a, p.lora_b, p.scale)

        def call():
            with torch.no_grad():
                fn()

        return call
    x = p.x.clone().requires_grad_(True)
    lora_a, lora_b, scale = (t.clone().requires_grad_(True) for t in (p.lora_a, p.lora_b, p.scale))
    if method == "loop":
        p.loop_modules[1].requires_grad_(True)
    fn = forward_fn(method, p, x, lora_a, lora_b, scale)
    leaves = [x, lora_a, lora_b, scale, p.loop_modules[2]] + list(p.loop_modules[1].parameters())

    def call():
        for leaf in leaves:
            leaf.grad = None
        fn().backward(p.grad_out)

    return call


def validate(p: Problem, methods: Sequence[str]) -> Dict[str, float]:
    expected = p.reference()
    errors = {}
    for method in methods:
        if method == "base" or (method == "peft" and p.peft_model is None):
            continue
        with torch.no_grad():
            out = forward_fn(method, p, p.x, p.lora_a, p.lora_b, p.scale)()
        errors[method] = ((out.double() - expected).norm() / expected.norm()).item()
    return errors


def measure(p: Problem, methods: Sequence[str], mode: str, rounds: int, iters: int, progress):
    """``(ms, ratio)``: per method the best round's median (ms), and the median over rounds of its time divided
    by ``base``'s in the same round. The paired ratio is the one the targets are judged on: this shared machine's
    speed drifts by +-10 % over seconds, which shifts every method of a round together."""
    calls = {m: make_calls(m, p, mode) for m in methods}
    calls = {m: c for m, c in calls.items() if c is not None}
    samples = {m: [] for m in calls}
    for m, call in calls.items():  # warm-up (first-call allocations, the extension's lazy load)
        time_it(call, CPU, warmup=1, iters=1)
    for _ in range(rounds):
        for m, call in calls.items():
            samples[m].append(time_it(call, CPU, warmup=0, iters=iters) * 1e3)
        progress.update(1)
    ms = {m: min(v) for m, v in samples.items()}
    ratio = {}
    if "base" in samples:
        ratio = {m: statistics.median(t / b for t, b in zip(v, samples["base"])) for m, v in samples.items()}
    return ms, ratio


def markdown_table(results: dict) -> str:
    methods = results["methods"]
    lines = ["| width | mode | " + " | ".join(f"{m} ms (x base)" for m in methods) + " | native targets |",
             "|---" * (len(methods) + 3) + "|"]
    for row in results["results"]:
        cells = []
        for m in methods:
            ms, ratio = row["ms"].get(m), row["ratio_to_base"].get(m)
            cells.append("-" if ms is None else f"{ms:.2f} ({ratio:.2f}x)" if ratio is not None else f"{ms:.2f}")
        lines.append(f"| {row['width']} | {row['mode']} | " + " | ".join(cells) + f" | {row['targets']} |")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=None, help="default: 256 512 1024 (--quick: 256)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per tile (5 tiles)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds, best kept (default 15)")
    parser.add_argument("--iters", type=int, default=3, help="calls per method per round (median)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: width 256 and 2 rounds unless --widths / --rounds are given")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/native_cpu_<cpu>_<date>.json)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.widths is None:
        args.widths = [256] if args.quick else [256, 512, 1024]
    if args.rounds is None:
        args.rounds = 2 if args.quick else 15
    from monkey_kernels import _native  # noqa: PLC0415

    if "native" in args.methods and not _native.available():
        raise SystemExit(f"the native extension is unavailable: {_native.status()}")
    modes = ("fwd", "fwd_bwd")
    rows: List[dict] = []
    with tqdm(total=len(args.widths) * len(modes) * args.rounds, desc="native CPU bench", unit="round",
              disable=args.no_progress) as progress:
        for width in args.widths:
            p = Problem(width, args.tokens, args.rank)
            errors = validate(p, args.methods)
            for mode in modes:
                ms, ratio = measure(p, args.methods, mode, args.rounds, args.iters, progress)
                targets = "-"
                if "native" in ratio and "torch" in ratio:
                    ok_base = ratio["native"] <= 1.2
                    ok_torch = ratio["native"] <= ratio["torch"]
                    targets = (f"<=1.2x base: {'yes' if ok_base else 'NO'}; "
                               f"<= torch: {'yes' if ok_torch else 'NO'}")
                rows.append({"width": width, "mode": mode, "ms": ms, "rel_err_vs_fp64": errors,
                             "ratio_to_base": ratio,
                             "targets": targets})
    results = {
        "benchmark": "native_cpu",
        "device": device_name(CPU),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "native_extension": _native.status(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "shape": {"tiles": len(ADAPTER_IDS), "adapter_ids": ADAPTER_IDS, "tokens_per_tile": args.tokens,
                  "rank": args.rank, "dtype": "float32"},
        "timing": {"rounds": args.rounds, "iters_per_round": args.iters, "statistic": "ms: best round's median; ratio_to_base: median over rounds of "
                                 "(method / base in the same round)"},
        "methods": list(args.methods),
        "results": rows,
    }
    out = args.out or RESULTS_DIR / f"native_cpu_{slug(cpu_name())}_{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\n{results['device']}, {results['threads']} threads, torch {results['torch']}, "
          f"native: {results['native_extension']} (CPU timings)\n")
    print(markdown_table(results))
    print(f"\nwritten: {out}")
    return results


if __name__ == "__main__":
    main()
