"""End-to-end benchmark of Monkey's vision encoder: the reference per-tile loop vs the patched model.

For every (batch, resolution) case, on the same weights and inputs:

- ``inference``: ``model(pixel_values)`` under ``torch.no_grad()`` in eval mode; reported as images/s.
- ``train_step``: forward + backward + ``AdamW.step`` in train mode with the release's recipe (only the
  parameters whose name contains "lora" and the resampler ``attn_pool`` train; LoRA dropout 0.05 active);
  reported as ms per step and images/s.

Methods: ``reference`` (the release's loop: one ViT pass per tile with its adapter, then the global view),
``patched`` (``patch_model`` with the device's DEFAULT backend -- native on CPU when the extension loads,
triton on CUDA: one batched ViT pass over every view, fused multi-LoRA linears) and ``patched_<backend>`` for
each other backend that runs on the device. With ``--cuda-graph`` (CUDA only), ``patched+graph`` times the
patched inference forward replayed from a CUDA graph (``monkey_kernels.cuda_graphs.capture_forward``;
inference only). Timing: ``benchmarks/common.py`` (interleaved rounds, the ratio being the median per-round
``method / reference``, so ``1 / ratio_to_base`` is the speed-up); rows carry images/s, peak memory (CUDA)
and the relative difference of each patched output to the reference one (eval mode, same inputs). Targets
(GPU, ``patched``): inference >= 2x and train step >= 1.5x faster than the reference at no more memory; on
CPU: never slower.

With ``--amp bf16`` / ``--amp fp16`` the weights stay fp32 (the master weights of an AMP run) and every forward of
every method runs under ``torch.autocast(device, dtype)`` -- what the HF ``Trainer`` with ``bf16=True`` /
``fp16=True`` does; the fp16 train step goes through ``torch.amp.GradScaler`` like the Trainer's. Both sides get
the same autocast, so the ratio is patched-under-AMP vs reference-under-AMP.

On CUDA: the release config (width 1664, 48 layers; ``lora_repeat_num`` raised to 6 so 1344x896 = 3x2 tiles
fits), bf16, batches 1, 4, 8, resolutions 896x896 and 1344x896, the
``triton`` backend. Without CUDA: a small config (fp32) with the same tile grids; CPU numbers say nothing
about GPU performance. Results go to ``benchmarks/results/monkey_encoder_<device>_<date>.json``.

Run ``PYTHONPATH=. python benchmarks/bench_monkey_encoder.py --help`` for the options.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from monkey_kernels.cuda_graphs import capture_forward
from monkey_kernels.models import MonkeyVisionConfig, MonkeyVisionModel, tile_grid
from monkey_kernels.ops.backends import BACKENDS

# Run as a script (python benchmarks/bench_x.py) or imported as benchmarks.bench_x: common.py sits beside it.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_amp_arg, add_timer_args, autocast_context, bench_backends, make_result,  # noqa: E402
                    patched_copies, peak_memory_bytes, report, result_path, time_methods, timer_kwargs, timing_rows,
                    write_result)

TARGETS = {"inference": 2.0, "train_step": 1.5}  # GPU speed-ups of ``patched`` over ``reference``
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (width, height) requested resolutions, in units of the release's 448 px tile.
RESOLUTIONS = {"896x896": (2, 2), "1344x896": (3, 2)}

SMALL_CONFIG = dict(tile_size=112, image_size=224, patch_size=14, width=128, layers=4, heads=4, mlp_ratio=4,
                    num_positions=16, n_queries=16, output_dim=128, resampler_heads=4, lora_repeat_num=6,
                    attn_lora_rank=16, mlp_lora_rank=32, lora_dropout=0.05)


def build_config(small: bool, layers: Optional[int] = None) -> MonkeyVisionConfig:
    """The small config or the release's shapes (6 adapters for 3x2 tiles); ``layers`` overrides the depth."""
    overrides = {} if layers is None else {"layers": layers}
    if small:
        return MonkeyVisionConfig(**{**SMALL_CONFIG, **overrides})
    return MonkeyVisionConfig(lora_repeat_num=6, **overrides)


def release_trainable_(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_("lora" in name or name.startswith("attn_pool"))


def run_case(models: Dict[str, torch.nn.Module], initial_state, config, batch: int, resolution: str, device,
             dtype, args) -> List[dict]:
    """Rows of one (resolution, batch): inference and train step of every model, timed interleaved."""
    amp = getattr(args, "amp", None)
    for model in models.values():  # train steps of earlier cases moved the weights: start equal again
        model.load_state_dict(initial_state)
    cols, rows = RESOLUTIONS[resolution]
    grid = tile_grid(cols * config.tile_size, rows * config.tile_size, config)
    pixel_values = torch.randn(batch, grid.num_views, config.num_channels, config.tile_size, config.tile_size,
                               device=device, dtype=dtype)
    rel_diff = {}
    with torch.no_grad():
        for model in models.values():
            model.eval()
        with autocast_context(device, amp):
            expected = models["reference"](pixel_values).float()
            for name, model in models.items():
                if name != "reference":
                    rel_diff[name] = ((model(pixel_values).float() - expected).norm() / expected.norm()).item()
    case = f"{resolution} b{batch}"  # in the release's 448 px tiles (the small config's tiles are smaller)
    extra = dict(batch=batch, tiles=grid.num_tiles, views=grid.num_views, image_tokens=grid.num_image_tokens)
    out: List[dict] = []

    def infer_call(model):
        def call():
            with torch.no_grad(), autocast_context(device, amp):
                model(pixel_values)
        return call

    infer = {name: infer_call(model) for name, model in models.items()}
    if args.cuda_graph:
        infer["patched+graph"] = lambda graphed=capture_forward(models["patched"], pixel_values,
                                                                warmup=max(args.warmup, 1)): graphed(pixel_values)
    out += _timed_rows(case, "inference", infer, device, args, extra, batch)

    steps = {}
    for name, model in models.items():
        model.train()
        if args.checkpointing:
            model.activation_checkpointing_enable()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

        def step(model=model, optimizer=optimizer, scaler=scaler):
            optimizer.zero_grad(set_to_none=True)
            with autocast_context(device, amp):
                loss = model(pixel_values).float().square().mean()
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()

        steps[name] = step
    out += _timed_rows(case, "train_step", steps, device, args, extra, batch)
    for model in models.values():
        if args.checkpointing:
            model.activation_checkpointing_disable()
        model.zero_grad(set_to_none=True)
    for row in out:
        row["rel_diff_to_reference"] = rel_diff.get(row["method"].replace("+graph", ""))
    return out


def _timed_rows(case, mode, calls, device, args, extra, batch) -> List[dict]:
    try:
        timings = time_methods(calls, device, base="reference", **timer_kwargs(args))
        peaks = {name: peak_memory_bytes(call, device) for name, call in calls.items()} if device.type == "cuda" else None
    except torch.cuda.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return [dict(case=case, method=name, mode=mode, ms=None, ratio_to_base=None, peak_memory_bytes=None,
                     note="out of memory", **extra) for name in calls]
    rows = timing_rows(case, mode, timings, peaks, **extra)
    reference_peak = (peaks or {}).get("reference")
    for row in rows:
        row["images_per_s"] = round(batch / (row["ms"] * 1e-3), 3)
        row["speedup"] = None if not row["ratio_to_base"] else round(1.0 / row["ratio_to_base"], 3)
        if row["method"].startswith("patched") and row["speedup"] is not None:
            goal = TARGETS[mode] if device.type == "cuda" else 1.0
            row["target"] = f">= {goal}x faster" + (" at no more memory" if device.type == "cuda" else "")
            row["target_met"] = row["speedup"] >= goal and (
                reference_peak is None or row["peak_memory_bytes"] is None or row["peak_memory_bytes"] <= reference_peak)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="small config (forced without CUDA)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 4 8 (CUDA), 1 2 (CPU)")
    parser.add_argument("--resolutions", nargs="+", choices=list(RESOLUTIONS), default=None,
                        help="default: all (--quick: 896x896)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                        help="backends of the patched models, the first being 'patched' (default: the device's "
                             "default backend, then the others that run there)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the train step")
    parser.add_argument("--layers", type=int, default=None,
                        help="encoder depth (default: the config's, 48 for the release); the per-layer work is the "
                             "release's at any depth, so a shallower model times the same layers in less setup")
    add_amp_arg(parser, "weights", note="fp16 trains through GradScaler")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time the patched inference replayed from a CUDA graph (CUDA only)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 896x896, batch 1, few rounds")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default under benchmarks/results/)")
    parser.add_argument("--no-plot", action="store_true")
    add_timer_args(parser, warmup=1)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if args.cuda_graph and not on_cuda:
        parser.error("--cuda-graph needs a CUDA device")
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be at least 1, got {args.layers}")
    args.small_config = args.small or not on_cuda
    if args.amp is not None and args.dtype not in (None, "fp32"):
        parser.error("--amp keeps fp32 weights (the master weights of mixed precision): drop --dtype or pass fp32")
    if args.amp is not None and args.cuda_graph:
        parser.error("--cuda-graph times a captured plain forward; it does not combine with --amp")
    dtype = DTYPES[args.dtype or ("fp32" if args.amp is not None or not on_cuda else "bf16")]
    batches = args.batches or ([1] if args.quick else [1, 4, 8] if on_cuda else [1, 2])
    resolutions = args.resolutions or (["896x896"] if args.quick else list(RESOLUTIONS))
    if args.rounds is None:
        args.rounds = (1 if on_cuda else 3) if args.quick else (3 if on_cuda else 7)
    backends = bench_backends(device, args.backends)

    config = build_config(args.small_config, args.layers)
    torch.manual_seed(0)
    reference = MonkeyVisionModel(config)
    with torch.no_grad():  # non-zero adapters so the LoRA terms do work
        for name, p in reference.named_parameters():
            if name.endswith("lora_b.weight"):
                p.normal_(0.0, 0.02)
    release_trainable_(reference)
    reference = reference.to(device=device, dtype=dtype)
    patched, reports = patched_copies(reference, backends)
    models: Dict[str, torch.nn.Module] = {"reference": reference, **patched}
    initial_state = {k: v.detach().to("cpu", copy=True) for k, v in reference.state_dict().items()}

    rows: List[dict] = []
    cases = [(b, r) for r in resolutions for b in batches]
    for batch, resolution in tqdm(cases, desc="monkey encoder"):
        for row in run_case(models, initial_state, config, batch, resolution, device, dtype, args):
            row["resolution"] = resolution
            row["backend"] = None if row["method"] == "reference" else (
                backends[0] if row["method"].startswith("patched") and not row["method"].startswith("patched_")
                else row["method"][len("patched_"):])
            rows.append(row)

    run_config = dict(model={k: getattr(config, k) for k in SMALL_CONFIG}, small_config=args.small_config,
                      dtype=str(dtype).replace("torch.", ""), backends=backends, batches=batches,
                      resolutions=resolutions, checkpointing=args.checkpointing, cuda_graph=args.cuda_graph,
                      amp=args.amp,
                      timer=timer_kwargs(args), targets=TARGETS if on_cuda else "patched never slower",
                      trainable="lora* and attn_pool*, AdamW lr 1e-5")
    result = make_result("monkey_encoder", device, rows, config=run_config, patch_reports=reports)
    name = "monkey_encoder" if args.amp is None else f"monkey_encoder_amp-{args.amp}"
    out = write_result(result, args.out or result_path(name, device))
    report(rows, ["case", "method", "mode", "ms", "speedup", "images_per_s", "peak_memory_bytes",
                  "rel_diff_to_reference", "target_met"], out,
           f"Monkey encoder: {result['device']}, {result['threads']} threads, {run_config['dtype']}"
           f"{'' if args.amp is None else f' weights under {args.amp} autocast'}, "
           f"patched = {backends[0]} backend, {'small config' if args.small_config else 'release config'}",
           plot=not args.no_plot, value="speedup", title=f"Monkey encoder: {result['device']}",
           ylabel="speed-up over the reference (higher is better)")
    return result


if __name__ == "__main__":
    main()
