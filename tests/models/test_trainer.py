"""The Hugging Face ``Trainer`` trains a PATCHED Monkey encoder with a classifier head on CPU
(``examples/train_with_trainer.py``): finite losses, only the LoRA recipe's parameters move (``lora_scale``
included), and the model ``Trainer`` saves reloads with ``from_pretrained`` and gives the same outputs."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import train_with_trainer as twt  # noqa: E402

from monkey_kernels.rules.monkey_vit import FusedMonkeyBlock  # noqa: E402
from monkey_kernels.models import MonkeyVisionBlock  # noqa: E402
from monkey_kernels.patching import is_patched  # noqa: E402

STEPS = 3


def _config():
    return twt.tr.make_config("tiny", num_labels=3)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_trains_lora_recipe_and_reloads(tmp_path, checkpointing):
    config = _config()
    # backend="torch": the CPU path (conftest turns on the Triton interpreter, which is slow for training).
    model, report = twt.build_classifier(config, seed=3, backend="torch")
    assert report.rules["monkey_block"] == config.layers and is_patched(model)
    assert all(isinstance(b, FusedMonkeyBlock) for b in model.visual.transformer.resblocks)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("lora_scale") for n in trainable) and "classifier.weight" in trainable
    assert not any(n.endswith(("attn.in_proj.weight", "mlp.c_fc.weight", "conv1.weight")) for n in trainable)

    dataset = twt.TintedImages(config, length=8, seed=4)
    trainer = twt.make_trainer(model, dataset, tmp_path / "run", steps=STEPS, batch_size=2, lr=1e-2,
                               gradient_checkpointing=checkpointing, use_cpu=True)
    result = trainer.train()
    assert trainer.state.global_step == STEPS
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses), losses
    assert math.isfinite(result.training_loss)
    if checkpointing:
        blocks = model.visual.transformer.resblocks
        assert all(isinstance(b, FusedMonkeyBlock) and b.gradient_checkpointing for b in blocks)
    # Trainer's optimizer holds exactly the recipe's trainable parameters.
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in model.named_parameters() if n in trainable}

    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed <= trainable, f"frozen weights changed: {sorted(changed - trainable)}"
    # All 4 tiles of every image use their adapter, so every adapter moves: lora_b from step 1, lora_a and
    # lora_scale from step 2 (lora_b starts at zeros, which zeroes their first gradients).
    for kind in ("lora_a.weight", "lora_b.weight", "lora_scale"):
        params = [n for n in trainable if n.endswith(kind)]
        assert params and set(params) <= changed, f"{kind} did not train: {sorted(set(params) - changed)}"
    assert "classifier.weight" in changed

    if checkpointing:
        return
    trainer.save_model(str(tmp_path / "final"))
    loaded = twt.MonkeyVisionForImageClassification.from_pretrained(tmp_path / "final")
    # It reloads as the reference model: the comparison below is the fused pass against the release's loop.
    assert not is_patched(loaded)
    assert all(type(b) is MonkeyVisionBlock for b in loaded.visual.transformer.resblocks)
    state = model.state_dict()
    assert sorted(loaded.state_dict()) == sorted(state)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    batch = torch.stack([dataset[i]["pixel_values"] for i in range(3)])
    model.eval()
    loaded.eval()
    with torch.no_grad():
        expected = model(batch).logits
        torch.testing.assert_close(loaded(batch).logits, expected, rtol=1e-4, atol=1e-5)
