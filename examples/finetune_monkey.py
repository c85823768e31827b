"""Fine-tune a Monkey VLM loaded with ``trust_remote_code``, Monkey's own recipe plus ONE line: ``patch_model(model)``.

The release fine-tunes with ``finetune_multitask.py``: the Hugging Face ``Trainer`` under torchrun, DeepSpeed ZeRO-2
(``finetune/ds_config_zero2.json``, shipped here as ``examples/ds_config_zero2.json``), ``--bf16``,
``--gradient_checkpointing``, ``--fix_vit`` and optionally ``--use_lora``. This script takes the same options
(every ``transformers.TrainingArguments`` option, parsed by ``HfArgumentParser``) and the same data format::

    torchrun --nproc_per_node 8 examples/finetune_monkey.py --model_name_or_path echo840/Monkey \\
        --data_path train.json --output_dir output_model --bf16 True --fix_vit True \\
        --per_device_train_batch_size 1 --gradient_accumulation_steps 16 --learning_rate 1e-5 \\
        --weight_decay 0.1 --adam_beta2 0.95 --warmup_ratio 0.02 --lr_scheduler_type cosine \\
        --gradient_checkpointing --deepspeed examples/ds_config_zero2.json
    torchrun --nproc_per_node 8 examples/finetune_monkey.py ... --fsdp2      # FSDP2 instead of DeepSpeed
    python examples/finetune_monkey.py ... --use_cpu True --no_patch         # the unpatched model, to compare

``train.json`` is a list of ``{"conversations": [{"from": "user", "value": "<img>path</img> question"},
{"from": "assistant", "value": "answer"}, ...]}``; assistant turns are the labels (each followed by the
end-of-text token), everything else is masked with -100. Batches are padded to their longest sample.

Options beyond the ``Trainer``'s:

- ``--fix_vit`` (default True, as the release): the vision tower frozen except every parameter whose name contains
  ``"lora"`` (Monkey's per-window adapters, ``lora_scale`` included) and the resampler ``attn_pool`` (all of it,
  its ``pos_embed`` table too, as the release's ``attn_pool.requires_grad_(True)`` does); the language model
  trains fully. Ignored with ``--use_lora``, as in the release.
- ``--use_lora``: a PEFT LoRA (``--lora_r 16 --lora_alpha 32 --lora_dropout 0.05``, the release's values) on the
  language model's linears named in ``--lora_target_modules`` (default: Qwen's ``c_attn c_proj w1 w2``), matched
  only under ``transformer.h`` so the vision tower's ``mlp.c_proj`` stays out. PEFT then freezes every parameter
  whose name lacks ``"lora_"``: the vision tower's own LoRA adapters keep training, the resampler does not. (The
  release's default targets ``in_proj out_proj c_fc`` are the vision tower's module names, not the LM's.)
- ``--fsdp2``: FSDP2 through the ``Trainer`` (``fsdp="full_shard auto_wrap"``, ``fsdp_version`` 2, one unit per
  Qwen block), GPUs only: accelerate enables FSDP for accelerator devices, on CPU it would run DDP, so the script
  refuses (``examples/train_torchrun.py --engine fsdp2`` shards the encoder with FSDP2 on CPU too).
- ``--no_patch``: skip ``patch_model`` (the reference run); ``--backend``: the fused ops' backend.

On a machine without CUDA (``--use_cpu True``) with ``--deepspeed``: DeepSpeed's CPU accelerator with gloo, the
config's optimizer switched to DeepSpeed's torch AdamW (``"torch_adam": true``) and the shared-memory allreduce op
skipped: both are C++ ops DeepSpeed would otherwise JIT-compile on first use (minutes).

``--bf16`` without DeepSpeed is ``torch.autocast`` over fp32 master weights (the fused ops cast like ``nn.Linear``);
with DeepSpeed it is DeepSpeed's bf16 (the model cast to bf16, fp32 master weights in the optimizer).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

try:
    import monkey_kernels  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer  # noqa: E402

from monkey_kernels import patch_model  # noqa: E402

IGNORE_INDEX = -100


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "a Monkey checkpoint (loaded with trust_remote_code)"})
    patch: bool = field(default=True, metadata={"help": "patch_model(model); --no_patch for the reference run"})
    backend: Optional[str] = field(default=None, metadata={"help": "the fused ops' backend (default: automatic)"})


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "JSON list of {'conversations': [{'from', 'value'}, ...]}"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=2048, metadata={"help": "longest sample in tokens (longer: an error)"})
    fix_vit: bool = field(default=True, metadata={"help": "freeze the ViT except its LoRA and attn_pool"})
    use_lora: bool = field(default=False, metadata={"help": "a PEFT LoRA on the language model"})
    fsdp2: bool = field(default=False, metadata={"help": "FSDP2 through the Trainer instead of DeepSpeed"})


@dataclass
class LoraArguments:
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: List[str] = field(default_factory=lambda: ["c_attn", "c_proj", "w1", "w2"])


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
class ConversationDataset(Dataset):
    """Monkey's conversation JSON, tokenized on access: ``{"input_ids", "labels"}`` (int64 ``[L]``); the labels are
    the assistant turns (each followed by ``eod_id``), -100 elsewhere."""

    def __init__(self, data_path: str, tokenizer, max_length: int, eod_id: int) -> None:
        with open(data_path) as f:
            self.items = json.load(f)
        if not isinstance(self.items, list) or not self.items:
            raise ValueError(f"data_path: {data_path} must hold a non-empty JSON list of conversations")
        self.tokenizer, self.max_length, self.eod_id = tokenizer, max_length, eod_id

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        input_ids: List[int] = []
        labels: List[int] = []
        for turn in self.items[index]["conversations"]:
            ids = self.tokenizer(turn["value"]).input_ids
            if turn["from"] == "assistant":
                ids = ids + [self.eod_id]
                labels += ids
            else:
                labels += [IGNORE_INDEX] * len(ids)
            input_ids += ids
        if len(input_ids) > self.max_length:
            # Truncating could cut an image span in two, which the model cannot read.
            raise ValueError(f"sample {index} has {len(input_ids)} tokens, more than --model_max_length "
                             f"{self.max_length}")
        return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}


def make_collator(pad_id: int):
    """Right-pads a list of samples to the longest: ``input_ids`` with ``pad_id``, ``labels`` with -100, and the
    ``attention_mask``."""

    def collate(samples: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        length = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, s in enumerate(samples):
            n = len(s["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = s["input_ids"], s["labels"], 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------
def fix_vit_(model: torch.nn.Module) -> None:
    """The release's ``--fix_vit``: the vision tower frozen, then its ``attn_pool`` and every parameter whose name
    contains ``"lora"`` trainable again; the rest of the model is left as it is (trainable)."""
    visual = model.transformer.visual
    visual.requires_grad_(False)
    if hasattr(visual, "attn_pool"):
        visual.attn_pool.requires_grad_(True)
    for name, p in model.named_parameters():
        if "lora" in name:
            p.requires_grad_(True)


def add_language_lora(model: torch.nn.Module, lora_args: LoraArguments, gradient_checkpointing: bool):
    """A PEFT LoRA on the language model's ``lora_target_modules`` (only modules under ``transformer.h``)."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    names = "|".join(re.escape(n) for n in lora_args.lora_target_modules)
    config = LoraConfig(r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
                        target_modules=rf"transformer\.h\.\d+\.(?:.*\.)?(?:{names})", bias="none",
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    if gradient_checkpointing:
        # As the release: the embeddings are frozen, so a reentrant checkpoint would see no input needing grad.
        model.enable_input_require_grads()
    return model


def cpu_deepspeed_config(path: str, output_dir: str) -> str:
    """``path`` with DeepSpeed's torch AdamW (no FusedAdam JIT build), written next to the outputs; also skips
    DeepSpeed's shared-memory allreduce op (another JIT build; gloo does the reductions)."""
    import deepspeed  # noqa: PLC0415

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    with open(path) as f:
        config = json.load(f)
    if "optimizer" in config:
        config["optimizer"].setdefault("params", {})["torch_adam"] = True
    os.makedirs(output_dir, exist_ok=True)
    # Every rank writes the same file: each to its own temporary name, then an atomic rename.
    handle, tmp_path = tempfile.mkstemp(prefix=".ds_config_cpu_", suffix=".json", dir=output_dir)
    with os.fdopen(handle, "w") as f:
        json.dump(config, f, indent=2)
    cpu_path = os.path.join(output_dir, "ds_config_cpu.json")
    os.replace(tmp_path, cpu_path)
    return cpu_path


def parse(argv: Optional[Sequence[str]] = None):
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, LoraArguments))
    model_args, data_args, training_args, lora_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.fsdp2 and training_args.deepspeed:
        raise ValueError("--fsdp2 and --deepspeed: choose one")
    if training_args.fsdp2 and (training_args.use_cpu or not torch.cuda.is_available()):
        # accelerate turns FSDP on for accelerator devices only: on CPU the Trainer would silently run DDP.
        raise ValueError("--fsdp2: the Trainer shards with FSDP on GPUs only (on CPU accelerate runs DDP instead); "
                         "for FSDP2 on CPU use examples/train_torchrun.py --engine fsdp2")
    changes = {}
    if training_args.deepspeed and not torch.cuda.is_available() and isinstance(training_args.deepspeed, str):
        changes["deepspeed"] = cpu_deepspeed_config(training_args.deepspeed, training_args.output_dir)
    if training_args.fsdp2:
        changes["fsdp"] = "full_shard auto_wrap"
        changes["fsdp_config"] = {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["QWenBlock"],
                                  "activation_checkpointing": False}
    if changes:
        # TrainingArguments resolves DeepSpeed / FSDP in __post_init__: rebuild them with the changes.
        training_args = dataclasses.replace(training_args, **changes)
    return model_args, data_args, training_args, lora_args


def main(argv: Optional[Sequence[str]] = None) -> float:
    """Trains; returns the mean training loss."""
    model_args, data_args, training_args, lora_args = parse(argv)
    is_main = training_args.process_index == 0

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, trust_remote_code=True,
                                              padding_side="right")
    eod_id = getattr(tokenizer, "eod_id", None)
    eod_id = tokenizer.eos_token_id if eod_id is None else eod_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eod_id
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, trust_remote_code=True)
    model.config.use_cache = False
    if "num_items_in_batch" not in inspect.signature(model.forward).parameters:
        # The model's loss is a mean over its micro batch: without this, a forward(**kwargs) makes the Trainer
        # skip the division by the accumulation steps (gradients x accumulation x processes).
        model.accepts_loss_kwargs = False
    if training_args.use_lora:
        model = add_language_lora(model, lora_args, training_args.gradient_checkpointing)
    elif training_args.fix_vit:
        fix_vit_(model)

    if model_args.patch:
        report = patch_model(model, backend=model_args.backend)  # the one line this recipe adds
        if is_main:
            print(report)
    if is_main:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"trainable params: {trainable} of {total} ({100 * trainable / total:.2f} %)")

    dataset = ConversationDataset(data_args.data_path, tokenizer, training_args.model_max_length, eod_id)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=make_collator(pad_id))
    result = trainer.train()
    if is_main:
        print(f"engine: {trainer.accelerator.distributed_type.value}, {training_args.world_size} process(es), "
              f"mixed precision: {trainer.accelerator.mixed_precision}")
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    if is_main:
        print(f"train loss {result.training_loss:.4f}; saved to {training_args.output_dir}")
    return result.training_loss


if __name__ == "__main__":
    sys.exit(0 if math.isfinite(main()) else 1)
