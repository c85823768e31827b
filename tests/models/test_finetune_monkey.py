"""``examples/finetune_monkey.py`` end to end on a tiny ``trust_remote_code`` Monkey checkpoint.

The checkpoint is the structural double of the public Monkey VLM (``tests/helpers/monkey_vlm_double.py``) saved
the way the release ships: ``save_pretrained`` after ``register_for_auto_class`` writes ``config.json`` with an
``auto_map`` and copies the modeling file (and the byte-level tokenizer double) into the folder, so the example
loads it with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` exactly as it would load the
release. The data is Monkey's conversation JSON with image paths (saved ``[3, H, W]`` tensors the double reads).

Runs (subprocesses, as a user runs the script): one process with ``--bf16`` (autocast over fp32 weights),
``--gradient_checkpointing`` and ``--fix_vit``, patched and ``--no_patch``; one with ``--use_lora``; two ranks
with DeepSpeed ZeRO-2 (``examples/ds_config_zero2.json``) when ``deepspeed`` is installed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.monkey_vlm_double import MonkeyLMHeadModel, QWenConfig, QWenTokenizer, tiny_visual_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "finetune_monkey.py"
TIMEOUT_S = 300
WINDOWS = 4  # 56 px images in 28 px windows
STEPS = 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """``ckpt/`` (the trust_remote_code checkpoint), ``img{i}.pt`` and ``train.json`` (relative image paths)."""
    root = tmp_path_factory.mktemp("finetune")
    visual = tiny_visual_config(lora_repeat_num=WINDOWS)
    config = QWenConfig(visual=visual)
    torch.manual_seed(21)
    model = MonkeyLMHeadModel(config)
    with torch.no_grad():  # Monkey starts lora_b at zeros and lora_scale at ones: make both count
        for name, p in model.named_parameters():
            if name.endswith("lora_b.weight"):
                p.normal_(0.0, 0.3)
            elif name.endswith("lora_scale"):
                p.uniform_(0.5, 1.5)
    # register_for_auto_class changes class attributes: undo it so the other tests see the double unchanged.
    missing = object()
    saved = {cls: cls.__dict__.get("_auto_class", missing) for cls in (QWenConfig, MonkeyLMHeadModel, QWenTokenizer)}
    try:
        QWenConfig.register_for_auto_class()
        MonkeyLMHeadModel.register_for_auto_class("AutoModelForCausalLM")
        QWenTokenizer.register_for_auto_class("AutoTokenizer")
        model.save_pretrained(root / "ckpt")
        QWenTokenizer(image_start_id=visual["image_start_id"],
                      image_span_length=(WINDOWS + 1) * visual["n_queries"]).save_pretrained(root / "ckpt")
    finally:
        for cls, value in saved.items():
            if value is missing:
                if "_auto_class" in cls.__dict__:
                    delattr(cls, "_auto_class")
            else:
                cls._auto_class = value
    generator = torch.Generator().manual_seed(22)
    items = []
    for i in range(8):
        torch.save(torch.randn(3, 56, 56, generator=generator), root / f"img{i}.pt")
        items.append({"conversations": [
            {"from": "user", "value": f"<img>img{i}.pt</img> Which colour dominates?"},
            {"from": "assistant", "value": ("red", "green", "blue")[i % 3]}]})
    (root / "train.json").write_text(json.dumps(items))
    return root


def _run(workdir: Path, out: str, *extra: str, ranks: int = 1) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MONKEY_KERNELS_BACKEND="torch", DS_ACCELERATOR="cpu",
               HF_MODULES_CACHE=str(workdir / "hf_modules"))  # the remote code is imported from here
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(ranks)]
    command = launcher + [str(EXAMPLE), "--model_name_or_path", "ckpt", "--data_path", "train.json",
                          "--output_dir", out, "--use_cpu", "True", "--max_steps", str(STEPS),
                          "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
                          "--seed", "5", "--disable_tqdm", "True", *extra]
    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    return proc


def _logs(workdir: Path, out: str):
    history = json.loads((workdir / out / "trainer_state.json").read_text())["log_history"]
    logs = [(e["loss"], e["grad_norm"]) for e in history if "loss" in e]
    assert len(logs) == STEPS and all(torch.isfinite(torch.tensor(logs)).flatten())
    return logs


def _vit_fixed(name: str) -> bool:
    """Frozen by ``--fix_vit``: a vision-tower parameter that is neither a LoRA one nor the resampler's."""
    return name.startswith("transformer.visual.") and "lora" not in name and ".attn_pool." not in name


@pytest.fixture(scope="module")
def bf16_runs(workdir):
    common = ("--bf16", "True", "--gradient_checkpointing", "True", "--fix_vit", "True",
              "--per_device_train_batch_size", "2", "--optim", "sgd", "--learning_rate", "0.05")
    patched = _run(workdir, "patched", *common)
    _run(workdir, "unpatched", *common, "--no_patch")
    return patched


def test_fix_vit_bf16_patched_trains_like_unpatched(workdir, bf16_runs):
    """``--bf16`` (autocast) + checkpointing + ``--fix_vit``: the patched model (the VLM rule and the fused encoder
    found in the remote-code model) logs the unpatched model's losses and gradient norms and ends with its weights
    (plain SGD: weights linear in the gradients) up to bf16 noise; the frozen vision weights did not move."""
    assert "monkey_vlm=1" in bf16_runs.stdout and "engine: NO, 1 process(es), mixed precision: bf16" in bf16_runs.stdout
    for (loss, norm), (ref_loss, ref_norm) in zip(_logs(workdir, "patched"), _logs(workdir, "unpatched")):
        assert loss == pytest.approx(ref_loss, rel=1e-2) and norm == pytest.approx(ref_norm, rel=3e-2)
    initial = load_file(workdir / "ckpt" / "model.safetensors")
    patched = load_file(workdir / "patched" / "model.safetensors")
    unpatched = load_file(workdir / "unpatched" / "model.safetensors")
    assert sorted(patched) == sorted(unpatched) == sorted(initial)
    fixed = [n for n in initial if _vit_fixed(n)]
    assert fixed and all(torch.equal(patched[n], initial[n]) for n in fixed)
    moved = {n for n in initial if not torch.equal(patched[n], initial[n])}
    for part in ("lora_a", "lora_b", "lora_scale", ".attn_pool.", "transformer.h.", "lm_head"):
        assert any(part in n for n in moved), f"nothing of {part} trained"
    diff = torch.cat([(patched[n] - unpatched[n]).flatten() for n in moved])
    update = torch.cat([(unpatched[n] - initial[n]).flatten() for n in moved])
    assert (diff.norm() / update.norm()).item() < 2e-2  # seen: 1.8e-3


def test_use_lora_trains_the_language_model_adapters(workdir):
    """``--use_lora``: PEFT LoRA on the language model's linears only (fused by the ``peft_lora`` rule), saved as an
    adapter; the base weights are untouched."""
    proc = _run(workdir, "lora", "--use_lora", "True", "--gradient_checkpointing", "True",
                "--per_device_train_batch_size", "2", "--learning_rate", "1e-2")
    assert "peft_lora_linear=10" in proc.stdout  # 2 Qwen blocks x (c_attn, attn.c_proj, w1, w2, mlp.c_proj)
    adapter = load_file(workdir / "lora" / "adapter_model.safetensors")
    lora_names = [n for n in adapter if ".lora_A." in n or ".lora_B." in n]
    assert len(lora_names) == 20 and all(".transformer.h." in n for n in lora_names), sorted(adapter)
    # lora_B starts at zeros in PEFT: it moved.
    assert all(adapter[n].abs().max() > 0 for n in lora_names if ".lora_B." in n)


def test_two_rank_deepspeed_zero2(workdir):
    """Two ranks, DeepSpeed ZeRO-2 with Monkey's config, bf16, checkpointing, accumulation 2, ``--fix_vit``: trains
    (DeepSpeed's WarmupLR starts at lr 0, hence 3 steps) and the frozen vision weights stay as loaded (in bf16:
    DeepSpeed casts the module and saves it so)."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (scripts/setup_env.sh installs it)")
    proc = _run(workdir, "ds", "--deepspeed", str(ROOT / "examples" / "ds_config_zero2.json"), "--bf16", "True",
                "--gradient_checkpointing", "True", "--ddp_backend", "gloo", "--per_device_train_batch_size", "1",
                "--gradient_accumulation_steps", "2", "--learning_rate", "1e-2", "--warmup_steps", "1",
                "--max_steps", "3", ranks=2)
    assert "engine: DEEPSPEED, 2 process(es), mixed precision: bf16" in proc.stdout
    history = json.loads((workdir / "ds" / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    initial = load_file(workdir / "ckpt" / "model.safetensors")
    trained = load_file(workdir / "ds" / "model.safetensors")
    fixed = [n for n in initial if _vit_fixed(n)]
    assert all(torch.equal(trained[n].float(), initial[n].to(trained[n].dtype).float()) for n in fixed)
    for part in ("lora_b", ".attn_pool.", "transformer.h."):
        assert any(part in n and not torch.equal(trained[n].float(), initial[n].to(trained[n].dtype).float())
                   for n in initial), f"nothing of {part} trained"
