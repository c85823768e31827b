"""The Hugging Face ``Trainer`` trains a PATCHED Monkey encoder with a classifier head on CPU
(``examples/train_with_trainer.py``): finite losses, only the LoRA recipe's parameters move (``lora_scale``
included), and the model ``Trainer`` saves reloads with ``from_pretrained`` and gives the same outputs; with
``bf16=True`` (autocast) the patched model trains as the unpatched one; gradient accumulation equals one big batch."""
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


# ---------------------------------------------------------------------------------------------------------
# The recipes: Trainer bf16 (autocast) patched vs unpatched, and gradient accumulation
# ---------------------------------------------------------------------------------------------------------
def _recipe_model(patch: bool):
    """The tiny classifier without dropout (the same masks in every run) and with a random ``lora_b`` (Monkey
    starts it at zeros, which would zero the ``lora_a`` / ``lora_scale`` gradients of the first step)."""
    config = twt.tr.make_config("tiny", num_labels=3, lora_dropout=0.0)
    model, _ = twt.build_classifier(config, seed=3, backend="torch", patch=patch)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return config, model


def _train(tmp_path, tag: str, *, patch: bool = True, amp: bool = False, batch_size: int = 4,
           gradient_accumulation_steps: int = 1, optim: str = "adamw_torch"):
    """3 Trainer steps on 12 tinted images in a fixed order; returns the logged ``(loss, grad_norm)`` per step,
    the initial and the final trainable weights, and the dtype the classifier head computed in."""
    config, model = _recipe_model(patch)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    head_dtypes = set()
    model.classifier.register_forward_hook(lambda module, args, out: head_dtypes.add(out.dtype))
    trainer = twt.make_trainer(model, twt.TintedImages(config, length=12, seed=4), tmp_path / tag, steps=STEPS,
                               batch_size=batch_size, lr=0.05 if optim == "sgd" else 1e-2, use_cpu=True, amp=amp,
                               gradient_accumulation_steps=gradient_accumulation_steps, optim=optim,
                               train_sampling_strategy="sequential", disable_tqdm=True)
    trainer.train()
    logs = [(e["loss"], e["grad_norm"]) for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == STEPS
    final = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logs, initial, final, head_dtypes


def _update_errors(final, reference_final, initial):
    """``|w - w_ref| / |w_ref - w_0|`` per trainable tensor: the difference of two runs' weights relative to how
    far training moved them."""
    return {n: ((final[n] - w).norm() / (w - initial[n]).norm()).item() for n, w in reference_final.items()}


def test_trainer_bf16_autocast_patched_matches_unpatched(tmp_path):
    """``TrainingArguments(bf16=True, use_cpu=True)`` = ``torch.autocast("cpu", bfloat16)`` over fp32 weights. The
    patched model trains as the unpatched one under the same autocast: same logged losses and gradient norms, and
    (plain SGD, so the weights are linear in the gradients) weights as close to the unpatched bf16 run as that run
    is to fp32, i.e. within the error autocast itself makes."""
    patched = _train(tmp_path, "patched", amp=True, optim="sgd")
    unpatched = _train(tmp_path, "unpatched", patch=False, amp=True, optim="sgd")
    fp32 = _train(tmp_path, "fp32", patch=False, optim="sgd")
    # Autocast really ran (the head is a plain nn.Linear in both models).
    assert patched[3] == unpatched[3] == {torch.bfloat16} and fp32[3] == {torch.float32}
    for (loss, norm), (ref_loss, ref_norm) in zip(patched[0], unpatched[0]):
        assert loss == pytest.approx(ref_loss, rel=2e-2) and norm == pytest.approx(ref_norm, rel=5e-2)
    initial = unpatched[1]
    assert all(torch.equal(patched[1][n], initial[n]) for n in initial)
    kernel_error = _update_errors(patched[2], unpatched[2], initial)
    autocast_error = _update_errors(unpatched[2], fp32[2], initial)
    worse = {n: (kernel_error[n], autocast_error[n]) for n in initial
             if kernel_error[n] > 2 * autocast_error[n] + 1e-2}
    assert not worse, f"patched vs unpatched bf16 (vs the unpatched bf16 vs fp32 error): {worse}"


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """2 micro batches of 2 accumulated = 1 batch of 4 (fp32, same images in the same order): same logged losses,
    gradient norms and weights. Catches a model whose ``forward(**kwargs)`` makes the ``Trainer`` skip the division
    by the accumulation steps (``accepts_loss_kwargs``): that doubled both the loss and the gradients here."""
    assert twt.MonkeyVisionForImageClassification.accepts_loss_kwargs is False
    accumulated = _train(tmp_path, "ga2", batch_size=2, gradient_accumulation_steps=2, optim="sgd")
    single = _train(tmp_path, "ga1", batch_size=4, optim="sgd")
    for (loss, norm), (ref_loss, ref_norm) in zip(accumulated[0], single[0]):
        assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-5)
    errors = _update_errors(accumulated[2], single[2], single[1])
    assert max(errors.values()) < 1e-4, errors
