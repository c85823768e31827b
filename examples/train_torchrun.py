"""Distributed training of a patched Monkey vision encoder under ``torchrun`` (DDP or FSDP2).

One process per GPU (NCCL), or per CPU process (gloo)::

    torchrun --nproc_per_node 8 examples/train_torchrun.py --engine fsdp2 --preset release --bf16 \\
        --gradient-checkpointing --steps 100 --batch-size 1 --out checkpoints/monkey
    torchrun --nproc_per_node 2 examples/train_torchrun.py --engine ddp --preset tiny --device cpu --steps 5

What every rank does:

1. initialises the process group (``nccl`` on CUDA, ``gloo`` on CPU);
2. builds the model from a config with a fixed seed, so every rank holds the same random weights (no weights
   are available offline), and freezes it like the Monkey recipe: only parameters whose name contains
   ``"lora"`` (``lora_a``, ``lora_b`` AND the learnable ``lora_scale``) train, plus the resampler
   (``attn_pool``) unless ``--lora-only``;
3. ``patch_model`` (one batched encoder pass over every tile and the global view, fused multi-LoRA linears);
4. wraps it with ``DistributedDataParallel`` or FSDP2 (``fully_shard`` on every block, then on the root);
5. trains with AdamW on a synthetic dataset (images made on the fly from their index, split over the ranks by a
   ``DistributedSampler``), tqdm on rank 0, and saves a ``from_pretrained``-loadable checkpoint on rank 0.

Mixed precision, two ways. ``--amp``: ``torch.autocast(bfloat16)`` around the forward over fp32 weights (what the
HF ``Trainer``'s ``bf16=True`` does; the fused ops cast under autocast as ``nn.Linear`` does), with DDP or FSDP2,
on CUDA or CPU. ``--bf16`` (CUDA): with FSDP2 the weights are gathered in bf16 for compute (fp32 master weights,
gradients reduced in fp32: ``MixedPrecisionPolicy``); with DDP the model is cast to bf16, as the release trains.

The functions ``build_model``, ``SyntheticImages``, ``make_batch``, ``compute_loss``, ``wrap_ddp`` and
``wrap_fsdp2`` are reused by ``tests/dist_grad_check.py``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

try:
    import monkey_kernels  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monkey_kernels import patch_model
from monkey_kernels.models import MonkeyVisionConfig, MonkeyVisionModel, prepare_images
from monkey_kernels.ops.backends import BACKENDS

PRESETS: Dict[str, Dict] = {
    # Small enough for a 2-process CPU test: width 32, 2 layers, 28 px tiles (2x2 patches of 14 px).
    "tiny": dict(tile_size=28, image_size=56, patch_size=14, width=32, layers=2, heads=2, mlp_ratio=2,
                 num_positions=4, n_queries=4, output_dim=16, resampler_heads=2, lora_repeat_num=4,
                 attn_lora_rank=4, mlp_lora_rank=8, lora_dropout=0.05),
    # The CPU benchmark's config: width 128, 4 layers, 112 px tiles.
    "small": dict(tile_size=112, image_size=224, patch_size=14, width=128, layers=4, heads=4, mlp_ratio=4,
                  num_positions=64, n_queries=16, output_dim=64, resampler_heads=4, lora_repeat_num=4,
                  attn_lora_rank=8, mlp_lora_rank=16),
    # The released encoder (ViT-bigG, 48 layers, 448 px tiles): GPUs only.
    "release": dict(),
}


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------
def make_config(preset: str = "tiny", **overrides) -> MonkeyVisionConfig:
    """A ``MonkeyVisionConfig`` from a preset name (``tiny``, ``small``, ``release``) and overrides."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    values = dict(PRESETS[preset])
    values.update(overrides)
    return MonkeyVisionConfig(**values)


def set_trainable_(model: nn.Module, train_resampler: bool = True) -> List[str]:
    """The Monkey recipe: every parameter whose name contains ``"lora"`` trains (so ``lora_scale`` too), and the
    resampler ``attn_pool`` when ``train_resampler``; everything else is frozen. Returns the trainable names."""
    names = []
    for name, p in model.named_parameters():
        # attn_pool.pos_embed is a fixed sin-cos table (frozen in the release): it stays frozen.
        train = "lora" in name or (train_resampler and name.startswith("attn_pool.") and name != "attn_pool.pos_embed")
        p.requires_grad_(train)
        if train:
            names.append(name)
    return names


def build_model(config: MonkeyVisionConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                device="cpu", train_resampler: bool = True, patch: bool = True,
                backend: Optional[str] = None) -> MonkeyVisionModel:
    """A randomly initialised ``MonkeyVisionModel`` (the same weights on every rank for the same ``seed``), frozen
    by :func:`set_trainable_`, moved to ``device`` / ``dtype`` and patched (``backend``: the fused ops' backend,
    ``None`` = automatic) unless ``patch=False``."""
    # Weights come from the default generator: seeding it here makes every rank (and the single-process
    # reference of the tests) build the same model regardless of what ran before.
    torch.manual_seed(seed)
    model = MonkeyVisionModel(config)
    set_trainable_(model, train_resampler)
    model.to(device=device, dtype=dtype)
    if patch:
        patch_model(model, backend=backend)
    return model


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
class SeededImageDataset(Dataset):
    """``length`` synthetic items for a Monkey encoder of ``config``, item ``i`` a pure function of ``(seed, i)``
    (the same on every rank and every epoch): subclasses build it in ``make_item`` from the generator seeded here."""

    def __init__(self, config: MonkeyVisionConfig, length: int, seed: int, dtype: torch.dtype) -> None:
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.config, self.length, self.seed, self.dtype = config, length, seed, dtype

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        return self.make_item(index, torch.Generator().manual_seed(self.seed * 1_000_003 + index))

    def make_item(self, index: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


class SyntheticImages(SeededImageDataset):
    """``length`` synthetic images, each a pure function of ``(seed, index)``, prepared for the encoder.

    Item ``i`` is ``{"pixel_values": [V, 3, T, T], "target": [output_dim]}`` where ``V = tiles + 1`` views of a
    ``resolution = (width, height)`` image (see ``prepare_images``), and ``target`` a random feature vector the
    mean-pooled encoder output regresses to: a synthetic objective whose only purpose is to exercise training."""

    def __init__(self, config: MonkeyVisionConfig, length: int, resolution: Optional[Sequence[int]] = None,
                 seed: int = 1234, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(config, length, seed, dtype)
        side = config.image_size
        self.resolution = tuple(resolution) if resolution is not None else (side, side)

    def make_item(self, index: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        width, height = self.resolution
        # A smooth random image (low-resolution noise upsampled) rather than white noise: closer to real images.
        coarse = torch.rand(1, 3, max(1, height // 8), max(1, width // 8), generator=generator)
        image = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
        pixel_values, _ = prepare_images(image, resolution=self.resolution, config=self.config)
        target = torch.randn(self.config.output_dim, generator=generator)
        return {"pixel_values": pixel_values[0].to(self.dtype), "target": target.to(self.dtype)}


def make_batch(dataset: Dataset, indices: Iterable[int], device="cpu") -> Dict[str, torch.Tensor]:
    """The items ``indices`` of ``dataset`` stacked: ``pixel_values [B, V, 3, T, T]``, ``target [B, D]``."""
    items = [dataset[int(i)] for i in indices]
    return {key: torch.stack([item[key] for item in items]).to(device) for key in items[0]}


def compute_loss(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared error between the mean-pooled features ``[B, D]`` and ``batch["target"]`` (a mean over the
    batch, so the average of equal-sized shards' losses is the global batch's loss)."""
    features = model(batch["pixel_values"])  # [B, V * Q, D]
    # Half-precision features are reduced in fp32; fp32 / fp64 stay as they are (the tests run fp64).
    pooled = features.to(torch.promote_types(features.dtype, torch.float32)).mean(dim=1)
    return F.mse_loss(pooled, batch["target"].to(pooled.dtype))


# ---------------------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------------------
def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` over the trainable parameters (frozen ones are not synchronised). Every
    trainable parameter gets a gradient each step (the fused blocks stack all adapters of a list), so no
    ``find_unused_parameters`` pass is needed."""
    from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def wrap_fsdp2(model: MonkeyVisionModel, mp_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """FSDP2: ``fully_shard`` every encoder block (one all-gather / reduce-scatter per block), then the root
    (conv, positions, resampler, projection). ``mp_dtype``: compute dtype of the gathered weights (gradients are
    reduced in fp32). Sharding happens in place; ``model`` is returned with its class swapped by FSDP."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: PLC0415

    policy = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32) if mp_dtype else \
        MixedPrecisionPolicy()
    for block in model.transformer.resblocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) else model


def full_state_dict(model: nn.Module, engine: str) -> Dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU; a collective under FSDP2 (call it on every rank)."""
    if engine == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: PLC0415

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def save_checkpoint(model: nn.Module, engine: str, out: Path, rank: int) -> None:
    """Writes ``config.json`` + ``model.safetensors`` (``MonkeyVisionModel.from_pretrained(out)`` loads it) on
    rank 0; every rank must call it (FSDP2 gathers the shards)."""
    state = full_state_dict(model, engine)
    if rank == 0:
        from safetensors.torch import save_file  # noqa: PLC0415

        out.mkdir(parents=True, exist_ok=True)
        unwrap(model).config.save_pretrained(out)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", choices=["ddp", "fsdp2"], default="ddp")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: CUDA with NCCL when available, else CPU with gloo")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=2, help="images per rank and step")
    p.add_argument("--resolution", default=None, help="WxH of the synthetic images (default: config.image_size)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--bf16", action="store_true", help="bf16 compute (CUDA): see the module docstring")
    p.add_argument("--amp", action="store_true", help="torch.autocast(bfloat16) over fp32 weights")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora-only", action="store_true", help="freeze the resampler too")
    p.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto", help="fused ops' backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="checkpoint directory (written by rank 0)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        raise ValueError("--steps and --batch-size must be >= 1")
    if args.amp and args.bf16:
        raise ValueError("--amp and --bf16: choose one (autocast over fp32 weights, or bf16 weights / FSDP2 policy)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> float:
    """Trains; returns the last step's loss averaged over the ranks."""
    args = parse_args(argv)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ:
        raise RuntimeError("run me under torchrun: torchrun --nproc_per_node N examples/train_torchrun.py ...")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if args.bf16 and not use_cuda:
        raise ValueError("--bf16 needs CUDA (bf16 GEMMs on CPU are slow and not what this example targets)")

    config = make_config(args.preset)
    backend = None if args.backend == "auto" else args.backend
    # DDP + bf16 trains bf16 weights like the release; FSDP2 + bf16 keeps fp32 master weights.
    weight_dtype = torch.bfloat16 if args.bf16 and args.engine == "ddp" else torch.float32
    model = build_model(config, seed=args.seed, dtype=weight_dtype, device=device,
                        train_resampler=not args.lora_only, backend=backend)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()  # transformers' name since v5 (gradient_checkpointing_enable)
    model.train()
    if args.engine == "ddp":
        wrapped = wrap_ddp(model, device)
    else:
        # FSDP2 warns that blocks return views (a reshape): harmless, nothing writes into them in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        wrapped = wrap_fsdp2(model, torch.bfloat16 if args.bf16 else None)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)

    resolution = tuple(int(v) for v in args.resolution.lower().split("x")) if args.resolution else None
    data_dtype = torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float32
    dataset = SyntheticImages(config, length=max(args.steps * args.batch_size * world, world),
                              resolution=resolution, seed=args.seed + 1, dtype=data_dtype)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    progress = None
    if rank == 0:
        from tqdm.auto import tqdm  # noqa: PLC0415

        progress = tqdm(total=args.steps, desc=f"{args.engine} x{world} ({device.type})")
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        progress.write(f"trainable parameters: {n_train} (global, before sharding)")
    step, last = 0, math.nan
    epoch = 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                loss = compute_loss(wrapped, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            reduced = loss.detach().float().clone()
            dist.all_reduce(reduced)
            last = reduced.item() / world
            if not math.isfinite(last):
                raise RuntimeError(f"loss is not finite at step {step}: {last}")
            step += 1
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{last:.5f}")
            if step >= args.steps:
                break
        epoch += 1
    if progress is not None:
        progress.close()
    if args.out is not None:
        save_checkpoint(wrapped, args.engine, args.out, rank)
        if rank == 0:
            print(f"checkpoint written to {args.out} (MonkeyVisionModel.from_pretrained loads it)")
    dist.barrier()
    dist.destroy_process_group()
    return last


if __name__ == "__main__":
    sys.exit(0 if math.isfinite(main()) else 1)
