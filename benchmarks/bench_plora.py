"""Benchmark: InternLM-XComposer's Partial LoRA (PLoRA) on one InternLM2 decoder layer's five linears, the
reference gather/scatter forward vs the fused segmented pass (``patch_model``), against the plain linears.

The five linears of a layer, chained as in the layer (attention and norms left out, they are not what PLoRA
changes): ``qkv = wqkv(x)``, ``h = x + wo(qkv[..., :hidden])`` (the query part stands in for the attention
output), ``out = h + w2(silu(w1(h)) * w3(h))``, every linear called as ``layer(input, im_mask)``. Each case is one
sequence of ``images`` image spans of ``image_tokens`` tokens with text between them (128 tokens before the
first, 64 between two, 256 after the last).

Methods (same weights, same input):

- ``base``: the five linears as plain ``F.linear`` (no LoRA): the roofline's base GEMM time.
- ``reference``: the public PLoRA forward (the IXC-2.5 form): ``res = linear(x)``, then, if ``im_mask.sum() > 0``
  (a host sync), ``res[im_mask] += Plora_B(Plora_A(x[im_mask])) * scaling``: a boolean gather, two GEMMs and an
  index_put per linear.
- ``fused``: the same modules after ``patch_model`` (the device's default backend: triton on CUDA, native on CPU):
  one segmented multi-LoRA op per linear, image runs adapter 0, text runs base only, the ``SegmentInfo`` built
  once per mask; ``fused_<backend>``: the other backends that run on the device.

Modes: ``fwd`` (eval, no grad) and ``fwd_bwd`` (train mode, dropout 0, base weights frozen, ``Plora_A`` /
``Plora_B`` trainable and the input requiring grad: the PLoRA training stage; ``loss = out.float().square().mean()``;
its base is the plain linears' forward + ``dX``).

Reported per row: ms, ratio to ``base``, speed-up over ``reference``, and the roofline ratio of the issue:
``fused ms / (base ms * (1 + LoRA FLOPs / base FLOPs))`` (LoRA FLOPs: ``2 n_img r (K + N)`` per linear forward,
three times that for forward + backward (``H``; ``dX``'s LoRA term; ``dA``, ``dB``); base FLOPs ``2 M K N`` per
linear forward, twice that with ``dX``). Target on a GPU: ``roofline_ratio <= 1.05`` and faster than
``reference``.

Shapes: on CUDA (or with ``--release``) the released InternLM2-7B layer (hidden 4096, ``wqkv`` 4096 -> 6144, FFN
14336, PLoRA rank 256, 1225 tokens per image, bf16); on CPU by default every width / 8 (hidden 512, ``wqkv``
512 -> 768, FFN 1792, rank 32, 153 tokens per image, fp32): CPU numbers say nothing about a GPU.
Results go to ``benchmarks/results/plora_<device>_<date>.json`` (+ ``.png``).

``PYTHONPATH=. python benchmarks/bench_plora.py --help`` for the options.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monkey_kernels.ops.backends import BACKENDS

_HERE = os.path.dirname(os.path.abspath(__file__))
# Run as a script (python benchmarks/bench_x.py) or imported as benchmarks.bench_x: common.py sits beside it,
# the structural double of the public PLoRA code in tests/helpers/.
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tests"))
from common import (add_timer_args, bench_backends, make_result, patched_copies, peak_memory_bytes,  # noqa: E402
                    report, result_path, time_methods, timer_kwargs, timing_rows, write_result)
from helpers.internlm2_plora_double import PLoRA  # noqa: E402

RELEASE = dict(hidden=4096, qkv=6144, ffn=14336, rank=256, image_tokens=1225)
CPU_SHAPES = dict(hidden=512, qkv=768, ffn=1792, rank=32, image_tokens=153)
TEXT_BEFORE, TEXT_BETWEEN, TEXT_AFTER = 128, 64, 256
LINEARS = ("wqkv", "wo", "w1", "w3", "w2")


def reference_plora(fan_in: int, fan_out: int, rank: int) -> nn.Module:
    """The public PLoRA (IXC-2.5 form, the structural double of ``tests/helpers/internlm2_plora_double.py``),
    no bias, scale 1, dropout 0: a linear plus, on the ``im_mask`` rows, ``B(A(x)) * scaling``. The public class
    leaves its base weight to the checkpoint load; here it gets ``nn.Linear``'s default init."""
    layer = PLoRA(fan_in, fan_out, bias=False, lora_r=rank, lora_alpha=rank, lora_dropout=0.0)
    nn.Linear.reset_parameters(layer)
    return layer


class FiveLinears(nn.Module):
    """One InternLM2 layer's five PLoRA linears, chained as in the layer (see the module docstring)."""

    def __init__(self, hidden: int, qkv: int, ffn: int, rank: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.wqkv = reference_plora(hidden, qkv, rank)
        self.wo = reference_plora(hidden, hidden, rank)
        self.w1 = reference_plora(hidden, ffn, rank)
        self.w3 = reference_plora(hidden, ffn, rank)
        self.w2 = reference_plora(ffn, hidden, rank)

    def forward(self, x, im_mask):
        qkv = self.wqkv(x, im_mask)
        h = x + self.wo(qkv[..., :self.hidden].contiguous(), im_mask)
        return h + self.w2(F.silu(self.w1(h, im_mask)) * self.w3(h, im_mask), im_mask)


class PlainLinears(nn.Module):
    """The same chain with plain linears (the base weights of ``FiveLinears``, no LoRA)."""

    def __init__(self, source: FiveLinears) -> None:
        super().__init__()
        self.hidden = source.hidden
        for name in LINEARS:
            layer = getattr(source, name)
            plain = nn.Linear(layer.in_features, layer.out_features, bias=False)
            plain.weight = nn.Parameter(layer.weight.detach().clone())
            setattr(self, name, plain)

    def forward(self, x, im_mask=None):
        qkv = self.wqkv(x)
        h = x + self.wo(qkv[..., :self.hidden].contiguous())
        return h + self.w2(F.silu(self.w1(h)) * self.w3(h))


def sequence_mask(images: int, image_tokens: int, device) -> torch.Tensor:
    """bool ``[1, M]``: text 128, then ``images`` x (image, text 64), the last text 256."""
    pieces = [torch.zeros(TEXT_BEFORE, dtype=torch.bool)]
    for i in range(images):
        pieces.append(torch.ones(image_tokens, dtype=torch.bool))
        pieces.append(torch.zeros(TEXT_AFTER if i == images - 1 else TEXT_BETWEEN, dtype=torch.bool))
    return torch.cat(pieces)[None].to(device)


def flop_counts(shapes: Dict, rows: int, image_rows: int) -> Dict[str, Dict[str, float]]:
    """``{mode: {"base": flops, "lora": flops}}`` of the five linears (see the module docstring)."""
    h, q, f, r = shapes["hidden"], shapes["qkv"], shapes["ffn"], shapes["rank"]
    dims = [(h, q), (h, h), (h, f), (h, f), (f, h)]
    base = sum(2.0 * rows * k * n for k, n in dims)
    lora = sum(2.0 * image_rows * r * (k + n) for k, n in dims)
    return {"fwd": {"base": base, "lora": lora}, "fwd_bwd": {"base": 2 * base, "lora": 3 * lora}}


def build(shapes: Dict, device, dtype) -> FiveLinears:
    torch.manual_seed(0)
    model = FiveLinears(shapes["hidden"], shapes["qkv"], shapes["ffn"], shapes["rank"])
    with torch.no_grad():
        for name in LINEARS:
            layer = getattr(model, name)
            nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
            nn.init.normal_(layer.Plora_A.weight, std=layer.in_features ** -0.5)
            nn.init.normal_(layer.Plora_B.weight, std=0.5 * shapes["rank"] ** -0.5)  # non-zero: a real LoRA term
    model.to(device=device, dtype=dtype)
    for name, p in model.named_parameters():
        p.requires_grad_("Plora_" in name)  # the PLoRA training stage: base frozen
    return model


def run_case(images: int, shapes: Dict, device, dtype, backends: Sequence[str], args) -> List[Dict]:
    reference = build(shapes, device, dtype)
    base = PlainLinears(reference).to(device=device, dtype=dtype).requires_grad_(False)
    fused, patch_reports = patched_copies(reference, backends)
    fused = {name.replace("patched", "fused"): model for name, model in fused.items()}
    mask = sequence_mask(images, shapes["image_tokens"], device)
    rows, image_rows = mask.shape[1], int(mask.sum())
    x = torch.randn(1, rows, shapes["hidden"], device=device, dtype=dtype)
    models = {"base": base, "reference": reference, **fused}

    rel_diff = {}
    with torch.no_grad():
        expected = reference(x, mask).float()
        for name, model in fused.items():
            got = model(x, mask).float()
            rel_diff[name] = ((got - expected).norm() / expected.norm()).item()

    def forward(name: str) -> Callable[[], None]:
        model = models[name]

        def fn():
            with torch.no_grad():
                model(x, mask)
        return fn

    def forward_backward(name: str) -> Callable[[], None]:
        model = models[name]

        def fn():
            xg = x.detach().requires_grad_(True)
            model.zero_grad(set_to_none=True)
            model(xg, mask).float().square().mean().backward()
        return fn

    flops = flop_counts(shapes, rows, image_rows)
    case = f"{images} img, {rows} tok"
    results = []
    for mode, make in (("fwd", forward), ("fwd_bwd", forward_backward)):
        for model in models.values():
            model.train(mode == "fwd_bwd")
        calls = {name: make(name) for name in models}
        gc.collect()
        timings = time_methods(calls, device, base="base", **timer_kwargs(args))
        peaks = {n: peak_memory_bytes(c, device) for n, c in calls.items()} if device.type == "cuda" else None
        lora_share = flops[mode]["lora"] / flops[mode]["base"]
        reference_ms = timings["reference"].ms
        for row in timing_rows(case, mode, timings, peaks, images=images, tokens=rows, image_tokens=image_rows):
            row["speedup_vs_reference"] = round(reference_ms / row["ms"], 3) if row["ms"] else None
            if row["method"].startswith("fused"):
                row["rel_diff_vs_reference"] = rel_diff[row["method"]]
                row["roofline_ratio"] = round(row["ratio_to_base"] / (1.0 + lora_share), 3)
                row["lora_flops_share"] = round(lora_share, 4)
                row["target_met"] = row["roofline_ratio"] <= 1.05 and row["speedup_vs_reference"] > 1.0
                row["patch_report"] = patch_reports[row["method"].replace("fused", "patched")]
            results.append(row)
    return results


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=None, help="image spans per case (default 1 2 4)")
    parser.add_argument("--release", action="store_true",
                        help="the released shapes (hidden 4096, rank 256, 1225 tokens per image) on any device "
                             "(the default on CUDA)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                        help="backends of the fused copies, the first being 'fused' (default: the device's "
                             "default backend, then the others that run there)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one case, few rounds")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    parser.add_argument("--no-plot", action="store_true")
    add_timer_args(parser)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shapes = dict(RELEASE if (cuda or args.release) else CPU_SHAPES)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if cuda else "fp32")]
    images = args.images or ([2] if args.quick else [1, 2, 4])
    if args.rounds is None:
        args.rounds = (1 if cuda else 3) if args.quick else (3 if cuda else 9)
    backends = bench_backends(device, args.backends)

    rows = []
    for count in images:
        rows.extend(run_case(count, shapes, device, dtype, backends, args))
    config = dict(shapes=shapes, linears=list(LINEARS), images=images, text_tokens=[TEXT_BEFORE, TEXT_BETWEEN,
                  TEXT_AFTER], dtype=str(dtype).replace("torch.", ""), backends=backends, timer=timer_kwargs(args),
                  base_method="base", training="base frozen, Plora_A / Plora_B and the input trainable, dropout 0")
    result = make_result("plora", device, rows, config=config)
    out = write_result(result, args.out or result_path("plora", device))
    shape_note = "release shapes" if shapes == RELEASE else "every width / 8"
    report(rows, ["case", "method", "mode", "ms", "ratio_to_base", "speedup_vs_reference", "roofline_ratio",
                  "peak_memory_bytes", "rel_diff_vs_reference", "target_met"], out,
           f"PLoRA, one InternLM2 layer's five linears: {result['device']}, {result['threads']} threads, "
           f"{config['dtype']}, {shape_note}, fused = {backends[0]} backend",
           plot=not args.no_plot, value="ratio_to_base", title=f"PLoRA five linears: {result['device']}",
           ylabel="time / plain linears (lower is better)")
    return result


if __name__ == "__main__":
    main()
