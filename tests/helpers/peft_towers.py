"""Tiny HuggingFace PEFT vision towers (SigLIP / CLIP from configs, random weights, no downloads) with several
LoRA adapters loaded, and their inputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from monkey_kernels import adapter_selection

peft = pytest.importorskip("peft")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


# Names avoid substrings of PEFT's "lora_" prefix (PEFT warns about e.g. "a").
ADAPTERS = {
    "red": dict(r=4, lora_alpha=8, target_modules=TARGETS),
    "green": dict(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "fc1"]),  # fewer layers
    "blue": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=TARGETS),  # alpha / sqrt(r)
}


def tiny_tower(family: str) -> nn.Module:
    if family == "siglip":
        cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=28, patch_size=14, vision_use_head=False)
        return SiglipVisionModel(cfg)
    cfg = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=16, projection_dim=16)
    return CLIPVisionModel(cfg)


def make_peft(family: str, adapters=ADAPTERS, device="cpu") -> PeftModel:
    """A PEFT model with the adapters loaded, lora_B non-zero (init_lora_weights=False), dropout 0."""
    base = tiny_tower(family)
    model = None
    for name, kwargs in adapters.items():
        config = LoraConfig(lora_dropout=0.0, init_lora_weights=False, **kwargs)
        if model is None:
            model = get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model.to(device)


def image_size(model: nn.Module) -> int:
    return model.base_model.model.config.image_size


def pixels(model: nn.Module, batch: int, device) -> torch.Tensor:
    size = image_size(model)
    return torch.randn(batch, 3, size, size, device=device)


def build_peft():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415
    from transformers import SiglipVisionConfig, SiglipVisionModel  # noqa: PLC0415

    tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=28, patch_size=14,
                                                 vision_use_head=False))
    model = get_peft_model(tower, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"],
                                             init_lora_weights=False), adapter_name="red")
    model.add_adapter("blue", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "fc2"],
                                         init_lora_weights=False))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    pixel_values = torch.randn(3, 3, 28, 28)

    def forward(m):
        with adapter_selection(m, ["red", "__base__", "blue"]):
            return m(pixel_values=pixel_values.to(next(m.parameters()).dtype)).last_hidden_state

    return model, forward, 12
