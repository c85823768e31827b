"""Progressive resolution training of a patched Monkey vision encoder: 896x896, then 1344x896, then 1544x896.

    python examples/train_progressive.py --preset tiny                          # CPU, seconds (28 px tiles)
    python examples/train_progressive.py --preset release --dtype bf16 --gradient-checkpointing \\
        --batch-size 1 --grad-accum 8 --steps-per-stage 500 --out runs/progressive   # one GPU

Stages (``--preset release``; ``tiny`` is the same with 28 px tiles instead of 448, sizes divided by 16):

===========  ======  ========  =====================================================================
resolution   grid    adapters  what happens before the stage
===========  ======  ========  =====================================================================
896x896      2x2     4         the model is built (random weights: none ship offline) and patched
1344x896     3x2     6         ``grow_tile_adapters(model, 6, init, old_grid=(2, 2), new_grid=(3, 2))``
1544x896     3x2     6         1544 / 448 = 3.45 rounds to 3 columns (``tile_grid``): no adapter is
                               added, only the config's resolution is updated (images are resized to
                               1344x896 by ``prepare_images``, as Monkey resizes to its fixed size)
===========  ======  ========  =====================================================================

After each growth the optimizer is rebuilt with ``rebuild_optimizer`` (same class and hyper-parameters, the old
adapters' Adam moments kept; ``--optimizer-update extend`` adds the new adapters to the existing optimizer
instead), and the example checks that the old tiles' outputs did not change (eval mode, the previous stage's
evaluation views): growing keeps the trained adapters bit-identical.

Task (synthetic, so the loss can fall): an image is a smooth random colour field; for each tile the model
regresses that tile's mean (normalised) colour from the mean-pooled features of the tile's view through a linear
head. Only the Monkey recipe's parameters train: every parameter whose name contains ``"lora"`` (``lora_a``,
``lora_b`` and the learnable ``lora_scale``), the resampler (``attn_pool``) and the head.

Options: ``--dtype bf16|fp32`` (the model is cast: the fused ops need weights and activations in one dtype, so no
autocast), ``--grad-accum`` micro-batches per optimizer step, ``--gradient-checkpointing``, a tqdm progress bar
(``--no-progress`` to hide it), ``--metrics-out`` (a JSON of each stage's evaluation loss at its start and end,
the old tiles' output difference after growing, timings), ``--out`` (``save_pretrained`` of the grown encoder;
``MonkeyVisionModel.from_pretrained`` reloads it with 6 adapters and ``image_resolution = [1544, 896]``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

try:
    import monkey_kernels  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monkey_kernels import patch_model
from monkey_kernels.growth import add_new_adapters_to_optimizer, grow_tile_adapters, rebuild_optimizer
from monkey_kernels.models import MonkeyVisionConfig, MonkeyVisionModel, prepare_images, tile_grid
from monkey_kernels.ops.backends import BACKENDS

PRESETS: Dict[str, Dict] = {
    # 28 px tiles of 2x2 patches: a whole run takes seconds on a CPU.
    "tiny": dict(
        config=dict(tile_size=28, image_size=56, patch_size=14, width=32, layers=2, heads=2, mlp_ratio=2,
                    num_positions=4, n_queries=4, output_dim=16, resampler_heads=2, lora_repeat_num=4,
                    attn_lora_rank=4, mlp_lora_rank=8, lora_dropout=0.05),
        stages=[(56, 56), (84, 56), (96, 56)],  # 896, 1344x896, 1544x896 divided by 16
        steps_per_stage=40, batch_size=8, lr=3e-3,
    ),
    # The released encoder (ViT-bigG, 48 layers, 448 px tiles): GPUs only.
    "release": dict(config=dict(), stages=[(896, 896), (1344, 896), (1544, 896)], steps_per_stage=500,
                    batch_size=1, lr=1e-4),
}


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------
def set_trainable_(model: nn.Module) -> List[str]:
    """The Monkey recipe: parameters named ``*lora*`` (so ``lora_scale`` too) and the resampler train, the rest
    is frozen (``attn_pool.pos_embed`` is a fixed sin-cos table and stays frozen). Returns the trainable names."""
    names = []
    for name, p in model.named_parameters():
        train = "lora" in name or (name.startswith("attn_pool.") and name != "attn_pool.pos_embed")
        p.requires_grad_(train)
        if train:
            names.append(name)
    return names


class TileColourHead(nn.Module):
    """``features [B, V * Q, D]`` (``V = tiles + 1`` views) -> per-tile colour ``[B, tiles, 3]``: the mean over each
    tile view's ``Q`` tokens, then a linear map (the global view is not used)."""

    def __init__(self, dim: int, queries: int) -> None:
        super().__init__()
        self.queries = queries
        self.linear = nn.Linear(dim, 3)

    def forward(self, features: torch.Tensor, num_tiles: int) -> torch.Tensor:
        b, tokens, d = features.shape
        pooled = features.reshape(b, tokens // self.queries, self.queries, d).mean(dim=2)  # [B, V, D]
        return self.linear(pooled[:, :num_tiles])


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
def make_batch(config: MonkeyVisionConfig, resolution: Tuple[int, int], batch: int, generator: torch.Generator
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random images at ``resolution = (width, height)``: ``(pixel_values [B, V, 3, T, T], targets
    [B, tiles, 3])``, the targets being each tile view's mean normalised colour (fp32, on the CPU)."""
    width, height = resolution
    grid = tile_grid(width, height, config)
    # a smooth colour field: a coarse random grid twice as fine as the tiles, upsampled, plus a little noise
    coarse = torch.rand(batch, 3, 2 * grid.n_rows, 2 * grid.n_cols, generator=generator)
    images = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    images = (images + 0.03 * torch.randn(images.shape, generator=generator)).clamp(0.0, 1.0)
    pixel_values, grid = prepare_images(images, resolution, config)
    targets = pixel_values[:, :grid.num_tiles].mean(dim=(-1, -2))  # [B, tiles, 3]
    return pixel_values, targets


def make_eval_set(config, resolution, size: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return make_batch(config, resolution, size, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------
def loss_of(model: nn.Module, head: TileColourHead, pixel_values: torch.Tensor, targets: torch.Tensor,
            dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    num_tiles = pixel_values.shape[1] - 1
    features = model(pixel_values.to(device=device, dtype=dtype))
    prediction = head(features, num_tiles).float()  # the loss is reduced in fp32 under bf16
    return F.mse_loss(prediction, targets.to(device))


@torch.no_grad()
def evaluate(model, head, eval_set, dtype, device, batch: int = 16) -> float:
    """Mean loss over ``eval_set`` in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    head.eval()
    pixel_values, targets = eval_set
    total = 0.0
    for start in range(0, pixel_values.shape[0], batch):
        chunk = slice(start, start + batch)
        total += loss_of(model, head, pixel_values[chunk], targets[chunk], dtype, device).item() * \
            pixel_values[chunk].shape[0]
    model.train(was_training)
    head.train(was_training)
    return total / pixel_values.shape[0]


@torch.no_grad()
def eval_features(model, pixel_values: torch.Tensor, dtype, device) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(pixel_values.to(device=device, dtype=dtype)).float().cpu()
    model.train(was_training)
    return out


def make_optimizer(model: nn.Module, head: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, two groups: the encoder's trainable parameters (LoRA + resampler) and the head."""
    encoder = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": encoder}, {"params": list(head.parameters())}], lr=lr,
                             weight_decay=weight_decay)


def stage_scheduler(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay over one stage, from the base lr to a tenth of it."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps)))


def parse_resolution(text: str) -> Tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"a resolution is WIDTHxHEIGHT, got {text!r}") from error
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"a resolution must be positive, got {text!r}")
    return width, height


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--stages", type=parse_resolution, nargs="+", default=None,
                   help="resolutions WxH in order (default: the preset's three)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto",
                   help="backend of the fused ops")
    p.add_argument("--steps-per-stage", type=int, default=None, help="optimizer steps per stage")
    p.add_argument("--batch-size", type=int, default=None, help="images per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--init", choices=["nearest", "mean", "fresh"], default="nearest",
                   help="initialisation of the new tiles' adapters")
    p.add_argument("--optimizer-update", choices=["rebuild", "extend"], default="rebuild",
                   help="rebuild_optimizer (a new AdamW, old state kept) or add_new_adapters_to_optimizer")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--eval-size", type=int, default=32, help="images of each stage's fixed evaluation set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (1 is fastest for the tiny preset on a busy CPU)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--metrics-out", type=Path, default=None, help="write the per-stage metrics as JSON here")
    p.add_argument("--out", type=Path, default=None, help="save_pretrained the grown encoder here")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    args.stages = args.stages or preset["stages"]
    args.steps_per_stage = args.steps_per_stage or preset["steps_per_stage"]
    args.batch_size = args.batch_size or preset["batch_size"]
    args.lr = args.lr or preset["lr"]
    for name in ("steps_per_stage", "batch_size", "grad_accum", "eval_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Runs every stage; returns the metrics (also written to ``--metrics-out``)."""
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    backend = None if args.backend == "auto" else args.backend

    first_width, first_height = args.stages[0]
    first_grid = tile_grid(first_width, first_height, MonkeyVisionConfig(**PRESETS[args.preset]["config"]))
    config = MonkeyVisionConfig(**{**PRESETS[args.preset]["config"], "lora_repeat_num": first_grid.num_adapters})
    torch.manual_seed(args.seed)  # random weights (none ship offline), the same for the same seed
    model = MonkeyVisionModel(config)
    trainable = set_trainable_(model)
    head = TileColourHead(config.output_dim, config.n_queries)
    model.to(device=device, dtype=dtype)
    head.to(device=device, dtype=dtype)
    patch_model(model, backend=backend)
    if args.gradient_checkpointing:
        # transformers v5 names it activation_checkpointing_enable (gradient_checkpointing_enable is deprecated)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.train()
    optimizer = make_optimizer(model, head, args.lr, args.weight_decay)

    from tqdm.auto import tqdm  # noqa: PLC0415

    total_steps = args.steps_per_stage * len(args.stages)
    progress = tqdm(total=total_steps, desc="progressive", disable=args.no_progress, unit="step")
    progress.write(f"{len(trainable)} trainable tensors; stages {['%dx%d' % s for s in args.stages]}, "
                   f"{args.dtype} on {device.type}, init={args.init}")
    data = torch.Generator().manual_seed(args.seed + 1)
    metrics = {"preset": args.preset, "dtype": args.dtype, "init": args.init, "stages": []}
    previous = None  # (grid, eval pixel_values, eval features) of the stage before
    for stage, resolution in enumerate(args.stages):
        started = time.perf_counter()
        grid = tile_grid(resolution[0], resolution[1], config)
        record = {"resolution": list(resolution), "grid": [grid.n_cols, grid.n_rows],
                  "num_adapters": grid.num_adapters}
        if previous is not None:
            old_grid, old_views, old_features = previous
            if grid.num_adapters < model.config.lora_repeat_num:
                raise ValueError(f"--stages must not go to fewer tiles: {resolution} is a {grid.n_cols}x"
                                 f"{grid.n_rows} grid, the model has {model.config.lora_repeat_num} adapters")
            # new tiles start from the adapter of the nearest old tile (or the mean / a fresh LoRA); the config
            # records the new lora_repeat_num and resolution
            report = grow_tile_adapters(model, grid.num_adapters, args.init, old_grid=old_grid, new_grid=grid,
                                        resolution=resolution)
            if args.optimizer_update == "rebuild":
                optimizer = rebuild_optimizer(optimizer, model)
            else:
                add_new_adapters_to_optimizer(optimizer, model)
            # growing keeps the trained adapters: the old tiles' outputs must not move
            after = eval_features(model, old_views, dtype, device)
            record["old_tiles_max_abs_diff"] = (after - old_features).abs().max().item()
            record["new_adapters"] = {str(k): list(v) for k, v in report.sources.items()}
            progress.write(f"stage {stage}: grew {report.old_num_adapters} -> {report.num_adapters} adapters "
                           f"({args.init}: {record['new_adapters']}); old tiles' outputs changed by "
                           f"{record['old_tiles_max_abs_diff']:.3g}")
        record["num_adapters"] = model.config.lora_repeat_num
        eval_set = make_eval_set(config, resolution, args.eval_size, seed=args.seed * 1000 + 7 + stage)
        record["start_loss"] = evaluate(model, head, eval_set, dtype, device)
        scheduler = stage_scheduler(optimizer, args.steps_per_stage)
        losses = []
        for _ in range(args.steps_per_stage):
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(args.grad_accum):
                pixel_values, targets = make_batch(config, resolution, args.batch_size, data)
                loss = loss_of(model, head, pixel_values, targets, dtype, device) / args.grad_accum
                loss.backward()
                step_loss += loss.item()
            if not math.isfinite(step_loss):
                raise RuntimeError(f"stage {stage}: the loss is not finite ({step_loss})")
            optimizer.step()
            scheduler.step()
            losses.append(step_loss)
            progress.update(1)
            progress.set_postfix(stage=f"{resolution[0]}x{resolution[1]}", loss=f"{step_loss:.4f}")
        record["end_loss"] = evaluate(model, head, eval_set, dtype, device)
        record["train_losses"] = losses
        record["seconds"] = time.perf_counter() - started
        progress.write(f"stage {stage} {resolution[0]}x{resolution[1]} (grid {grid.n_cols}x{grid.n_rows}, "
                       f"{record['num_adapters']} adapters): eval loss {record['start_loss']:.4f} -> "
                       f"{record['end_loss']:.4f} in {record['seconds']:.1f} s")
        metrics["stages"].append(record)
        previous = (grid, eval_set[0], eval_features(model, eval_set[0], dtype, device))
    progress.close()
    metrics["config"] = {"lora_repeat_num": model.config.lora_repeat_num,
                         "image_size": model.config.image_size,
                         "image_resolution": model.config.image_resolution}
    if args.out is not None:
        model.save_pretrained(args.out)
        torch.save(head.state_dict(), args.out / "tile_colour_head.pt")
        print(f"encoder written to {args.out} (MonkeyVisionModel.from_pretrained loads it)")
    if args.metrics_out is not None:
        args.metrics_out.write_text(json.dumps(metrics, indent=1))
    return metrics


if __name__ == "__main__":
    result = main()
    sys.exit(0 if all(s["end_loss"] < s["start_loss"] for s in result["stages"]) else 1)
