"""A batch of images of different grids through the Monkey encoder: the per-image reference loop against the
patched model's ONE fused pass (``MonkeyVisionModel.forward_views``).

Each image of the batch has its own grid, cycled from ``GRIDS`` (2x2, 3x2, 1x1, 4x3 and a 2x1, each with the
global view, a 1x1 image without), as ``MonkeyImageProcessor(resolution=None)`` or dynamic tiling gives them.
One model with ``lora_repeat_num = 12`` (the largest grid) serves them all.

Methods (inference, ``torch.no_grad``; and ``train_step``: LoRA + resampler trainable, ``loss = mean(f ** 2)``
over every image's features):

- ``reference``: ``forward_views`` of the reference model: one encoder pass per view, image by image;
- ``patched``: the same call on the patched model, the device's default backend (one pass over all views);
- ``patched_<backend>``: the other backends that run on the device.

Outputs of every patched model are checked against the reference before timing. Timing: the one harness
(``benchmarks/common.py``: interleaved rounds on CPU, CUDA-event / do_bench medians on a GPU). ``--quick``: batch 4
of the small config, 3 rounds. Run ``PYTHONPATH=. python benchmarks/bench_mixed_resolution.py --help``.
GPU target (benchmark, not a test): the fused pass >= 1.5x the per-image loop at batch 8.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from monkey_kernels.models import MonkeyVisionConfig, MonkeyVisionModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_timer_args, bench_backends, make_result, patched_copies, peak_memory_bytes,  # noqa: E402
                    report, result_path, time_methods, timer_kwargs, timing_rows, write_result)

__all__ = ["main", "GRIDS", "views_of"]

TARGET = 1.5  # GPU speed-up of the fused pass over the per-image loop at batch 8
GRIDS = [(2, 2), (3, 2), (1, 1), (4, 3), (2, 1)]  # (cols, rows) per image, cycled over the batch
SMALL_CONFIG = dict(tile_size=56, image_size=112, patch_size=14, width=64, layers=2, heads=4, mlp_ratio=4,
                    num_positions=16, n_queries=16, output_dim=64, resampler_heads=4, lora_repeat_num=12,
                    attn_lora_rank=16, mlp_lora_rank=32, lora_dropout=0.0)


def views_of(batch: int) -> (List[int], List[int]):
    """``(adapter_ids, views_per_image)`` of a batch: each image's tiles row-major, then its global view (-1);
    a 1x1 grid is a single view with adapter 0 and no global view (the tile is the whole image)."""
    ids, counts = [], []
    for image in range(batch):
        cols, rows = GRIDS[image % len(GRIDS)]
        tiles = list(range(cols * rows))
        own = tiles if len(tiles) == 1 else tiles + [-1]
        ids.extend(own)
        counts.append(len(own))
    return ids, counts


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Mixed-grid batch: per-image loop vs one fused encoder pass.")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="images per batch (default 4 8)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--small", action="store_true", help="the small config (default on CPU)")
    parser.add_argument("--quick", action="store_true", help="batch 4 only, 3 rounds")
    parser.add_argument("--backends", nargs="+", default=None, help="backends of the patched models")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-plot", action="store_true")
    add_timer_args(parser, rounds=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.batches = args.batches or [4]
        args.rounds = args.rounds or 3
    args.batches = args.batches or [4, 8]
    if any(b < 1 for b in args.batches):
        parser.error("--batches must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Runs the benchmark; writes the JSON, prints a markdown table and returns the result."""
    args = parse_args(argv)
    timer = timer_kwargs(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    small = args.small or device.type == "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    config = MonkeyVisionConfig(**SMALL_CONFIG) if small else MonkeyVisionConfig(lora_repeat_num=12)
    torch.manual_seed(0)
    reference = MonkeyVisionModel(config).to(device=device, dtype=dtype)
    for name, p in reference.named_parameters():
        p.requires_grad_("lora" in name or name.startswith("attn_pool"))
        if name.endswith("lora_b.weight"):
            torch.nn.init.normal_(p, std=0.02)  # a LoRA that changes the output (B starts at zero)
    backends = bench_backends(device, args.backends)
    patched, _ = patched_copies(reference, backends)
    models: Dict[str, torch.nn.Module] = {"reference": reference, **patched}

    rows: List[dict] = []
    errors: Dict[str, float] = {}
    for batch in args.batches:
        ids, counts = views_of(batch)
        pixels = torch.randn(len(ids), 3, config.tile_size, config.tile_size, device=device, dtype=dtype)
        case = f"batch{batch}_views{len(ids)}"
        for model in models.values():
            model.eval()
        with torch.no_grad():
            want = reference.forward_views(pixels, ids, counts)
            for name, model in models.items():
                if name != "reference":
                    got = model.forward_views(pixels, ids, counts)
                    errors[f"{case}/{name}"] = max(float(((g - w).float().norm() / w.float().norm()))
                                                   for g, w in zip(got, want))

        def inference(model):
            def run():
                with torch.no_grad():
                    model.forward_views(pixels, ids, counts)
            return run

        def train_step(model):
            params = [p for p in model.parameters() if p.requires_grad]

            def run():
                for p in params:
                    p.grad = None
                sum(f.float().square().mean() for f in model.forward_views(pixels, ids, counts)).backward()
            return run

        for mode, make in (("inference", inference), ("train_step", train_step)):
            for model in models.values():
                model.train(mode == "train_step")
            methods = {name: make(model) for name, model in models.items()}
            timings = time_methods(methods, device, base="reference", **timer)
            peaks = {name: peak_memory_bytes(fn, device) for name, fn in methods.items()}
            rows.extend(timing_rows(case, mode, timings, peaks, batch=batch, views=len(ids),
                                    grids=[GRIDS[i % len(GRIDS)] for i in range(batch)]))
    result = make_result("mixed_resolution", device, rows, backend=backends[0],
                         config=dict(small=small, dtype=str(dtype), grids=GRIDS, batches=args.batches,
                                     lora_repeat_num=config.lora_repeat_num, timer=timer),
                         rel_errors=errors, target=dict(speedup_at_batch8=TARGET, device="GPU"))
    out = write_result(result, args.out or result_path("mixed_resolution", device))
    report(rows, ["case", "mode", "method", "ms", "ratio_to_base", "peak_memory_bytes"], out,
           f"Mixed-grid batch through the Monkey encoder: {result['device']}, {result['threads']} threads, {dtype}",
           notes=[f"max relative difference to the reference: {max(errors.values()):.2e}"], plot=not args.no_plot,
           title=f"Mixed-grid batch: {result['device']}", ylabel="time / per-image loop")
    return result


if __name__ == "__main__":
    main()
