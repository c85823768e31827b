"""Benchmark of the full Monkey VLM (``MonkeyLMHeadModel``): the public per-window forward vs the ``monkey_vlm`` rule.

The model is the structural double of the public remote code (``tests/helpers/monkey_vlm_double.py``: Qwen-style LM with
``wte`` / ``drop`` / ``h`` / ``ln_f``, ``MonkeyModel.forward`` looping the vision encoder once per window, the
in-place feature write), random weights. Each sequence holds one image (896x896 in the release's terms: 2x2
windows + the global view, a span of 5 x n_queries placeholders) between text tokens; ``visual.encode`` returns
CPU tensors, as a real image loader does.

Modes, on the same weights and inputs:

- ``prefill``: the first forward with images (``use_cache=True``, eval mode, no grad): what ``generate`` /
  ``chat`` pay before the first token.
- ``train_step``: forward with labels + backward + ``AdamW.step`` in train mode with the release's recipe (the
  LoRA adapters -- lora_a, lora_b, lora_scale -- and the resampler train, the rest is frozen; LoRA dropout
  0.05 active).

Methods: ``reference`` (the unpatched double: one ViT pass per window and one for the global views, in-place
write), ``patched`` (``patch_model`` with the device's DEFAULT backend -- native on CPU when the extension loads,
triton on CUDA: one batched encoder pass over all views of the batch, out-of-place write) and
``patched_<backend>`` for each other backend that runs there. Timing: ``benchmarks/common.py`` (interleaved
rounds; ``speedup`` = 1 / the median per-round ratio to ``reference``); rows carry images/s, peak memory (CUDA)
and the relative difference of the patched prefill logits to the reference ones.

On CUDA: the release's vision tower (ViT-bigG: width 1664, 48 layers, 448 px windows, 256 queries, 4096-wide
resampler) and a Qwen-7B-wide LM (hidden 4096, 32 heads, MLP 11008, vocabulary 151936) at reduced depth
(``--lm-layers``, default 4), bf16, batches 1 and 4. Targets there: prefill >= 2x, train step >= 1.5x at no
more peak memory. Without CUDA: a small config (fp32), one thread unless ``--threads``; CPU numbers say nothing
about GPU performance.
Results: ``benchmarks/results/monkey_vlm_<device>_<date>.json``.

Run ``PYTHONPATH=. python benchmarks/bench_monkey_vlm.py --help`` for the options.
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
# the structural double of the public Monkey code in tests/helpers/.
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tests"))
from common import (add_timer_args, bench_backends, make_result, patched_copies, peak_memory_bytes,  # noqa: E402
                    report, result_path, time_methods, timer_kwargs, timing_rows, write_result)
from helpers.monkey_vlm_double import MonkeyLMHeadModel, QWenConfig  # noqa: E402

TARGETS = {"prefill": 2.0, "train_step": 1.5}  # GPU speed-ups of ``patched`` over ``reference``
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TEXT_TOKENS = 64  # text tokens per sequence around the image span

SMALL_VISUAL = dict(image_start_id=1000, image_size=224, patch_size=14, width=128, layers=4, heads=4, mlp_ratio=4.0,
                    n_queries=16, output_dim=128, lora_repeat_num=4, window_size=112, num_positions=16,
                    attn_lora_rank=16, mlp_lora_rank=32, lora_dropout=0.05)
SMALL_LM = dict(vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=344)
RELEASE_VISUAL = dict(image_start_id=151857, image_size=896, patch_size=14, width=1664, layers=48, heads=16,
                      mlp_ratio=4.9231, n_queries=256, output_dim=4096, lora_repeat_num=4, window_size=448,
                      num_positions=256, attn_lora_rank=16, mlp_lora_rank=32, lora_dropout=0.05)
RELEASE_LM = dict(vocab_size=151936, hidden_size=4096, num_attention_heads=32, intermediate_size=11008)


def build_config(small: bool, lm_layers: Optional[int]) -> QWenConfig:
    if small:
        lm = dict(SMALL_LM, num_hidden_layers=lm_layers or SMALL_LM["num_hidden_layers"])
        return QWenConfig(visual=dict(SMALL_VISUAL), **lm)
    return QWenConfig(visual=dict(RELEASE_VISUAL), num_hidden_layers=lm_layers or 4, **RELEASE_LM)


def release_trainable_(model: torch.nn.Module) -> None:
    """The release's recipe: the vision LoRA (every name containing "lora") and the resampler train."""
    for name, p in model.named_parameters():
        in_visual = name.startswith("transformer.visual.")
        p.requires_grad_(in_visual and ("lora" in name or ".attn_pool." in name) and not name.endswith("pos_embed"))


def make_batch(config: QWenConfig, batch: int, generator: torch.Generator):
    """``(input_ids, attention_mask, labels, images)``: one image span per sequence between text tokens."""
    visual = config.visual
    start = visual["image_start_id"]
    windows = (visual["image_size"] // visual["window_size"]) ** 2
    span_length = (windows + 1) * visual["n_queries"]
    rows, images = [], {}
    for b in range(batch):
        path = f"bench/image_{b}.png"
        body = list(path.encode("utf-8"))
        span = [start] + body + [start + 2] * (span_length - len(body)) + [start + 1]
        text = torch.randint(0, 256, (TEXT_TOKENS,), generator=generator).tolist()
        rows.append(text[:TEXT_TOKENS // 4] + span + text[TEXT_TOKENS // 4:])
        images[path] = torch.randn(3, visual["image_size"], visual["image_size"], generator=generator)
    input_ids = torch.tensor(rows)
    return input_ids, torch.ones_like(input_ids), input_ids.clone(), images


def run_case(models: Dict[str, torch.nn.Module], initial_state, config: QWenConfig, batch: int, device, args):
    """Rows of one batch size: prefill and train step of every model, timed interleaved."""
    generator = torch.Generator().manual_seed(batch)
    input_ids, mask, labels, images = make_batch(config, batch, generator)
    input_ids, mask, labels = input_ids.to(device), mask.to(device), labels.to(device)
    for model in models.values():  # train steps of earlier cases moved the weights: start equal again
        model.load_state_dict(initial_state)
        model.transformer.visual.image_bank = dict(images)
    with torch.no_grad():
        for model in models.values():
            model.eval()
        expected = models["reference"](input_ids, attention_mask=mask).logits.float()
        rel_diff = {name: ((model(input_ids, attention_mask=mask).logits.float() - expected).norm()
                           / expected.norm()).item() for name, model in models.items() if name != "reference"}
    extra = dict(batch=batch, images=batch, seq_len=input_ids.shape[1])

    def prefill_call(model):
        def call():
            with torch.no_grad():
                model(input_ids, attention_mask=mask, use_cache=True)
        return call

    rows = _timed_rows(f"b{batch}", "prefill", {n: prefill_call(m) for n, m in models.items()}, device, args, extra)
    steps = {}
    for name, model in models.items():
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            model(input_ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()

        steps[name] = step
    rows += _timed_rows(f"b{batch}", "train_step", steps, device, args, extra)
    for model in models.values():
        model.zero_grad(set_to_none=True)
    for row in rows:
        row["rel_diff_to_reference"] = rel_diff.get(row["method"])
    return rows


def _timed_rows(case, mode, calls, device, args, extra) -> List[dict]:
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
        row["images_per_s"] = round(extra["images"] / (row["ms"] * 1e-3), 3)
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
    parser.add_argument("--small", action="store_true", help="small config (forced without CUDA)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 4 (--quick: 1 4)")
    parser.add_argument("--lm-layers", type=int, default=None,
                        help="language-model depth (default: 4 at the release's width, 2 in the small config)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                        help="backends of the patched models, the first being 'patched' (default: the device's "
                             "default backend, then the others that run there)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few rounds")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default under benchmarks/results/)")
    parser.add_argument("--no-plot", action="store_true")
    add_timer_args(parser, warmup=1)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if args.threads is None and not on_cuda:
        args.threads = 1  # a small model on a shared machine runs slower with the intra-op pool's hand-offs
    small = args.small or not on_cuda
    dtype = DTYPES[args.dtype or ("bf16" if on_cuda else "fp32")]
    batches = args.batches or [1, 4]
    if args.rounds is None:
        args.rounds = (1 if on_cuda else 3) if args.quick else (3 if on_cuda else 7)
    backends = bench_backends(device, args.backends)

    timer = args.timer = timer_kwargs(args)  # applies --threads: before the models are built
    config = build_config(small, args.lm_layers)
    torch.manual_seed(0)
    with device:  # the release's sizes are built where they run (no 2B-parameter init on the host)
        reference = MonkeyLMHeadModel(config)
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
    for batch in tqdm(batches, desc="monkey vlm"):
        for row in run_case(models, initial_state, config, batch, device, args):
            row["backend"] = None if row["method"] == "reference" else (
                backends[0] if row["method"] == "patched" else row["method"][len("patched_"):])
            rows.append(row)

    run_config = dict(visual={k: v for k, v in config.visual.items()},
                      lm=dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                              num_hidden_layers=config.num_hidden_layers,
                              num_attention_heads=config.num_attention_heads,
                              intermediate_size=config.intermediate_size),
                      small_config=small, dtype=str(dtype).replace("torch.", ""), backends=backends, batches=batches,
                      text_tokens=TEXT_TOKENS, timer=timer,
                      targets=TARGETS if on_cuda else "patched never slower",
                      trainable="vision lora* and attn_pool*, AdamW lr 1e-5")
    result = make_result("monkey_vlm", device, rows, config=run_config, patch_reports=reports)
    out = write_result(result, args.out or result_path("monkey_vlm", device))
    report(rows, ["case", "method", "mode", "ms", "speedup", "images_per_s", "peak_memory_bytes",
                  "rel_diff_to_reference", "target_met"], out,
           f"Monkey VLM: {result['device']}, {result['threads']} threads, {run_config['dtype']}, "
           f"patched = {backends[0]} backend, {'small config' if small else 'release vision tower'}",
           plot=not args.no_plot, value="speedup", title=f"Monkey VLM: {result['device']}",
           ylabel="speed-up over the reference (higher is better)")
    return result


if __name__ == "__main__":
    main()
