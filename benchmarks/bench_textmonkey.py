"""End-to-end benchmark of TextMonkey's vision encoder: the public per-layer window loop vs the TextMonkey rules.

The model is the structural double of the public code (``tests/helpers/textmonkey_double.py``: at the release's
sizes it matches the public ``VisionTransformer`` bit for bit), random weights with non-zero adapters, cross-window
MLP and Perceiver output. Each case calls ``visual.encode(None, lora_idx, input_image=images)`` on whole images:
the windows (with the cross-window attention before the ``window_pos`` blocks), the token filter + Perceiver,
and the global view.

Modes, on the same weights and inputs:

- ``inference``: ``encode`` under ``torch.no_grad()`` in eval mode; reported as images/s.
- ``train_step``: ``encode`` + a loss + backward + ``AdamW.step`` in train mode with the release's recipe
  (``fix_vit``: the adapters, the cross-window attention, ``attn_pool``, ``ln_post``, ``proj`` and the Perceiver
  train; the ViT's base weights are frozen; LoRA dropout 0.05 and the cross-window MLP's 0.05 active).

Adapter modes (one model per resolution, ``lora_repeat_num`` = its window count): ``none`` -- ``lora_idx=None``,
what the release recipe runs (``lora_repeat_num=0``: no adapter anywhere) -- and ``per_window`` --
``lora_idx=lora_repeat_num``, window ``k`` with adapter ``k``.

Methods: ``reference`` (the double as the public code runs it: 48 blocks x windows calls for the windows, then a
second pass for the global views), ``patched`` (``patch_model`` with the device's DEFAULT backend -- native on
CPU when the extension loads, triton on CUDA: ONE fused block call per layer over every window and global view)
and ``patched_<backend>`` for each other backend that runs there (``--release``: the default backend only unless
``--backends``). Timing: ``benchmarks/common.py`` (interleaved rounds, ``speedup`` = 1 / the median per-round
ratio to ``reference``); rows carry images/s, peak memory (CUDA), the relative difference of each patched
inference output to the reference's, and the block calls per ``encode`` (counted with hooks).

``--release`` (CUDA only): the release's shapes -- width 1664, 48 layers, 16 heads, MLP 8192, 448 px windows,
cross-window attention before blocks 2, 6, 24, 46, 256 queries, output 4096, the token filter keeping 512 tokens,
the global view -- at 896x896 (2x2 windows) and 1344x1344 (3x3), bf16, batches 1 and 2. Without it: a small
config (fp32; 112 px windows of 8x8 patches, width 128, 4 layers, the release's 12-token Swin window on a 16x16 /
24x24 patch grid) with the same window grids; one thread unless ``--threads``. CPU numbers say nothing about GPU
performance. Results: ``benchmarks/results/textmonkey_<device>_<date>.json`` (+ ``.png``); a case is named by its window grid
(``2x2`` = 896x896, ``3x3`` = 1344x1344), ``base`` (``none``) or ``lora`` (``per_window``), and the batch.

Run ``PYTHONPATH=. python benchmarks/bench_textmonkey.py --help`` for the options.
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

from monkey_kernels.ops.backends import BACKENDS

_HERE = os.path.dirname(os.path.abspath(__file__))
# Run as a script (python benchmarks/bench_x.py) or imported as benchmarks.bench_x: common.py sits beside it,
# the structural double of the public TextMonkey code in tests/helpers/.
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tests"))
from common import (add_timer_args, bench_backends, default_backend, make_result, patched_copies,  # noqa: E402
                    peak_memory_bytes, report, result_path, time_methods, timer_kwargs, timing_rows, write_result)
from helpers.textmonkey_double import VisionTransformer  # noqa: E402

TARGETS = {"inference": 2.0, "train_step": 1.5}  # GPU speed-ups of ``patched`` over ``reference``
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RESOLUTIONS = {"896x896": 2, "1344x1344": 3}  # windows per side (448 px windows in the release's terms)
ADAPTER_MODES = ("none", "per_window")

SMALL = dict(patch_size=14, width=128, layers=4, heads=4, mlp_ratio=4.0, output_dim=128, add_window=True,
             use_global=True, resampler=True, r=32, window_patches=8, global_view_size=112, num_positions=16,
             pool_queries=16, pool_heads=4, window_pos=(1, 3, 24, 46), window_dim=(32, 32, 64, 64),
             window_head=(2, 2, 4, 4), swin_window=12, perceiver_dim=64, perceiver_dim_head=16, perceiver_heads=4,
             attn_lora_rank=16, mlp_lora_rank=32, lora_dropout=0.05)
RELEASE = dict(patch_size=14, width=1664, layers=48, heads=16, mlp_ratio=4.9231, output_dim=4096, add_window=True,
               use_global=True, resampler=True, r=512, lora_dropout=0.05)  # the rest: the double's defaults


def window_pixels(config: dict) -> int:
    return config.get("window_patches", 32) * config["patch_size"]


def build_model(config: dict, windows_per_side: int, device, dtype) -> VisionTransformer:
    """The double at ``windows_per_side`` squared windows, one adapter per window, non-zero everywhere."""
    side = windows_per_side * window_pixels(config)
    with device:  # the release's sizes are built where they run (no 2B-parameter init on the host)
        model = VisionTransformer(image_size=[side, side], lora_repeat_num=windows_per_side ** 2, **config)
    with torch.no_grad():  # lora_b, the cross-window fc2 and the Perceiver fc2 start at zero: make them work
        for name, p in model.named_parameters():
            if name.endswith("lora_b.weight") or name.endswith("fc2.weight"):
                p.normal_(0.0, 0.02)
    for name, p in model.named_parameters():  # the release's fix_vit
        p.requires_grad_("lora" in name or "window_attention" in name
                         or name.startswith(("attn_pool", "ln_post", "proj", "downresampler")))
    return model.to(device=device, dtype=dtype)


def count_block_calls(model: torch.nn.Module, call) -> int:
    calls = [0]
    handles = [b.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
               for b in model.transformer.resblocks]
    try:
        call()
    finally:
        for handle in handles:
            handle.remove()
    return calls[0]


def run_case(models: Dict[str, torch.nn.Module], initial_state, config: dict, windows_per_side: int, lora_mode: str,
             batch: int, device, dtype, args) -> List[dict]:
    """Rows of one (resolution, adapter mode, batch): inference and train step of every model, timed
    interleaved."""
    for model in models.values():  # train steps of earlier cases moved the weights: start equal again
        model.load_state_dict(initial_state)
    side = windows_per_side * window_pixels(config)
    generator = torch.Generator().manual_seed(batch)
    images = torch.randn(batch, 3, side, side, generator=generator).to(device=device, dtype=dtype)
    lora_idx = None if lora_mode == "none" else windows_per_side ** 2
    rel_diff, block_calls = {}, {}
    with torch.no_grad():
        for model in models.values():
            model.eval()
        expected = models["reference"].encode(None, lora_idx=lora_idx, input_image=images).float()
        for name, model in models.items():
            block_calls[name] = count_block_calls(
                model, lambda model=model: model.encode(None, lora_idx=lora_idx, input_image=images))
            if name != "reference":
                got = model.encode(None, lora_idx=lora_idx, input_image=images).float()
                rel_diff[name] = ((got - expected).norm() / expected.norm()).item()
    resolution = f"{windows_per_side * 448}x{windows_per_side * 448}"
    # windows per side (448 px each in the release's terms; the small config's are smaller), lora / base, batch
    case = f"{windows_per_side}x{windows_per_side} {'base' if lora_mode == 'none' else 'lora'} b{batch}"
    extra = dict(batch=batch, windows=windows_per_side ** 2, lora_mode=lora_mode, resolution=resolution)

    def infer_call(model):
        def call():
            with torch.no_grad():
                model.encode(None, lora_idx=lora_idx, input_image=images)
        return call

    out = _timed_rows(case, "inference", {n: infer_call(m) for n, m in models.items()}, device, args, extra, batch)
    steps = {}
    for name, model in models.items():
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            model.encode(None, lora_idx=lora_idx, input_image=images).float().square().mean().backward()
            optimizer.step()

        steps[name] = step
    out += _timed_rows(case, "train_step", steps, device, args, extra, batch)
    for model in models.values():
        model.zero_grad(set_to_none=True)
    for row in out:
        row["rel_diff_to_reference"] = rel_diff.get(row["method"])
        row["block_calls_per_encode"] = block_calls.get(row["method"])
    return out


def _timed_rows(case, mode, calls, device, args, extra, batch) -> List[dict]:
    try:
        timings = time_methods(calls, device, base="reference", **args.timer)
        peaks = {n: peak_memory_bytes(c, device) for n, c in calls.items()} if device.type == "cuda" else None
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
                reference_peak is None or row["peak_memory_bytes"] is None
                or row["peak_memory_bytes"] <= reference_peak)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--release", action="store_true",
                        help="the release's shapes (width 1664, 48 layers, 896x896 and 1344x1344, bf16; CUDA only)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 2")
    parser.add_argument("--resolutions", nargs="+", choices=list(RESOLUTIONS), default=None,
                        help="default: all (--quick: 896x896)")
    parser.add_argument("--adapters", nargs="+", choices=ADAPTER_MODES, default=None,
                        help="adapter modes (default: both; --quick: per_window)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                        help="backends of the patched models, the first being 'patched' (default: the device's "
                             "default backend, then the others that run there; --release: the default only)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 896x896, per_window, batch 1")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default under benchmarks/results/)")
    parser.add_argument("--no-plot", action="store_true")
    add_timer_args(parser, warmup=1)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if args.release and not on_cuda:
        parser.error("--release needs a CUDA device (the release's encoder is ~2B parameters)")
    if args.threads is None and not on_cuda:
        args.threads = 1  # a small model on a shared machine runs slower with the intra-op pool's hand-offs
    dtype = DTYPES[args.dtype or ("bf16" if on_cuda else "fp32")]
    batches = args.batches or ([1] if args.quick else [1, 2])
    resolutions = args.resolutions or (["896x896"] if args.quick else list(RESOLUTIONS))
    adapter_modes = args.adapters or (["per_window"] if args.quick else list(ADAPTER_MODES))
    if args.rounds is None:
        args.rounds = (1 if on_cuda else 3) if args.quick else (3 if on_cuda else 7)
    backends = (bench_backends(device, args.backends) if args.backends or not args.release
                else [default_backend(device)])
    timer = args.timer = timer_kwargs(args)  # applies --threads: before the models are built
    config = RELEASE if args.release else SMALL

    rows: List[dict] = []
    reports: Dict[str, Dict[str, str]] = {}
    cases = [(r, m, b) for r in resolutions for m in adapter_modes for b in batches]
    progress = tqdm(total=len(cases), desc="textmonkey encoder")
    for resolution in resolutions:
        per_side = RESOLUTIONS[resolution]
        torch.manual_seed(per_side)
        reference = build_model(config, per_side, device, dtype)
        patched, reports[resolution] = patched_copies(reference, backends)
        models: Dict[str, torch.nn.Module] = {"reference": reference, **patched}
        initial_state = {k: v.detach().to("cpu", copy=True) for k, v in reference.state_dict().items()}
        for lora_mode in adapter_modes:
            for batch in batches:
                for row in run_case(models, initial_state, config, per_side, lora_mode, batch, device, dtype, args):
                    row["backend"] = None if row["method"] == "reference" else (
                        backends[0] if row["method"] == "patched" else row["method"][len("patched_"):])
                    rows.append(row)
                progress.update(1)
        del models, reference, patched, initial_state
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
    progress.close()

    shown = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
    run_config = dict(model=shown, release=args.release, dtype=str(dtype).replace("torch.", ""), backends=backends,
                      batches=batches, resolutions=resolutions, adapter_modes=adapter_modes, timer=timer,
                      targets=TARGETS if on_cuda else "patched never slower",
                      trainable="adapters, window_attention, attn_pool, ln_post, proj, downresampler; AdamW lr 1e-5")
    result = make_result("textmonkey", device, rows, config=run_config, patch_reports=reports)
    out = write_result(result, args.out or result_path("textmonkey", device))
    report(rows, ["case", "method", "mode", "ms", "speedup", "images_per_s", "peak_memory_bytes",
                  "block_calls_per_encode", "rel_diff_to_reference", "target_met"], out,
           f"TextMonkey encoder: {result['device']}, {result['threads']} threads, {run_config['dtype']}, "
           f"patched = {backends[0]} backend, {'release config' if args.release else 'small config'}",
           plot=not args.no_plot, value="speedup", title=f"TextMonkey encoder: {result['device']}",
           ylabel="speed-up over the reference (higher is better)")
    return result


if __name__ == "__main__":
    main()
