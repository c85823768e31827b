"""``patch_model`` / ``unpatch_model``: swap reference modules of a model INSTANCE for fused ones and back.

The patcher owns ONE registry of :class:`PatchRule` s, applied in registration order. Each rule says how to
recognise a reference module (``matches``), how to build its fused replacement (``to_fused``) and how to get
the reference module back (``to_reference``). Later features add rules with :func:`register_rule`.

Built-in rules, found by structure and names (so a user's copy of the public Monkey code is patched too):

- ``monkey_block``: a block with ``ln_1``, ``ln_2``, ``attn.in_proj`` + ``attn.in_proj_lora`` (a ``ModuleList``
  of adapters with ``lora_a``, ``lora_b``, ``lora_scale``), ``attn.out_proj`` + ``attn.out_proj_lora``,
  ``mlp.c_fc`` / ``mlp.c_proj`` and ``mlp_lora`` -> :class:`~monkey_kernels.fused_monkey.FusedMonkeyBlock`.
- ``monkey_transformer``: the module holding ``resblocks`` of fused blocks; its ``forward`` is replaced on the
  instance by :func:`~monkey_kernels.fused_monkey.fused_transformer_forward` (same signature, ``[seq, batch,
  dim]`` layout, ``idx`` may also be one adapter id per batch row).
- ``monkey_vision_model``: a :class:`~monkey_kernels.models.MonkeyVisionModel` whose transformer was patched;
  its per-tile loop ``forward`` is replaced on the instance by ONE batched pass over all tiles and global views,
  and ``forward_views`` (packed views of images of different grids) by one pass over every view of the batch.
- ``slp_embedding``: a LayTextLLM-style embedding layer (``embed_tokens`` + ``projector.proj = Linear(4, hidden)``
  + ``box_token_id`` / ``image_token_id``, e.g. :class:`~monkey_kernels.ops.slp.SLPEmbeddingRef`) ->
  :class:`~monkey_kernels.modules.FusedSLPEmbedding` over the same (shared) modules, so state-dict keys are unchanged.

What patching keeps: the fused modules hold the reference Parameter objects under the same names, so
``state_dict`` keys and tensors, ``requires_grad`` flags, and optimizers are unaffected. An optimizer built
BEFORE patching keeps working (it holds the same Parameters), as does one built after; ``unpatch_model``
likewise creates no Parameter. Models must not run under autocast with weights of another dtype: the fused op
needs activations and weights in one dtype (cast the model instead, e.g. ``model.bfloat16()``).
"""
from __future__ import annotations

import importlib
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

from .ops.backends import BACKENDS
from .fused_monkey import (FusedMonkeyBlock, InstanceForward, batched_model_forward, batched_views_forward,
                           fused_transformer_forward)

__all__ = ["PatchRule", "PatchOptions", "PatchReport", "register_rule", "registered_rules", "patch_model",
           "unpatch_model", "is_patched", "NothingToPatchError"]

_RULE_ATTR = "_monkey_kernels_rule"  # set on every module a rule produced
_STATE_ATTR = "_monkey_kernels_patch"  # set on the patched root


class NothingToPatchError(ValueError):
    """``patch_model`` found no module any rule could patch."""


@dataclass(frozen=True)
class PatchOptions:
    """Options handed to every ``to_fused``: ``backend`` of the fused ops (``None`` = automatic choice)."""

    backend: Optional[str] = None


@dataclass(frozen=True)
class PatchRule:
    """One ``reference module -> fused module`` rule.

    ``matches(module) -> bool``; ``to_fused(module, options) -> nn.Module`` (a new module, or the same one
    patched in place on the instance); ``to_reference(fused) -> nn.Module``. ``kinds`` names what one
    replacement fuses, for the report (e.g. ``{"attn.in_proj": 1}``)."""

    name: str
    matches: Callable[[nn.Module], bool]
    to_fused: Callable[[nn.Module, PatchOptions], nn.Module]
    to_reference: Callable[[nn.Module], nn.Module]
    kinds: Dict[str, int] = field(default_factory=dict)
    skip_reason: Optional[Callable[[nn.Module], Optional[str]]] = None


@dataclass
class PatchReport:
    """What ``patch_model`` / ``unpatch_model`` replaced: ``rules`` counts modules per rule, ``kinds`` counts
    fused layers per kind (``attn.in_proj``, ``attn.out_proj``, ``mlp.c_proj``, ...). ``skipped`` lists
    ``(module name, rule name, reason)`` for modules a rule recognised but left unchanged (e.g. a DoRA layer)."""

    rules: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    already_patched: bool = False
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.rules.values())

    def __str__(self) -> str:
        if self.already_patched:
            return "PatchReport(model already patched: nothing done)"
        parts = ", ".join(f"{k}={v}" for k, v in sorted(self.rules.items()))
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.kinds.items()))
        skipped = f"; skipped: {len(self.skipped)}" if self.skipped else ""
        return f"PatchReport(modules: {parts}; fused layers: {kinds}{skipped})"


_REGISTRY: List[PatchRule] = []


def register_rule(rule: PatchRule, *, before: Optional[str] = None) -> PatchRule:
    """Adds ``rule`` to the registry (at the end, or before the rule named ``before``); replaces a rule of the
    same name. Rules that need others applied first (a container of fused blocks) go after them."""
    _load_builtin_rules()  # the built-in rules keep their place ahead of the user's
    return _register(rule, before)


def _register(rule: PatchRule, before: Optional[str] = None) -> PatchRule:
    if not isinstance(rule, PatchRule):
        raise ValueError(f"rule must be a PatchRule, got {type(rule).__name__}")
    _REGISTRY[:] = [r for r in _REGISTRY if r.name != rule.name]
    if before is None:
        _REGISTRY.append(rule)
    else:
        names = [r.name for r in _REGISTRY]
        if before not in names:
            raise ValueError(f"before={before!r} is not a registered rule; registered: {names}")
        _REGISTRY.insert(names.index(before), rule)
    return rule


# Modules whose import registers a built-in rule; imported on the first patch, so that ``import monkey_kernels``
# loads neither PEFT nor the VLM support.
_BUILTIN_RULE_MODULES = ("monkey_kernels.peft_patch", "monkey_kernels.monkey_vlm")
_builtins_loaded = False


def _load_builtin_rules() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in _BUILTIN_RULE_MODULES:
            importlib.import_module(module)


def registered_rules() -> List[PatchRule]:
    _load_builtin_rules()
    return list(_REGISTRY)


# ---------------------------------------------------------------------------------------------------------
# Monkey rules
# ---------------------------------------------------------------------------------------------------------
def _is_adapter_list(value) -> bool:
    return isinstance(value, nn.ModuleList) and len(value) > 0 and all(
        isinstance(getattr(ad, "lora_a", None), nn.Linear) and isinstance(getattr(ad, "lora_b", None), nn.Linear)
        and isinstance(getattr(ad, "lora_scale", None), nn.Parameter)
        for ad in value
    )


def _is_monkey_block(module: nn.Module) -> bool:
    attn = getattr(module, "attn", None)
    mlp = getattr(module, "mlp", None)
    return (
        isinstance(getattr(module, "ln_1", None), nn.Module)
        and isinstance(getattr(module, "ln_2", None), nn.Module)
        and isinstance(attn, nn.Module)
        and isinstance(getattr(attn, "in_proj", None), nn.Linear)
        and isinstance(getattr(attn, "out_proj", None), nn.Linear)
        and _is_adapter_list(getattr(attn, "in_proj_lora", None))
        and _is_adapter_list(getattr(attn, "out_proj_lora", None))
        and isinstance(mlp, nn.Module)
        and isinstance(getattr(mlp, "c_fc", None), nn.Linear)
        and isinstance(getattr(mlp, "c_proj", None), nn.Linear)
        and _is_adapter_list(getattr(module, "mlp_lora", None))
        and not hasattr(module, "ln_1_kv")  # cross-attention blocks are not fused
    )


def _num_heads(attn: nn.Module) -> int:
    for name in ("num_heads", "num_attention_heads_per_partition"):
        if isinstance(getattr(attn, name, None), int):
            return getattr(attn, name)
    raise ValueError(f"cannot find the number of heads of {type(attn).__name__} (num_heads attribute)")


def _block_to_fused(block: nn.Module, options: PatchOptions) -> nn.Module:
    return FusedMonkeyBlock(block, _num_heads(block.attn), backend=options.backend).train(block.training)


def _is_monkey_transformer(module: nn.Module) -> bool:
    blocks = getattr(module, "resblocks", None)
    return (isinstance(blocks, nn.ModuleList) and len(blocks) > 0
            and all(isinstance(b, FusedMonkeyBlock) for b in blocks) and "forward" not in module.__dict__)


def _transformer_to_fused(module: nn.Module, options: PatchOptions) -> nn.Module:
    module.forward = InstanceForward(fused_transformer_forward, module)
    return module


def _drop_instance_forward(module: nn.Module) -> nn.Module:
    module.__dict__.pop("forward", None)
    return module


def _is_monkey_vision_model(module: nn.Module) -> bool:
    from .models.monkey_vision import MonkeyVisionModel  # noqa: PLC0415 (models import transformers)

    return (isinstance(module, MonkeyVisionModel) and "forward" not in module.__dict__
            and getattr(module.transformer, _RULE_ATTR, None) == "monkey_transformer")


def _model_to_fused(module: nn.Module, options: PatchOptions) -> nn.Module:
    module.forward = InstanceForward(batched_model_forward, module)
    module.forward_views = InstanceForward(batched_views_forward, module)
    return module


def _model_to_reference(module: nn.Module) -> nn.Module:
    module.__dict__.pop("forward_views", None)
    return _drop_instance_forward(module)


_register(PatchRule(
    "monkey_block", _is_monkey_block, _block_to_fused, lambda fused: fused.to_reference(),
    kinds={"attn.in_proj": 1, "attn.out_proj": 1, "mlp.c_proj": 1},
))
_register(PatchRule("monkey_transformer", _is_monkey_transformer, _transformer_to_fused, _drop_instance_forward,
                        kinds={"batched_encoder_forward": 1}))
_register(PatchRule("monkey_vision_model", _is_monkey_vision_model, _model_to_fused, _model_to_reference,
                        kinds={"batched_view_loop": 1}))


# ---------------------------------------------------------------------------------------------------------
# SLP rule: reference projector + embedding assembly -> one fused out-of-place pass
# ---------------------------------------------------------------------------------------------------------
def _is_slp_embedding(module: nn.Module) -> bool:
    from .modules import FusedSLPEmbedding  # noqa: PLC0415

    projector = getattr(module, "projector", None)
    proj = getattr(projector, "proj", None)
    embed = getattr(module, "embed_tokens", None)
    return (
        not isinstance(module, FusedSLPEmbedding)
        and isinstance(embed, nn.Embedding)
        and isinstance(proj, nn.Linear) and proj.in_features == 4 and proj.out_features == embed.embedding_dim
        and isinstance(getattr(module, "box_token_id", None), int)
        and hasattr(module, "image_token_id")
    )


def _slp_to_fused(module: nn.Module, options: PatchOptions) -> nn.Module:
    from .modules import FusedSLPEmbedding  # noqa: PLC0415

    return FusedSLPEmbedding.from_reference(module, backend=options.backend).train(module.training)


_register(PatchRule("slp_embedding", _is_slp_embedding, _slp_to_fused, lambda fused: fused.to_reference(),
                        kinds={"slp_embedding": 1}))


# ---------------------------------------------------------------------------------------------------------
# Walk
# ---------------------------------------------------------------------------------------------------------
def _set_child(root: nn.Module, name: str, new: nn.Module, old: nn.Module) -> None:
    if new is old:
        return
    if name == "":
        raise ValueError(f"cannot replace the root module {type(root).__name__} by a new object: pass its parent")
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def is_patched(model: nn.Module) -> bool:
    return _STATE_ATTR in model.__dict__


def patch_model(model: nn.Module, *, backend: Optional[str] = None, strict: bool = True) -> PatchReport:
    """Replaces, on the instance ``model``, every module a registered rule matches by its fused module.

    Args:
        model: any ``nn.Module`` containing Monkey-structured blocks (this package's model or a copy of the
            public Monkey code).
        backend: backend of the fused ops (``"triton"``, ``"native"``, ``"torch"``, ``None`` = automatic; see
            :mod:`monkey_kernels.ops.backends`).
        strict: when nothing matches, raise :class:`NothingToPatchError` (``True``) or only warn.
    Returns:
        A :class:`PatchReport` of the replacements. Patching an already patched model changes nothing, warns
        and returns a report with ``already_patched=True``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if backend is not None and (not isinstance(backend, str) or backend not in BACKENDS + ("auto",)):
        # Checked here, not at the first forward: a typo would otherwise patch the model and fail later.
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)} or None, got {backend!r}")
    if is_patched(model):
        warnings.warn(f"patch_model: {type(model).__name__} is already patched; nothing done "
                      "(call unpatch_model first to re-patch with other options)", UserWarning, stacklevel=2)
        return PatchReport(already_patched=True)
    _load_builtin_rules()
    options = PatchOptions(backend=backend)
    report = PatchReport()
    done: List[Tuple[str, PatchRule, nn.Module, nn.Module]] = []
    try:
        for rule in _REGISTRY:
            for name, module in list(model.named_modules()):
                if getattr(module, _RULE_ATTR, None) is not None:
                    continue
                if not rule.matches(module):
                    reason = rule.skip_reason(module) if rule.skip_reason is not None else None
                    if reason is not None:
                        report.skipped.append((name, rule.name, reason))
                    continue
                fused = rule.to_fused(module, options)
                fused.__dict__[_RULE_ATTR] = rule.name
                _set_child(model, name, fused, module)
                done.append((name, rule, module, fused))
                report.rules[rule.name] += 1
                report.kinds.update(rule.kinds)
    except BaseException:
        # Atomic: a rule that fails half-way (e.g. adapters of different ranks in one list) leaves the model
        # exactly as it was, not half-patched.
        for name, rule, module, fused in reversed(done):
            reference = rule.to_reference(fused)
            fused.__dict__.pop(_RULE_ATTR, None)
            reference.__dict__.pop(_RULE_ATTR, None)
            _set_child(model, name, reference, fused)
        raise
    if report.total == 0:
        message = (f"patch_model found nothing to patch in {type(model).__name__}: no module matched the rules "
                   f"{[r.name for r in _REGISTRY]} (a Monkey block needs attn.in_proj + attn.in_proj_lora, "
                   "attn.out_proj + attn.out_proj_lora, mlp.c_fc / mlp.c_proj and mlp_lora adapter lists; an SLP "
                   "embedding layer needs embed_tokens + projector.proj = Linear(4, hidden) + box_token_id)")
        if report.skipped:
            message += f"; recognised but not fusable: {report.skipped}"
        if strict:
            raise NothingToPatchError(message)
        warnings.warn(message, UserWarning, stacklevel=2)
        return report
    model.__dict__[_STATE_ATTR] = {"backend": backend, "report": report}
    return report


def unpatch_model(model: nn.Module) -> PatchReport:
    """Restores the reference modules (with the current Parameters) everywhere ``patch_model`` put fused ones;
    returns a report of what was restored. Warns and does nothing on a model that is not patched."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not is_patched(model):
        warnings.warn(f"unpatch_model: {type(model).__name__} is not patched; nothing done", UserWarning,
                      stacklevel=2)
        return PatchReport()
    _load_builtin_rules()
    rules = {r.name: r for r in _REGISTRY}
    report = PatchReport()
    # Outer modules first (reverse registry order): a container's patch depends on its fused children.
    for rule in reversed(_REGISTRY):
        for name, module in list(model.named_modules()):
            if getattr(module, _RULE_ATTR, None) != rule.name:
                continue
            reference = rules[rule.name].to_reference(module)
            module.__dict__.pop(_RULE_ATTR, None)
            reference.__dict__.pop(_RULE_ATTR, None)
            _set_child(model, name, reference, module)
            report.rules[rule.name] += 1
            report.kinds.update(rule.kinds)
    del model.__dict__[_STATE_ATTR]
    return report
