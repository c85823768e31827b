"""Throughput of ``MonkeyImageProcessor`` (images/s) against a naive per-image loop.

Cases (a batch of decoded images, uint8 ``[3, H, W]`` as a JPEG decoder gives them, mixed sizes with repeats):

- ``monkey_1344x896``: ``tiling="monkey", resolution=(1344, 896)``: 6 tiles + the global view per image.
- ``monkey_own_size``: ``tiling="monkey", resolution=None``: each image's own grid (a mixed-grid batch).
- ``dynamic_budget``: ``tiling="dynamic", max_tiles=12`` with LLaMA-Factory's ``image_max_pixels=768*768``.

Methods, on the same images (all produce the same ``pixel_values``, checked before timing):

- ``naive_loop``: per image, what a hand-written transform does: one ``F.interpolate`` per resize (the same
  uint8 kernel), normalise, crop the tiles one by one in Python, stack (the reference; ratios are to it).
- ``processor_per_image``: ``processor(image)`` once per image (the processor without batching).
- ``processor``: one ``processor(images)`` call: resizes batched over images of equal source and target size,
  tiles written by one strided copy per image, one normalisation pass over all views.

Rows carry ``images_per_s`` (batch / time). ``--quick``: 8 images at a quarter of the sizes (tile 112).
Timing: ``benchmarks/common.py`` (interleaved rounds, paired ratios); one thread by default on CPU.
Run ``PYTHONPATH=. python benchmarks/bench_processor.py --help``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from monkey_kernels.processing import MonkeyImageProcessor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_timer_args, make_result, report, result_path, time_methods, timer_kwargs,  # noqa: E402
                    timing_rows, write_result)

__all__ = ["main", "CASES", "naive_pixel_values"]

# (width, height) of the images of a batch; cycled to the batch size (repeats batch together).
IMAGE_SIZES = [(1544, 896), (1344, 896), (896, 896), (640, 480), (1024, 768), (800, 1200), (1544, 896), (640, 480)]
CASES: Dict[str, dict] = {
    "monkey_1344x896": dict(tiling="monkey", resolution=(1344, 896)),
    "monkey_own_size": dict(tiling="monkey", resolution=None),
    "dynamic_budget": dict(tiling="dynamic", max_tiles=12, image_max_pixels=768 * 768),
}


def naive_pixel_values(processor: MonkeyImageProcessor, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """The per-image loop (same rules and the same uint8 resize kernel as the processor, so equal outputs):
    one image at a time, one ``F.interpolate`` per resize, tiles cropped one by one in Python."""
    tile = processor.tile_size
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)

    def resize_u8(x, height, width):  # PIL-like bicubic on 8-bit data
        if tuple(x.shape[-2:]) == (height, width):
            return x
        return F.interpolate(x[None], size=(height, width), mode="bicubic", antialias=True)[0]

    views = []
    for image in images:
        layout = processor.layout(image.shape[2], image.shape[1])
        x = resize_u8(image, layout.budget_height, layout.budget_width)
        width, height = layout.resized_size
        big = (resize_u8(x, height, width).float() / 255 - mean) / std
        for r in range(layout.rows):
            for c in range(layout.cols):
                views.append(big[:, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile])
        if layout.has_global_view:
            if processor.tiling == "monkey":
                views.append(F.interpolate(big[None], size=(tile, tile), mode="bicubic")[0])
            else:
                views.append((resize_u8(x, tile, tile).float() / 255 - mean) / std)
    return torch.stack(views)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Image-processor throughput against a naive per-image loop.")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--batch", type=int, default=16, help="images per call (default 16; --quick: 8)")
    parser.add_argument("--quick", action="store_true", help="8 images at a quarter of the sizes, tile 112")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/processor_<device>_<date>.json)")
    parser.add_argument("--no-plot", action="store_true")
    add_timer_args(parser, rounds=None)
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    if args.quick:
        args.batch = min(args.batch, 8)
        if args.rounds is None:
            args.rounds = 3
    if args.threads is None:
        args.threads = 1  # steadier timings on a shared machine; --threads overrides
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Runs the benchmark; writes the JSON, prints a markdown table and returns the result."""
    args = parse_args(argv)
    timer = timer_kwargs(args)
    device = torch.device("cpu")  # preprocessing runs in the data loader, on the CPU
    scale = 4 if args.quick else 1
    tile = 448 // scale
    torch.manual_seed(args.seed)
    sizes = [IMAGE_SIZES[i % len(IMAGE_SIZES)] for i in range(args.batch)]
    images = [torch.randint(0, 256, (3, h // scale, w // scale), dtype=torch.uint8) for (w, h) in sizes]
    rows: List[dict] = []
    max_errors: Dict[str, float] = {}
    for name in args.cases:
        options = dict(CASES[name])
        if options.get("resolution"):
            options["resolution"] = tuple(side // scale for side in options["resolution"])
        if options.get("image_max_pixels"):
            options["image_max_pixels"] //= scale * scale
        processor = MonkeyImageProcessor(tile_size=tile, **options)
        batched = processor(images)["pixel_values"]
        naive = naive_pixel_values(processor, images)
        # The same views and values (same kernels; only float rounding of the normalisation may differ).
        if batched.shape != naive.shape:
            raise RuntimeError(f"{name}: processor gives {tuple(batched.shape)}, the loop {tuple(naive.shape)}")
        max_errors[name] = float((batched - naive).abs().max())
        if max_errors[name] > 1e-4:
            raise RuntimeError(f"{name}: processor and loop differ by {max_errors[name]:.3g}")
        methods = {
            "naive_loop": lambda: naive_pixel_values(processor, images),
            "processor_per_image": lambda: [processor(image) for image in images],
            "processor": lambda: processor(images),
        }
        timings = time_methods(methods, device, base="naive_loop", **timer)
        group = timing_rows(name, "preprocess", timings, batch=len(images), views=int(batched.shape[0]))
        for row in group:
            row["images_per_s"] = round(len(images) / (row["ms"] * 1e-3), 2)
        rows.extend(group)
    config = dict(batch=len(images), image_sizes=[(w // scale, h // scale) for (w, h) in sizes], tile_size=tile,
                  cases={n: CASES[n] for n in args.cases}, scale=scale, seed=args.seed, timer=timer,
                  input="uint8 [3, H, W] tensors")
    result = make_result("processor", device, rows, backend="torch", config=config,
                         max_abs_diff=max_errors)
    out = write_result(result, args.out or result_path("processor", device))
    report(rows, ["case", "method", "ms", "ratio_to_base", "images_per_s", "views"], out,
           f"Image processor: {result['device']}, {result['threads']} threads, batch {len(images)}, tile {tile}",
           notes=[f"max |processor - loop| (normalised units): {max_errors}"], plot=not args.no_plot,
           title=f"Image processor: {result['device']}", ylabel="time / naive per-image loop")
    return result


if __name__ == "__main__":
    main()
