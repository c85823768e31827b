"""The Hugging Face ``Trainer`` trains a patched Monkey vision encoder (LoRA recipe) with a small classifier head.

    python examples/train_with_trainer.py --preset tiny --steps 20 --out runs/trainer      # CPU
    python examples/train_with_trainer.py --preset release --bf16 --gradient-checkpointing --batch-size 1 \\
        --steps 1000 --out runs/monkey-cls                                                 # one GPU
    torchrun --nproc_per_node 8 examples/train_with_trainer.py ...                          # Trainer's own DDP

``MonkeyVisionForImageClassification`` is a real ``PreTrainedModel`` (so ``Trainer`` saves it with
``save_pretrained`` and it reloads with ``from_pretrained``): the encoder under ``visual`` (a
``MonkeyVisionModel``, the release's state-dict names behind the ``visual.`` prefix), mean-pooled features, a
linear ``classifier``, and ``{"loss", "logits"}`` out. Only the LoRA parameters (``lora_a``, ``lora_b``,
``lora_scale``), the resampler and the head train. The task is synthetic: an image's label is the colour channel
it is tinted with, so the loss can actually fall.

Mixed precision, two ways: ``--amp`` is ``TrainingArguments(bf16=True)``, i.e. ``torch.autocast`` over fp32 master
weights (what most Trainer users run; the fused ops cast under autocast like ``nn.Linear``); ``--bf16`` casts the
model itself to bf16 (bf16 weights, as the release trains under DeepSpeed).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_torchrun as tr  # noqa: E402  (make_config, set_trainable_, PRESETS; it also makes the repo importable)

from transformers import Trainer, TrainingArguments  # noqa: E402
from transformers.modeling_outputs import ImageClassifierOutput  # noqa: E402

from monkey_kernels import patch_model  # noqa: E402
from monkey_kernels.models import MonkeyVisionConfig, MonkeyVisionModel, prepare_images  # noqa: E402
from monkey_kernels.models.monkey_vision import MonkeyVisionPreTrainedModel  # noqa: E402
from monkey_kernels.ops.backends import BACKENDS  # noqa: E402


class MonkeyVisionForImageClassification(MonkeyVisionPreTrainedModel):
    """``pixel_values [B, V, 3, T, T]`` (``V = tiles + 1`` views) -> ``logits [B, num_labels]``, and the
    cross-entropy ``loss`` when ``labels [B]`` are given."""

    # The loss is a mean over this micro batch, and ``forward`` ignores ``num_items_in_batch``. Without this flag
    # the ``Trainer`` sees ``**kwargs``, assumes the model normalises by the global item count itself, and then
    # neither divides the loss by the accumulation steps nor undoes its mean over the processes: gradients (and
    # logged losses) come out ``gradient_accumulation_steps x world_size`` times too large.
    accepts_loss_kwargs = False

    def __init__(self, config: MonkeyVisionConfig) -> None:
        super().__init__(config)
        self.visual = MonkeyVisionModel(config)
        self.classifier = nn.Linear(config.output_dim, config.num_labels)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None, **kwargs):
        features = self.visual(pixel_values)  # [B, V * Q, D]
        logits = self.classifier(features.mean(dim=1))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def set_trainable_(model: MonkeyVisionForImageClassification, train_resampler: bool = True) -> None:
    """The Monkey recipe on the encoder (see ``train_torchrun.set_trainable_``) plus the new head."""
    tr.set_trainable_(model.visual, train_resampler)
    model.classifier.requires_grad_(True)


def build_classifier(config: MonkeyVisionConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     backend: Optional[str] = None, train_resampler: bool = True, patch: bool = True):
    """Random weights from ``seed`` (no released weights offline), frozen by the recipe, cast, then patched
    (``patch=False``: the reference model, for comparisons; the report is then ``None``)."""
    torch.manual_seed(seed)
    model = MonkeyVisionForImageClassification(config)
    set_trainable_(model, train_resampler)
    model.to(dtype=dtype)
    report = patch_model(model, backend=backend) if patch else None
    return model, report


class TintedImages(tr.SeededImageDataset):
    """``length`` synthetic images; image ``i`` has label ``i % num_labels`` and is tinted towards colour channel
    ``label`` (``num_labels <= 3``). Items: ``{"pixel_values": [V, 3, T, T], "labels": int64 []}``."""

    def __init__(self, config: MonkeyVisionConfig, length: int, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
        if not 1 <= config.num_labels <= config.num_channels:
            raise ValueError(f"config.num_labels must be in [1, {config.num_channels}], got {config.num_labels}")
        super().__init__(config, length, seed, dtype)

    def make_item(self, index: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        side = self.config.image_size
        label = index % self.config.num_labels
        image = 0.6 * torch.rand(3, side, side, generator=generator)
        image[label] += 0.4
        pixel_values, _ = prepare_images(image, config=self.config)
        return {"pixel_values": pixel_values[0].to(self.dtype), "labels": torch.tensor(label)}


def make_trainer(model, dataset: Dataset, out: Path, *, steps: int, batch_size: int, lr: float,
                 gradient_checkpointing: bool = False, use_cpu: Optional[bool] = None, seed: int = 0,
                 logging_steps: int = 1, save: bool = False, amp: bool = False,
                 gradient_accumulation_steps: int = 1, **extra_args) -> Trainer:
    """A ``Trainer`` for ``steps`` optimizer steps of AdamW at a constant ``lr`` (no weight decay: it would pull
    ``lora_scale`` towards 0), each over ``batch_size x gradient_accumulation_steps`` images per process.
    ``save``: write Trainer checkpoints to ``out`` at the end (else none). ``amp``: ``bf16=True`` (autocast over
    the fp32 weights). ``extra_args``: more ``TrainingArguments`` (e.g. ``deepspeed=``), or other values for
    the defaults set here."""
    if use_cpu is None:
        use_cpu = not torch.cuda.is_available()
    options = dict(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        bf16=amp,
        learning_rate=lr,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=logging_steps,
        save_strategy="steps" if save else "no",
        save_steps=steps,
        report_to=[],
        use_cpu=use_cpu,
        seed=seed,
        dataloader_num_workers=0,
        activation_checkpointing=gradient_checkpointing,
        # Under torchrun: every trainable parameter gets a gradient each step (the fused blocks stack all
        # adapters of a list), so DDP's search for unused parameters is wasted work.
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )
    options.update(extra_args)  # the caller's TrainingArguments win over these defaults
    args = TrainingArguments(**options)
    return Trainer(model=model, args=args, train_dataset=dataset)


def main(argv: Optional[Sequence[str]] = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(tr.PRESETS), default="tiny")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--images", type=int, default=64, help="size of the synthetic dataset")
    p.add_argument("--bf16", action="store_true", help="bf16 weights (see the module docstring)")
    p.add_argument("--amp", action="store_true", help="TrainingArguments(bf16=True): autocast over fp32 weights")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora-only", action="store_true", help="freeze the resampler too")
    p.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/trainer"))
    args = p.parse_args(argv)

    config = tr.make_config(args.preset, num_labels=3)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model, report = build_classifier(config, seed=args.seed, dtype=dtype, train_resampler=not args.lora_only,
                                     backend=None if args.backend == "auto" else args.backend)
    print(report)
    dataset = TintedImages(config, args.images, seed=args.seed + 1, dtype=dtype)
    trainer = make_trainer(model, dataset, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
                           logging_steps=max(1, args.steps // 10), amp=args.amp,
                           gradient_accumulation_steps=args.gradient_accumulation_steps)
    result = trainer.train()
    trainer.save_model(str(args.out / "final"))
    if trainer.is_world_process_zero():
        print(f"train loss {result.training_loss:.4f}; model saved to {args.out / 'final'} "
              "(MonkeyVisionForImageClassification.from_pretrained loads it)")
    return result.training_loss


if __name__ == "__main__":
    sys.exit(0 if math.isfinite(main()) else 1)
