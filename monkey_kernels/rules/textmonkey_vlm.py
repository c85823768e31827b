"""The full TextMonkey VLM (``TextMonkeyLMHeadModel`` of the public remote code): ONE encoder pass per forward and
the image features placed out of place (the ``textmonkey_vlm`` rule).

The public ``TextMonkeyModel.forward`` (first step only, ``past_key_values is None``) decodes the image paths of
the spans, calls ``visual.encode(paths, lora_idx=visual.lora_repeat_num)`` when ``lora_repeat_num > 0`` (else
``visual.encode(paths)``), which returns finished features ``[N, span, D]``, and ``QWenModel.forward`` writes them
into the embeddings IN PLACE (``hidden_states[i][a + 1 : b] = images[k]``), which fails with "a view of a leaf
Variable ... in-place" once the embedding output requires grad (gradient checkpointing with a frozen embedding,
PEFT's ``enable_input_require_grads``).

What it recognises (by structure): a Qwen-VL-style model (:func:`~monkey_kernels.rules.monkey_vlm.
looks_like_qwen_vl`) whose ``visual`` was patched by the ``textmonkey_encoder`` rule (so its ``encode`` is ONE
fused pass: :mod:`monkey_kernels.rules.textmonkey`) and holds an int ``lora_repeat_num``; its class ``forward``
takes ``input_ids`` and ``past_key_values``.

The forward it installs (:class:`TextMonkeyVLMForward`, picklable; ``unpatch_model`` restores the previous one)
is the Monkey VLM rule's, shared (:func:`~monkey_kernels.rules.monkey_vlm.forward_with_image_features`): the spans
found and decoded exactly as the original, the features of ONE ``encode`` call of every path (with the original's
``lora_idx`` choice), then the model's original forward with the start markers masked and the features placed
in the embedding-dropout output out of place (each row written once). A span whose length is not ``encode``'s
feature count (``(r if resampler else windows x Q) + (Q if use_global)``: 768 for the release) raises a
``ValueError`` naming the sequence, where the original fails on a shape mismatch. Everything else is the model's
own code: masks, labels and loss, ``use_cache`` and generation (images on the first step only), gradient
checkpointing (of the language model, as the original; the ViT blocks are fused ``GradientCheckpointingLayer``s
and follow ``gradient_checkpointing_enable`` too), ``save_pretrained`` (same keys and Parameters).
"""
from __future__ import annotations

import inspect
from typing import List, Optional

import torch
from torch import nn

from ..patching import InstanceForward, PatchRule, register_builtin_rule, rule_of
from .monkey_vlm import (ImageSpan, MonkeyVLMForward, forward_with_image_features, looks_like_qwen_vl,
                         restore_vlm_forward)

__all__ = ["TextMonkeyVLMForward", "textmonkey_vlm_forward", "is_textmonkey_vlm", "TEXTMONKEY_VLM_RULE"]


def _textmonkey_features(module: nn.Module, spans: List[ImageSpan]) -> torch.Tensor:
    """The features of every span (``[sum of span lengths, D]``): ONE ``encode`` of all the paths, with the
    original's ``lora_idx``."""
    visual = module.visual
    paths = [span.path for span in spans]
    adapters = visual.lora_repeat_num
    features = visual.encode(paths, lora_idx=adapters) if adapters > 0 else visual.encode(paths)
    if not isinstance(features, torch.Tensor) or features.dim() != 3 or features.shape[0] != len(spans):
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise RuntimeError(f"textmonkey_vlm: visual.encode returned {shape} for {len(spans)} images")
    for span in spans:
        if span.length != features.shape[1]:
            raise ValueError(
                f"input_ids sequence {span.sequence}: the image {span.path!r} at positions {span.start}..{span.end} "
                f"holds {span.length} positions between its markers, but visual.encode gives {features.shape[1]} "
                f"features per image ((r if resampler else windows x queries) + (queries if use_global))"
            )
    return features.reshape(-1, features.shape[-1])


def textmonkey_vlm_forward(module: nn.Module, *args, **kwargs):
    """Patched ``TextMonkeyModel.forward`` (same signature as the instance's original; see the module docstring)."""
    return forward_with_image_features(module, _textmonkey_features, args, kwargs)


class TextMonkeyVLMForward(MonkeyVLMForward):
    """The forward the rule installs: :func:`textmonkey_vlm_forward` on ``module``; ``previous`` is an
    instance-level forward that was there before (e.g. an accelerate hook), restored by ``unpatch_model``."""

    def __init__(self, module: nn.Module, previous=None) -> None:
        InstanceForward.__init__(self, textmonkey_vlm_forward, module)
        self.previous = previous


def _unpatchable_reason(module: nn.Module) -> Optional[str]:
    visual = module.visual
    if rule_of(visual) != "textmonkey_encoder":
        return "visual was not patched by the textmonkey_encoder rule (see its entry): no one-pass encode to run"
    adapters = getattr(visual, "lora_repeat_num", None)
    if isinstance(adapters, bool) or not isinstance(adapters, int):
        return f"visual.lora_repeat_num must be an int (it chooses encode's lora_idx), got {adapters!r}"
    forward = module.__dict__.get("forward")
    if forward is not None and not callable(forward):
        return "its instance forward is not callable"
    try:
        parameters = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return "the signature of its forward cannot be read"
    if "input_ids" not in parameters or "past_key_values" not in parameters:
        return "forward takes no input_ids / past_key_values"
    return None


def _looks_like_textmonkey_vlm(module: nn.Module) -> bool:
    visual = getattr(module, "visual", None)
    return (not isinstance(module.__dict__.get("forward"), MonkeyVLMForward) and looks_like_qwen_vl(module)
            and (rule_of(visual) == "textmonkey_encoder" or hasattr(getattr(visual, "transformer", None),
                                                                    "window_pos")))


def is_textmonkey_vlm(module: nn.Module) -> bool:
    """Whether ``module`` is a TextMonkey VLM (``TextMonkeyModel``-like) the ``textmonkey_vlm`` rule patches,
    judged by structure, with its vision tower already patched."""
    return _looks_like_textmonkey_vlm(module) and _unpatchable_reason(module) is None


def _skip_reason(module: nn.Module) -> Optional[str]:
    return _unpatchable_reason(module) if _looks_like_textmonkey_vlm(module) else None


def _to_fused(module: nn.Module, options) -> nn.Module:
    module.forward = TextMonkeyVLMForward(module, previous=module.__dict__.get("forward"))
    return module


TEXTMONKEY_VLM_RULE = register_builtin_rule(PatchRule(
    "textmonkey_vlm", is_textmonkey_vlm, _to_fused, restore_vlm_forward,
    kinds={"vlm_one_encoder_pass": 1, "vlm_out_of_place_features": 1}, skip_reason=_skip_reason,
    after=("textmonkey_encoder",),
    description=("a Qwen-VL-style model (wte, drop, h, ln_f, config.visual['image_start_id']) whose visual the "
                 "textmonkey_encoder rule patches"),
))
