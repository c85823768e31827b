"""Benchmark: a PEFT multi-LoRA SigLIP vision tower, patched (fused multi-LoRA linears) vs PEFT's mixed batch vs
the base tower without adapters.

For every (number of adapters, batch) case, on the same weights and inputs, one adapter per batch row (round
robin over the adapters and ``"__base__"``):

- ``base``: the SigLIP tower without any adapter (the lower bound).
- ``peft``: PEFT's mixed batch (``adapter_names``: per layer, a masked loop over the distinct adapters). PEFT
  refuses ``adapter_names`` in training, so for ``fwd_bwd`` the same PEFT layer code gets the names through
  :func:`~monkey_kernels.peft_patch.adapter_selection` on the UNPATCHED model (pre-hooks, no fused layer).
- ``patched``: ``patch_model`` + ``adapter_selection`` (fused multi-LoRA linears).

Modes: ``fwd`` (eval, ``torch.no_grad()``) and ``fwd_bwd`` (train mode, LoRA dropout 0, all adapters' LoRA
Parameters trainable, base frozen, ``pixel_values`` requiring grad so the whole tower runs backward in every
method, ``loss = mean(last_hidden_state ** 2)``). Reported: median ms per call and images/s, peak memory on
CUDA. Before timing, the patched output is compared with PEFT's (eval) and the relative difference recorded.

On CUDA: a SigLIP-so400m-like tower (hidden 1152, MLP 4304, 27 layers, 16 heads, 378 px / patch 14 = 729
tokens), bf16, the ``triton`` backend, 4 and 16 adapters (ranks cycling 8 / 16 / 32 / 16, alphas 2 r, every
fourth rsLoRA) on q/k/v/out_proj/fc1/fc2, batches 8 and 32. Without CUDA: a tiny tower (labelled ``CPU``,
fp32, ``torch`` backend, batches 4 and 8); CPU numbers say nothing about GPU performance.
Results go to ``benchmarks/results/peft_<device>_<date>.json``.

Run ``PYTHONPATH=. python benchmarks/bench_peft.py --help`` for the options.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

# Run as a script (python benchmarks/bench_x.py) or imported as benchmarks.bench_x: common.py sits beside it.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_name, time_it  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
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


def run_case(tower, num_adapters, batch, device, dtype, backend, warmup, iters) -> List[Dict]:
    from monkey_kernels.patching import patch_model  # noqa: PLC0415
    from monkey_kernels.peft_patch import adapter_selection  # noqa: PLC0415

    torch.manual_seed(0)
    base, peft_model, names = build_models(tower, num_adapters, device, dtype)
    patched = copy.deepcopy(peft_model)
    patch_model(patched, backend=backend)
    rows = rows_for(names, batch)
    size = tower["image_size"]
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)

    peft_model.eval()
    patched.eval()
    with torch.no_grad():
        expected = peft_model(pixel_values=x, adapter_names=rows).last_hidden_state.float()
        with adapter_selection(patched, rows):
            got = patched(pixel_values=x).last_hidden_state.float()
    rel_diff = ((got - expected).norm() / expected.norm()).item()

    def forward(method: str) -> Callable[[], None]:
        def fn():
            with torch.no_grad():
                if method == "base":
                    base(pixel_values=x)
                elif method == "peft":
                    peft_model(pixel_values=x, adapter_names=rows)
                else:
                    with adapter_selection(patched, rows):
                        patched(pixel_values=x)
        return fn

    def forward_backward(method: str) -> Callable[[], None]:
        model = {"base": base, "peft": peft_model, "patched": patched}[method]

        def fn():
            xg = x.detach().requires_grad_(True)
            model.zero_grad(set_to_none=True)
            if method == "base":
                out = model(pixel_values=xg).last_hidden_state
                out.float().square().mean().backward()
            else:
                with adapter_selection(model, rows):  # unpatched PEFT: hooks feed PEFT's own adapter_names
                    out = model(pixel_values=xg).last_hidden_state
                    out.float().square().mean().backward()
        return fn

    results = []
    for mode, make in (("fwd", forward), ("fwd_bwd", forward_backward)):
        for m in (base, peft_model, patched):
            m.train(mode == "fwd_bwd")
        for method in ("base", "peft", "patched"):
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            seconds = time_it(make(method), device, warmup, iters)
            entry = dict(adapters=num_adapters, batch=batch, mode=mode, method=method,
                         ms=round(seconds * 1e3, 3), images_per_s=round(batch / seconds, 2))
            if device.type == "cuda":
                entry["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            if method == "patched":
                entry["rel_diff_vs_peft_eval"] = rel_diff
            results.append(entry)
            print(entry, flush=True)
    return results


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="batch sizes (default: 8 32 on CUDA, 4 8 on CPU)")
    parser.add_argument("--backend", default=None, help="fused backend (default: triton on CUDA, torch on CPU)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tower = GPU_TOWER if cuda else CPU_TOWER
    dtype = torch.bfloat16 if cuda else torch.float32
    backend = args.backend or ("triton" if cuda else "torch")
    batches = args.batches or ([8, 32] if cuda else [4, 8])
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    iters = args.iters if args.iters is not None else (10 if cuda else 5)

    import peft  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    try:
        import triton  # noqa: PLC0415
        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    results = []
    for num_adapters in args.adapters:
        for batch in batches:
            results.extend(run_case(tower, num_adapters, batch, device, dtype, backend, warmup, iters))
    device_name = torch.cuda.get_device_name(device) if cuda else cpu_name()
    label = "cuda" if cuda else "cpu"
    date = datetime.date.today().isoformat()
    report = dict(
        benchmark="peft_multi_lora_siglip", label=label.upper(), device=device_name, date=date,
        versions=dict(torch=torch.__version__, triton=triton_version, transformers=transformers.__version__,
                      peft=peft.__version__, python=platform.python_version()),
        dtype=str(dtype).replace("torch.", ""), backend=backend, tower=tower, target_modules=TARGETS,
        ranks_cycle=RANKS, rows="round robin over the adapters and __base__", warmup=warmup, iters=iters,
        note=None if cuda else "CPU smoke run of a tiny tower: says nothing about GPU performance",
        results=results,
    )
    out = args.out or RESULTS_DIR / f"peft_{label}_{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
