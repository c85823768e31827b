"""Benchmark: a PEFT multi-LoRA SigLIP vision tower, patched (fused multi-LoRA linears) vs PEFT's mixed batch vs
the base tower without adapters.

For every (number of adapters, batch) case, on the same weights and inputs, one adapter per batch row (round
robin over the adapters and ``"__base__"``):

- ``base``: the SigLIP tower without any adapter (the lower bound).
- ``peft``: PEFT's mixed batch (``adapter_names``: per layer, a masked loop over the distinct adapters). PEFT
  refuses ``adapter_names`` in training, so for ``fwd_bwd`` the same PEFT layer code gets the names through
  :func:`~monkey_kernels.adapter_selection` on the UNPATCHED model (pre-hooks, no fused layer).
- ``patched``: ``patch_model`` (the device's DEFAULT backend: native on CPU when the extension loads, triton on
  CUDA) + ``adapter_selection`` (fused multi-LoRA linears); ``patched_<backend>`` for each other backend that
  runs on the device.

Modes: ``fwd`` (eval, ``torch.no_grad()``) and ``fwd_bwd`` (train mode, LoRA dropout 0, all adapters' LoRA
Parameters trainable, base frozen, ``pixel_values`` requiring grad so the whole tower runs backward in every
method, ``loss = mean(last_hidden_state ** 2)``). Timing: ``benchmarks/common.py`` (interleaved rounds; the
ratio's base is ``peft``, so ``speedup_vs_peft = 1 / ratio_to_base``). Reported: ms per call, images/s, peak
memory on CUDA. Before timing, each patched output is compared with PEFT's (eval) and the relative difference
recorded. Target: ``patched`` never slower than ``peft``.

On CUDA: a SigLIP-so400m-like tower (hidden 1152, MLP 4304, 27 layers, 16 heads, 378 px / patch 14 = 729
tokens), bf16, the ``triton`` backend, 4 and 16 adapters (ranks cycling 8 / 16 / 32 / 16, alphas 2 r, every
fourth rsLoRA) on q/k/v/out_proj/fc1/fc2, batches 8 and 32. Without CUDA: a tiny tower (labelled ``CPU``,
fp32, batches 4 and 8); CPU numbers say nothing about GPU performance.
Results go to ``benchmarks/results/peft_<device>_<date>.json``.

``--amp bf16`` / ``--amp fp16``: mixed precision as the HF ``Trainer`` runs it -- the tower and its adapters in
fp32 (master weights), every forward of every method under ``torch.autocast(device, dtype)``; results
``peft_amp-<dtype>_<device>_<date>.json``.

Run ``PYTHONPATH=. python benchmarks/bench_peft.py --help`` for the options.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from monkey_kernels.ops.backends import BACKENDS

# Run as a script (python benchmarks/bench_x.py) or imported as benchmarks.bench_x: common.py sits beside it.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_amp_arg, add_timer_args, autocast_context, bench_backends, make_result,  # noqa: E402
                    patched_copies, peak_memory_bytes, report, result_path, time_methods, timer_kwargs, timing_rows,
                    write_result)

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
GPU_TOWER = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                 image_size=378, patch_size=14)  # 27 x 27 = 729 tokens
CPU_TOWER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 image_size=56, patch_size=14)  # 16 tokens
RANKS = [8, 16, 32, 16]


def build_models(tower: Dict, num_adapters: int, device: torch.device, dtype: torch.dtype):
    """``(base tower, PEFT model with num_adapters adapters over a copy of the same base weights, names)``."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415
    from transformers import SiglipVisionConfig, SiglipVisionModel  # noqa: PLC0415

    base = SiglipVisionModel(SiglipVisionConfig(vision_use_head=False, **tower)).to(device=device, dtype=dtype)
    base.requires_grad_(False)
    names = [f"task{i}" for i in range(num_adapters)]
    model = None
    for i, name in enumerate(names):
        r = RANKS[i % len(RANKS)]
        config = LoraConfig(r=r, lora_alpha=2 * r, use_rslora=i % 4 == 3, lora_dropout=0.0,
                            target_modules=TARGETS, init_lora_weights=False)
        if model is None:
            # autocast_adapter_dtype=False: adapters in the tower's dtype, as the fused op needs one dtype.
            model = get_peft_model(copy.deepcopy(base), config, adapter_name=name, autocast_adapter_dtype=False)
        else:
            model.add_adapter(name, config, autocast_adapter_dtype=False)
    model = model.to(device=device, dtype=dtype)
    for pname, p in model.named_parameters():
        p.requires_grad_("lora_" in pname)  # every adapter trains (PEFT only marks the active one)
    return base, model, names


def rows_for(names: List[str], batch: int) -> List[str]:
    choices = names + ["__base__"]
    return [choices[i % len(choices)] for i in range(batch)]


def run_case(tower, num_adapters, batch, device, dtype, backends: Sequence[str], args) -> List[Dict]:
    from monkey_kernels import adapter_selection  # noqa: PLC0415

    torch.manual_seed(0)
    base, peft_model, names = build_models(tower, num_adapters, device, dtype)
    patched, _ = patched_copies(peft_model, backends)
    rows = rows_for(names, batch)
    size = tower["image_size"]
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    models = {"base": base, "peft": peft_model, **patched}
    amp = getattr(args, "amp", None)

    for model in models.values():
        model.eval()
    rel_diff = {}
    with torch.no_grad(), autocast_context(device, amp):
        expected = peft_model(pixel_values=x, adapter_names=rows).last_hidden_state.float()
        for name, model in patched.items():
            with adapter_selection(model, rows):
                got = model(pixel_values=x).last_hidden_state.float()
            rel_diff[name] = ((got - expected).norm() / expected.norm()).item()

    def forward(name: str) -> Callable[[], None]:
        model = models[name]

        def fn():
            with torch.no_grad(), autocast_context(device, amp):
                if name == "base":
                    model(pixel_values=x)
                elif name == "peft":
                    model(pixel_values=x, adapter_names=rows)
                else:
                    with adapter_selection(model, rows):
                        model(pixel_values=x)
        return fn

    def forward_backward(name: str) -> Callable[[], None]:
        model = models[name]

        def fn():
            xg = x.detach().requires_grad_(True)
            model.zero_grad(set_to_none=True)
            if name == "base":
                with autocast_context(device, amp):
                    loss = model(pixel_values=xg).last_hidden_state.float().square().mean()
            else:
                with adapter_selection(model, rows), autocast_context(device, amp):  # unpatched PEFT: hooks feed
                    loss = model(pixel_values=xg).last_hidden_state.float().square().mean()  # PEFT's adapter_names
            loss.backward()
        return fn

    case = f"{num_adapters} adapters b{batch}"
    results = []
    for mode, make in (("fwd", forward), ("fwd_bwd", forward_backward)):
        for model in models.values():
            model.train(mode == "fwd_bwd")
        calls = {name: make(name) for name in models}
        gc.collect()
        timings = time_methods(calls, device, base="peft", **timer_kwargs(args))
        peaks = {n: peak_memory_bytes(c, device) for n, c in calls.items()} if device.type == "cuda" else None
        for row in timing_rows(case, mode, timings, peaks, adapters=num_adapters, batch=batch):
            row["images_per_s"] = round(batch / (row["ms"] * 1e-3), 3)
            row["speedup_vs_peft"] = round(1.0 / row["ratio_to_base"], 3) if row["ratio_to_base"] else None
            if row["method"].startswith("patched"):
                row["rel_diff_vs_peft_eval"] = rel_diff[row["method"]]
                row["target_met"] = row["ratio_to_base"] <= 1.0
            results.append(row)
    return results


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, nargs="+", default=None, help="default: 4 16 (--quick: 4)")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="batch sizes (default: 8 32 on CUDA, 4 8 on CPU; --quick: the first)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                        help="backends of the patched models, the first being 'patched' (default: the device's "
                             "default backend, then the others that run there)")
    add_amp_arg(parser, "the tower and its adapters")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 adapters, one batch, few rounds")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    parser.add_argument("--no-plot", action="store_true")
    add_timer_args(parser)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tower = GPU_TOWER if cuda else CPU_TOWER
    dtype = torch.bfloat16 if cuda and args.amp is None else torch.float32
    adapters = args.adapters or ([4] if args.quick else [4, 16])
    batches = args.batches or ([8, 32] if cuda else [4, 8])[: 1 if args.quick else 2]
    if args.rounds is None:
        args.rounds = (1 if cuda else 3) if args.quick else (3 if cuda else 9)
    backends = bench_backends(device, args.backends)

    rows = []
    for num_adapters in adapters:
        for batch in batches:
            rows.extend(run_case(tower, num_adapters, batch, device, dtype, backends, args))
    config = dict(tower=tower, target_modules=TARGETS, ranks_cycle=RANKS, dtype=str(dtype).replace("torch.", ""),
                  rows="round robin over the adapters and __base__", backends=backends, adapters=adapters,
                  batches=batches, timer=timer_kwargs(args), base_method="peft", amp=args.amp)
    result = make_result("peft", device, rows, config=config)
    out = write_result(result, args.out or result_path("peft" if args.amp is None else f"peft_amp-{args.amp}", device))
    report(rows, ["case", "method", "mode", "ms", "ratio_to_base", "speedup_vs_peft", "images_per_s",
                  "peak_memory_bytes", "rel_diff_vs_peft_eval", "target_met"], out,
           f"PEFT multi-LoRA SigLIP tower: {result['device']}, {result['threads']} threads, {config['dtype']}"
           f"{'' if args.amp is None else f' weights under {args.amp} autocast'}, "
           f"patched = {backends[0]} backend{'' if cuda else ' (tiny CPU tower)'}",
           plot=not args.no_plot, value="speedup_vs_peft", title=f"PEFT tower: {result['device']}",
           ylabel="speed-up over PEFT (higher is better)")
    return result


if __name__ == "__main__":
    main()
