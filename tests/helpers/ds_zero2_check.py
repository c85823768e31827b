"""Worker of ``tests/models/test_deepspeed.py``, launched by ``torch.distributed.run`` (2 ranks, CPU, gloo).

Monkey's fine-tuning recipe on the repository's Monkey classifier (``examples/train_with_trainer.py``): the HF
``Trainer`` with DeepSpeed ZeRO-2 from ``examples/ds_config_zero2.json`` (Monkey's ``finetune/ds_config_zero2.json``:
overlap_comm, contiguous_gradients, reduce_scatter, bf16 "auto", AdamW + WarmupLR with "auto" values the
Trainer fills), gradient checkpointing, gradient accumulation 2, 1 image per rank and micro step. For each case
(``{patched,unpatched}_{bf16,fp32}``) every rank builds the same model from one seed, trains ``STEPS`` steps on
the same images, and rank 0 writes ``{case}.pt``: ``{"losses", "grad_norms", "initial", "master", "frozen_changed",
"dtype"}`` (``master``: the fp32 master copy of every trainable parameter, gathered with
``deepspeed.utils.safe_get_full_fp32_param``). A case that fails writes ``{"error": ...}`` instead.

Two settings keep a launch at ~10-20 s on a CPU machine instead of minutes: DeepSpeed's shared-memory allreduce
op is marked incompatible (it would be JIT-compiled on first use; gloo does the reductions anyway), and the
optimizer is DeepSpeed's torch AdamW (``"torch_adam": true``) instead of FusedAdam, another JIT-compiled op.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

import train_with_trainer as twt  # noqa: E402

CASES = ("patched_bf16", "unpatched_bf16", "patched_fp32", "unpatched_fp32")
STEPS = 4  # WarmupLR with the Trainer's warmup_steps=1 runs the first step at lr 0
LR = 1e-2
SEED = 11


def ds_config() -> dict:
    """``examples/ds_config_zero2.json`` with DeepSpeed's torch AdamW instead of the JIT-built FusedAdam."""
    config = json.loads((ROOT / "examples" / "ds_config_zero2.json").read_text())
    config["optimizer"]["params"]["torch_adam"] = True
    return config


def build(patch: bool):
    """The tiny classifier, no dropout (patched and unpatched draw their masks differently), a random ``lora_b``
    (Monkey starts it at zeros, which zeroes the first ``lora_a`` / ``lora_scale`` gradients)."""
    config = twt.tr.make_config("tiny", num_labels=3, lora_dropout=0.0)
    model, _ = twt.build_classifier(config, seed=SEED, backend="torch", patch=patch)
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return config, model


def run_case(case: str, out: Path) -> None:
    import torch.distributed as dist  # noqa: PLC0415
    from deepspeed.utils import safe_get_full_fp32_param  # noqa: PLC0415

    patch, bf16 = case.startswith("patched"), case.endswith("bf16")
    config, model = build(patch)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    trainer = twt.make_trainer(
        model, twt.TintedImages(config, length=4 * STEPS, seed=SEED + 2), out / f"{case}_run", steps=STEPS,
        batch_size=1, lr=LR, use_cpu=True, amp=bf16, gradient_accumulation_steps=2, gradient_checkpointing=True,
        deepspeed=ds_config(), ddp_backend="gloo", weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
        warmup_steps=1, train_sampling_strategy="sequential", disable_tqdm=True)
    trainer.train()
    engine = trainer.model_wrapped
    module = engine.module
    # Collectives: every rank gathers its partitions of the fp32 master weights.
    master = {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in module.named_parameters()
              if p.requires_grad}
    if dist.get_rank() == 0:
        logs = [e for e in trainer.state.log_history if "loss" in e]
        frozen_changed = [n for n, p in module.named_parameters() if n not in trainable
                          and not torch.equal(p.detach().float(), initial[n].to(p.dtype).float())]
        torch.save({"losses": [e["loss"] for e in logs], "grad_norms": [e["grad_norm"] for e in logs],
                    "initial": {n: initial[n] for n in trainable}, "master": master,
                    "frozen_changed": frozen_changed, "dtype": next(module.parameters()).dtype,
                    "engine": type(engine).__name__, "checkpointing": all(
                        b.gradient_checkpointing for b in module.visual.transformer.resblocks)},
                   out / f"{case}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    import deepspeed  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    # No JIT build of DeepSpeed's shared-memory allreduce (see the module docstring).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    for case in args.cases.split(","):
        if case not in CASES:
            raise ValueError(f"--cases: unknown case {case!r}; known: {CASES}")
        try:
            run_case(case, args.out)
        except Exception:  # the test reports the exact error of a case that cannot run
            if not dist.is_initialized() or dist.get_rank() == 0:
                torch.save({"error": traceback.format_exc()}, args.out / f"{case}.pt")
            raise
    # A clean exit: without it a rank occasionally aborted at interpreter exit after finishing.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
