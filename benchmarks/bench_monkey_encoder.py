"""End-to-end benchmark of Monkey's vision encoder: the reference per-tile loop vs the patched model.

For every (batch, resolution) case, on the same weights and inputs:

- ``inference``: ``model(pixel_values)`` under ``torch.no_grad()`` in eval mode; reported as images/s.
- ``train_step``: forward + backward + ``AdamW.step`` in train mode with the release's recipe (only the
  parameters whose name contains "lora" and the resampler ``attn_pool`` train; LoRA dropout 0.05 active);
  reported as ms per step and images/s.

Methods: ``reference`` (the release's loop: one ViT pass per tile with its adapter, then the global view) and
``patched`` (``patch_model``: one batched ViT pass over every view, fused multi-LoRA linears). With
``--cuda-graph`` (CUDA only) a third method, ``patched+graph``, times the patched inference forward replayed
from a CUDA graph (``monkey_kernels.cuda_graphs.capture_forward``; inference only, no train step). Each result
records the peak memory (CUDA only) and the relative difference of the patched output to the reference one
(eval mode, same inputs).

On CUDA: the release config (width 1664, 48 layers; ``lora_repeat_num`` raised to 6 so 1344x896 = 3x2 tiles
fits), bf16, batches 1, 4, 8, resolutions 896x896 and 1344x896, the ``triton`` backend. Without CUDA: a small
config (labelled ``CPU``, fp32, the ``torch`` backend) with the same tile grids; CPU numbers say nothing
about GPU performance. Results go to ``benchmarks/results/monkey_encoder_<device>_<date>.json``.

Run ``PYTHONPATH=. python benchmarks/bench_monkey_encoder.py --help`` for the options.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from tqdm import tqdm

from monkey_kernels.cuda_graphs import capture_forward
from monkey_kernels.models import MonkeyVisionConfig, MonkeyVisionModel, tile_grid
from monkey_kernels.patching import patch_model

# Run as a script (python benchmarks/bench_x.py) or imported as benchmarks.bench_x: common.py sits beside it.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_name, synchronize, time_it  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (width, height) requested resolutions, in units of the release's 448 px tile.
RESOLUTIONS = {"896x896": (2, 2), "1344x896": (3, 2)}

SMALL_CONFIG = dict(tile_size=112, image_size=224, patch_size=14, width=128, layers=4, heads=4, mlp_ratio=4,
                    num_positions=16, n_queries=16, output_dim=128, resampler_heads=4, lora_repeat_num=6,
                    attn_lora_rank=16, mlp_lora_rank=32, lora_dropout=0.05)




def build_config(small: bool) -> MonkeyVisionConfig:
    if small:
        return MonkeyVisionConfig(**SMALL_CONFIG)
    return MonkeyVisionConfig(lora_repeat_num=6)  # the release's shapes; 6 adapters for 3x2 tiles


def release_trainable_(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_("lora" in name or name.startswith("attn_pool"))






def peak_memory(device: torch.device, fn: Callable[[], None]) -> Optional[float]:
    """Peak allocated GiB during one ``fn`` (CUDA only; ``None`` elsewhere)."""
    if device.type != "cuda":
        fn()
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def measure(model: MonkeyVisionModel, pixel_values: torch.Tensor, device: torch.device, warmup: int,
            iters: int, checkpointing: bool) -> Dict[str, Optional[float]]:
    batch = pixel_values.shape[0]
    model.eval()

    def infer():
        with torch.no_grad():
            model(pixel_values)

    infer_s = time_it(infer, device, warmup, iters)
    infer_mem = peak_memory(device, infer)

    model.train()
    if checkpointing:
        model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = model(pixel_values)
        out.float().square().mean().backward()
        optimizer.step()

    step_s = time_it(step, device, warmup, iters)
    step_mem = peak_memory(device, step)
    if checkpointing:
        model.activation_checkpointing_disable()
    model.zero_grad(set_to_none=True)
    return {
        "inference_images_per_s": batch / infer_s,
        "inference_ms": infer_s * 1e3,
        "inference_peak_gib": infer_mem,
        "train_step_ms": step_s * 1e3,
        "train_images_per_s": batch / step_s,
        "train_peak_gib": step_mem,
    }


def measure_graphed(model: MonkeyVisionModel, pixel_values: torch.Tensor, device: torch.device, warmup: int,
                    iters: int) -> Dict[str, Optional[float]]:
    """Inference of ``model`` replayed from a CUDA graph (captured once, after warm-up)."""
    model.eval()
    graphed = capture_forward(model, pixel_values, warmup=max(warmup, 1))
    infer_s = time_it(lambda: graphed(pixel_values), device, warmup, iters)
    return {
        "inference_images_per_s": pixel_values.shape[0] / infer_s,
        "inference_ms": infer_s * 1e3,
        "inference_peak_gib": peak_memory(device, lambda: graphed(pixel_values)),
    }


def run_case(reference, patched, initial_state, config, batch, grid_cols_rows, device, dtype, args) -> List[dict]:
    # Train steps of earlier cases moved the weights (differently: dropout masks differ): start equal again.
    reference.load_state_dict(initial_state)
    patched.load_state_dict(initial_state)
    cols, rows = grid_cols_rows
    grid = tile_grid(cols * config.tile_size, rows * config.tile_size, config)
    pixel_values = torch.randn(batch, grid.num_views, config.num_channels, config.tile_size, config.tile_size,
                               device=device, dtype=dtype)
    with torch.no_grad():
        reference.eval(), patched.eval()
        ref_out = reference(pixel_values).float()
        fused_out = patched(pixel_values).float()
        rel_diff = ((fused_out - ref_out).norm() / ref_out.norm()).item()
    rows_out = []
    for method, model in (("reference", reference), ("patched", patched)):
        entry = {"method": method, "batch": batch, "tiles": grid.num_tiles, "views": grid.num_views,
                 "image_tokens": grid.num_image_tokens}
        try:
            entry.update(measure(model, pixel_values, device, args.warmup, args.iters, args.checkpointing))
        except torch.cuda.OutOfMemoryError:
            entry["error"] = "out of memory"
            model.zero_grad(set_to_none=True)
            if args.checkpointing:
                model.activation_checkpointing_disable()
        if method == "patched":
            entry["rel_diff_to_reference"] = rel_diff
        rows_out.append(entry)
        if method == "patched" and args.cuda_graph:
            graphed = {"method": "patched+graph", "batch": batch, "tiles": grid.num_tiles, "views": grid.num_views,
                       "image_tokens": grid.num_image_tokens}
            try:
                graphed.update(measure_graphed(model, pixel_values, device, args.warmup, args.iters))
            except torch.cuda.OutOfMemoryError:
                graphed["error"] = "out of memory"
            rows_out.append(graphed)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows_out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="small config (forced without CUDA)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 4 8 (CUDA), 1 2 4 (CPU)")
    parser.add_argument("--resolutions", nargs="+", choices=list(RESOLUTIONS), default=list(RESOLUTIONS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the train step")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time the patched inference replayed from a CUDA graph (CUDA only)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default under benchmarks/results/)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if args.cuda_graph and not on_cuda:
        parser.error("--cuda-graph needs a CUDA device")
    small = args.small or not on_cuda
    dtype = DTYPES[args.dtype or ("bf16" if on_cuda else "fp32")]
    batches = args.batches or ([1, 4, 8] if on_cuda else [1, 2, 4])
    backend = "triton" if on_cuda else "torch"
    label = torch.cuda.get_device_name(device) if on_cuda else f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)"

    config = build_config(small)
    torch.manual_seed(0)
    reference = MonkeyVisionModel(config)
    with torch.no_grad():  # non-zero adapters so the LoRA terms do work
        for name, p in reference.named_parameters():
            if name.endswith("lora_b.weight"):
                p.normal_(0.0, 0.02)
    release_trainable_(reference)
    reference = reference.to(device=device, dtype=dtype)
    patched = copy.deepcopy(reference)
    report = patch_model(patched, backend=backend)
    initial_state = {k: v.detach().to("cpu", copy=True) for k, v in reference.state_dict().items()}

    results = []
    cases = [(b, r) for r in args.resolutions for b in batches]
    for batch, resolution in tqdm(cases, desc=f"monkey encoder on {label}"):
        entries = run_case(reference, patched, initial_state, config, batch, RESOLUTIONS[resolution], device,
                           dtype, args)
        for entry in entries:
            entry["resolution"] = resolution
            results.append(entry)

    import triton  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    payload = {
        "benchmark": "monkey_encoder",
        "device": label,
        "device_type": device.type,
        "label": "GPU" if on_cuda else "CPU (small config; not indicative of GPU performance)",
        "dtype": str(dtype).replace("torch.", ""),
        "backend": backend,
        "config": {k: getattr(config, k) for k in SMALL_CONFIG},
        "checkpointing": args.checkpointing,
        "patch_report": str(report),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "warmup": args.warmup,
        "iters": args.iters,
        "results": results,
    }
    out = args.out or RESULTS_DIR / (
        f"monkey_encoder_{'cuda' if on_cuda else 'cpu'}_{datetime.date.today().isoformat()}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print_table(payload)
    print(f"wrote {out}")
    return payload


def print_table(payload: dict) -> None:
    print(f"\n{payload['label']}: {payload['device']}, {payload['dtype']}, backend {payload['backend']}")
    header = (f"{'resolution':>10} {'batch':>5} {'method':>9} {'infer img/s':>11} {'train ms':>9} "
              f"{'train img/s':>11} {'peak inf GiB':>12} {'peak train GiB':>14} {'rel diff':>9}")
    print(header)
    for r in payload["results"]:
        if "error" in r:
            print(f"{r['resolution']:>10} {r['batch']:>5} {r['method']:>9} {r['error']}")
            continue

        def mem(v):
            return f"{v:.2f}" if v is not None else "-"

        def num(key, spec):
            return format(r[key], spec) if r.get(key) is not None else "-"

        diff = f"{r['rel_diff_to_reference']:.1e}" if "rel_diff_to_reference" in r else "-"
        print(f"{r['resolution']:>10} {r['batch']:>5} {r['method']:>9} {r['inference_images_per_s']:>11.2f} "
              f"{num('train_step_ms', '.1f'):>9} {num('train_images_per_s', '.2f'):>11} "
              f"{mem(r['inference_peak_gib']):>12} {mem(r.get('train_peak_gib')):>14} {diff:>9}")


if __name__ == "__main__":
    main()
