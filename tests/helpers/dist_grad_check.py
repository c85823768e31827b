"""Worker of ``tests/models/test_distributed.py``, launched by ``torch.distributed.run`` (2 ranks, CPU, gloo).

For each case (``ddp``, ``fsdp2``, each with and without gradient checkpointing, ``fsdp2_bf16``: FSDP2
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` over float32 weights, and ``fsdp2_bf16_unpatched``:
the same on the UNPATCHED model) every rank builds the same tiny Monkey encoder, patched unless the case says
otherwise (float64 unless mixed, ``backend="torch"``), runs forward + backward on its half of a fixed global
batch, and writes on rank 0 (``torch.save`` to ``--out``):

- ``{case}.pt``: ``{"loss": global-mean loss, "grads": {name: averaged full gradient}, "params": {name: full
  trainable parameter after one AdamW step}, "indices": {rank: dataset indices it used}}``;
- ``{case}_ckpt/``: the checkpoint ``save_checkpoint`` writes after the step (FSDP2 gathers the shards).

The test compares them with a single-process run of the whole global batch (``reference_step``).

Functions shared with the test process: ``build``, ``dataset``, ``reference_step``, ``reference_bf16_grads``.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Dict, List

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

import train_torchrun as ex  # noqa: E402  (examples/train_torchrun.py)

# Dropout off: a mask is a function of the seed and of the rows a process sees, so a rank's half of the batch
# would draw other masks than the single-process run of the whole batch.
CONFIG_OVERRIDES = dict(lora_dropout=0.0)
GLOBAL_BATCH = 4
SEED = 7
DTYPE = torch.float64
LR = 1e-2
WEIGHT_DECAY = 0.01
CASES = ("ddp", "fsdp2", "ddp_ckpt", "fsdp2_ckpt", "fsdp2_bf16", "fsdp2_bf16_unpatched")


def dataset():
    return ex.SyntheticImages(ex.make_config("tiny", **CONFIG_OVERRIDES), GLOBAL_BATCH, seed=SEED + 1, dtype=DTYPE)


def build(checkpointing: bool = False, dtype: torch.dtype = DTYPE, patch: bool = True):
    """The tiny model (patched unless ``patch=False``) with every trainable tensor non-trivial: ``lora_b`` starts
    at zeros in Monkey, which would make the ``lora_a`` and ``lora_scale`` gradients exactly zero and the check
    vacuous."""
    model = ex.build_model(ex.make_config("tiny", **CONFIG_OVERRIDES), seed=SEED, dtype=dtype, backend="torch",
                           patch=patch)
    generator = torch.Generator().manual_seed(SEED + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Drawn in float64 whatever the model's dtype: random draws differ between dtypes.
            if name.endswith("lora_b.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=torch.float64))
            elif name.endswith("lora_scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=generator, dtype=torch.float64))
    if checkpointing:
        model.activation_checkpointing_enable()
    return model.train()


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)


def reference_step(checkpointing: bool = False) -> Dict:
    """Single process, whole global batch: ``{"loss", "grads", "params"}`` as the workers write them."""
    model = build(checkpointing)
    batch = ex.make_batch(dataset(), range(GLOBAL_BATCH))
    loss = ex.compute_loss(model, batch)
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: p.grad.detach().clone() for n, p in trainable.items()}
    optimizer = make_optimizer(list(trainable.values()))
    optimizer.step()
    return {"loss": loss.item(), "grads": grads,
            "params": {n: p.detach().clone() for n, p in trainable.items()}}


def reference_bf16_grads() -> Dict[str, torch.Tensor]:
    """Single process, whole global batch, the model cast to bf16: the error plain bf16 makes, which FSDP2 mixed
    precision (``fsdp2_bf16``) is judged against."""
    model = build(dtype=torch.bfloat16)
    batch = ex.make_batch(dataset(), range(GLOBAL_BATCH))
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    ex.compute_loss(model, batch).backward()
    return {n: p.grad.detach().double() for n, p in model.named_parameters() if p.requires_grad}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor from a local tensor or an FSDP2 ``DTensor`` shard (all-gather: call on every rank)."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().clone()


def run_case(case: str, out: Path, rank: int, world: int) -> None:
    import torch.distributed as dist  # noqa: PLC0415
    from torch.utils.data.distributed import DistributedSampler  # noqa: PLC0415

    engine = case.split("_")[0]
    # fsdp2_bf16: fp32 master weights gathered in bf16 for compute (MixedPrecisionPolicy), fp32 reductions.
    mixed = "_bf16" in case
    model = build(checkpointing=case.endswith("_ckpt"), dtype=torch.float32 if mixed else DTYPE,
                  patch=not case.endswith("_unpatched"))
    data = dataset()
    indices: List[int] = list(DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False))
    if engine == "ddp":
        wrapped = ex.wrap_ddp(model, torch.device("cpu"))
    else:
        wrapped = ex.wrap_fsdp2(model, torch.bfloat16 if mixed else None)
    names = [n for n, p in ex.unwrap(wrapped).named_parameters() if p.requires_grad]
    params = [p for p in ex.unwrap(wrapped).parameters() if p.requires_grad]

    loss = ex.compute_loss(wrapped, ex.make_batch(data, indices))
    loss.backward()
    grads = {n: _full(p.grad) for n, p in zip(names, params)}
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss)

    make_optimizer(params).step()
    after = {n: _full(p) for n, p in zip(names, params)}
    gathered: List = [None] * world
    dist.all_gather_object(gathered, indices)
    ex.save_checkpoint(wrapped, engine, out / f"{case}_ckpt", rank)
    if rank == 0:
        torch.save({"loss": global_loss.item() / world, "grads": grads, "params": after,
                    "indices": dict(enumerate(gathered))}, out / f"{case}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    import torch.distributed as dist  # noqa: PLC0415

    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    dist.init_process_group(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for case in args.cases.split(","):
        if case not in CASES:
            raise ValueError(f"--cases: unknown case {case!r}; known: {CASES}")
        try:
            run_case(case, args.out, rank, world)
        except Exception as exc:  # the test reports the exact error of a case that cannot run
            if rank == 0:
                torch.save({"error": f"{type(exc).__name__}: {exc}"}, args.out / f"{case}.pt")
            raise
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("MONKEY_KERNELS_BACKEND", "torch")
    main()
