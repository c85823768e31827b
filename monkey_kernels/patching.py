"""``patch_model`` / ``unpatch_model``: the patch engine. It swaps reference modules of a model INSTANCE for
fused ones and back, by rules it knows nothing specific about.

The engine only matches, applies atomically, reports and unpatches. What a model family looks like, its call
contract and its fused forwards live in its rule module, one per family, in :mod:`monkey_kernels.rules`: the
engine finds them itself (every module of that package whose name does not start with ``_``, imported on the
first patch, so ``import monkey_kernels`` stays light and a rule's optional dependencies are only imported when
a rule module decides to), and each registers its :class:`PatchRule` s on import
(:func:`register_builtin_rule`). Adding a family is adding a
module there (and its tests); nothing here changes.

A rule says how to recognise a reference module (``matches``), how to build its fused replacement
(``to_fused``), how to get the reference module back (``to_reference``), why a module it recognises cannot be
patched (``skip_reason``: listed in :attr:`PatchReport.skipped`), what a module needs to match (``description``,
for the message when nothing matches) and which rules must run before it (``after``: e.g. a container whose
fused forward needs its fused children). Rules run in that dependency order (ties: registration order) and are
unpatched in the reverse one. :func:`register_rule` adds a user's rule.

What patching keeps: the fused modules hold the reference Parameter objects under the same names, so
``state_dict`` keys and tensors, ``requires_grad`` flags, and optimizers are unaffected. An optimizer built
BEFORE patching keeps working (it holds the same Parameters), as does one built after; ``unpatch_model``
likewise creates no Parameter. Under ``torch.autocast`` over fp32 master weights the fused forwards compute
where the reference's linears would (the ops cast as ``F.linear`` does) and every patched layer returns the
reference's dtype (README "Mixed precision"; tested on CPU bf16 in ``tests/models/test_autocast_models.py``).
"""
from __future__ import annotations

import importlib
import pkgutil
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

from .ops.backends import BACKENDS

__all__ = ["PatchRule", "PatchOptions", "PatchReport", "InstanceForward", "register_rule", "register_builtin_rule",
           "registered_rules",
           "rule_modules", "patch_model", "unpatch_model", "is_patched", "rule_of", "NothingToPatchError"]

RULE_PACKAGE = "monkey_kernels.rules"
_RULE_ATTR = "_monkey_kernels_rule"  # set on every module a rule produced
_STATE_ATTR = "_monkey_kernels_patch"  # set on the patched root


class NothingToPatchError(ValueError):
    """``patch_model`` found no module any rule could patch."""


class InstanceForward:
    """A ``forward`` installed on one module instance: ``function(module, *args, **kwargs)``.

    Rules that patch a module in place (a container's loop, a PEFT layer, a VLM's forward) install one. Used
    instead of ``types.MethodType`` so a patched model still pickles (``torch.save(model)``) and deep-copies: a
    bound method of a foreign function pickles as ``getattr(module, function.__name__)``, which does not exist
    on the module."""

    def __init__(self, function: Callable, module: nn.Module) -> None:
        self.function = function
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.function(self.module, *args, **kwargs)


@dataclass(frozen=True)
class PatchOptions:
    """Options handed to every ``to_fused``: ``backend`` of the fused ops (``None`` = automatic choice)."""

    backend: Optional[str] = None


@dataclass(frozen=True)
class PatchRule:
    """One ``reference module -> fused module`` rule.

    ``matches(module) -> bool``; ``to_fused(module, options) -> nn.Module`` (a new module, or the same one
    patched in place on the instance); ``to_reference(fused) -> nn.Module``. ``kinds`` names what one
    replacement fuses, for the report (e.g. ``{"attn.in_proj": 1}``). ``skip_reason(module)``: why a module the
    rule recognises is left alone (``None``: not recognised, or it matches). ``after``: names of rules that must
    run first. ``description``: one line saying what a module needs to match."""

    name: str
    matches: Callable[[nn.Module], bool]
    to_fused: Callable[[nn.Module, PatchOptions], nn.Module]
    to_reference: Callable[[nn.Module], nn.Module]
    kinds: Dict[str, int] = field(default_factory=dict)
    skip_reason: Optional[Callable[[nn.Module], Optional[str]]] = None
    after: Tuple[str, ...] = ()
    description: str = ""

    @classmethod
    def by_structure(cls, name: str, looks_like: Callable[[nn.Module], bool],
                     problem: Callable[[nn.Module], Optional[str]], to_fused: Callable[[nn.Module, PatchOptions], nn.Module],
                     to_reference: Callable[[nn.Module], nn.Module], **fields) -> "PatchRule":
        """The usual rule: it claims a module that ``looks_like`` recognises by structure and in which
        ``problem`` (the call contract, unsupported options, ...) finds nothing wrong; a recognised module with a
        problem is left alone and reported with that problem as the reason. ``fields``: the other fields."""
        return cls(name, lambda module: looks_like(module) and problem(module) is None, to_fused, to_reference,
                   skip_reason=lambda module: problem(module) if looks_like(module) else None, **fields)


@dataclass
class PatchReport:
    """What ``patch_model`` / ``unpatch_model`` replaced: ``rules`` counts modules per rule, ``kinds`` counts
    fused layers per kind (``attn.in_proj``, ``attn.out_proj``, ``mlp.c_proj``, ...). ``skipped`` lists
    ``(module name, rule name, reason)`` for modules a rule recognised but left unchanged (e.g. a DoRA layer, or
    a block whose forward takes other keywords) and that no other rule patched."""

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


# ---------------------------------------------------------------------------------------------------------
# Registry: discovery and order
# ---------------------------------------------------------------------------------------------------------
_registry: List[PatchRule] = []  # registration order
_before: Dict[str, Tuple[str, ...]] = {}  # rule name -> rules it must precede (register_rule(before=...))
_ordered: Optional[List[PatchRule]] = None  # application order, rebuilt when the registry changes
_discovery = "not started"  # -> "running" -> "done"


def rule_modules() -> List[str]:
    """The rule modules of :mod:`monkey_kernels.rules` (names not starting with ``_``), sorted."""
    package = importlib.import_module(RULE_PACKAGE)
    return sorted(f"{RULE_PACKAGE}.{info.name}" for info in pkgutil.iter_modules(package.__path__)
                  if not info.name.startswith("_"))


def _discover_rules() -> None:
    """Imports every rule module once (each registers its rules); then checks the rules' order."""
    global _discovery
    if _discovery != "not started":
        return
    _discovery = "running"
    try:
        for module in rule_modules():
            importlib.import_module(module)
    except BaseException:
        _discovery = "not started"
        raise
    _discovery = "done"
    _application_order()  # a cycle or an unknown name in a built-in rule is a bug: report it now


def _application_order() -> List[PatchRule]:
    """The rules in dependency order: a stable topological sort of the registry (a rule runs after every rule
    in its ``after`` and before every rule it was registered ``before``; otherwise registration order).

    Raises:
        ValueError: a rule names an unknown rule, or the constraints form a cycle."""
    global _ordered
    if _ordered is not None:
        return _ordered
    names = [r.name for r in _registry]
    preceding: Dict[str, set] = {name: set() for name in names}
    for rule in _registry:
        for first in rule.after:
            if first not in preceding:
                raise ValueError(f"rule {rule.name!r}: after={rule.after} names no registered rule; "
                                 f"registered: {names}")
            preceding[rule.name].add(first)
        for later in _before.get(rule.name, ()):
            if later not in preceding:
                raise ValueError(f"rule {rule.name!r}: before={later!r} is not a registered rule; registered: {names}")
            preceding[later].add(rule.name)
    order: List[PatchRule] = []
    placed: set = set()
    while len(order) < len(_registry):
        ready = next((r for r in _registry if r.name not in placed and preceding[r.name] <= placed), None)
        if ready is None:
            stuck = [n for n in names if n not in placed]
            raise ValueError(f"the rules {stuck} order each other in a cycle (after= / before=)")
        order.append(ready)
        placed.add(ready.name)
    _ordered = order
    return order


def register_rule(rule: PatchRule, *, before: Optional[str] = None) -> PatchRule:
    """Adds ``rule`` to the registry (replacing a rule of the same name) and returns it.

    The rule runs after the rules named in its ``after`` and, with ``before``, ahead of the rule named so;
    otherwise after the rules registered earlier (the built-in rules are loaded first).

    Raises:
        ValueError: ``rule`` is not a :class:`PatchRule`, or it names unknown rules / makes a cycle (then the
            registry is left as it was)."""
    if not isinstance(rule, PatchRule):
        raise ValueError(f"rule must be a PatchRule, got {type(rule).__name__}")
    if before is not None and not isinstance(before, str):
        raise ValueError(f"before must be a rule name or None, got {before!r}")
    _discover_rules()  # the built-in rules keep their place ahead of the user's
    global _ordered
    saved_registry, saved_before = list(_registry), dict(_before)
    _registry[:] = [r for r in _registry if r.name != rule.name] + [rule]
    _before.pop(rule.name, None)
    if before is not None:
        _before[rule.name] = (before,)
    _ordered = None
    if _discovery == "done":  # during discovery the rules named may not be registered yet
        try:
            _application_order()
        except ValueError:
            _registry[:] = saved_registry
            _before.clear()
            _before.update(saved_before)
            _ordered = None
            raise
    return rule


def register_builtin_rule(rule: PatchRule) -> PatchRule:
    """:func:`register_rule` for the modules of :mod:`monkey_kernels.rules`, called on their import: it neither
    loads the other rule modules (a rule module may be imported on its own, e.g. for ``adapter_selection``) nor
    checks the order yet (the rules it names may register later); both happen on the first use of the rules."""
    if not isinstance(rule, PatchRule):
        raise ValueError(f"rule must be a PatchRule, got {type(rule).__name__}")
    global _ordered
    _registry[:] = [r for r in _registry if r.name != rule.name] + [rule]
    _ordered = None
    return rule


def registered_rules() -> List[PatchRule]:
    """Every registered rule, in the order ``patch_model`` applies them."""
    _discover_rules()
    return list(_application_order())


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


def _restore(root: nn.Module, name: str, rule: PatchRule, fused: nn.Module) -> None:
    reference = rule.to_reference(fused)
    fused.__dict__.pop(_RULE_ATTR, None)
    reference.__dict__.pop(_RULE_ATTR, None)
    _set_child(root, name, reference, fused)


def is_patched(model: nn.Module) -> bool:
    return _STATE_ATTR in model.__dict__


def rule_of(module: nn.Module) -> Optional[str]:
    """The name of the rule that produced ``module`` (a fused module, or one patched in place), or ``None``."""
    return module.__dict__.get(_RULE_ATTR)


def _nothing_to_patch_message(model: nn.Module, rules: List[PatchRule], skipped) -> str:
    needs = "; ".join(f"{r.name}: {r.description}" if r.description else r.name for r in rules)
    message = (f"patch_model found nothing to patch in {type(model).__name__}: no module matched a rule "
               f"({needs})")
    if skipped:
        grouped: Dict[Tuple[str, str], List[str]] = {}
        for name, rule, reason in skipped:
            grouped.setdefault((rule, reason), []).append(name or type(model).__name__)
        lines = []
        for (rule, reason), names in grouped.items():
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            lines.append(f"{shown} [{rule}]: {reason}")
        message += "; recognised but not patched: " + "; ".join(lines)
    return message


def patch_model(model: nn.Module, *, backend: Optional[str] = None, strict: bool = True) -> PatchReport:
    """Replaces, on the instance ``model``, every module a registered rule matches by its fused module.

    Args:
        model: any ``nn.Module`` holding modules of a supported family (Monkey blocks of this package's model or
            a copy of the public Monkey code, a Monkey VLM, PEFT LoRA layers, an SLP embedding layer, ...).
        backend: backend of the fused ops (``"triton"``, ``"native"``, ``"torch"``, ``None`` = automatic; see
            :mod:`monkey_kernels.ops.backends`).
        strict: when nothing matches, raise :class:`NothingToPatchError` (``True``) or only warn.
    Returns:
        A :class:`PatchReport` of the replacements and of what was recognised but left alone (with the reason).
        Patching an already patched model changes nothing, warns and returns a report with
        ``already_patched=True``.
    Raises:
        NothingToPatchError: nothing matched (``strict``); the message says what each rule needs and lists what
            was recognised but skipped, and why.
        ValueError: a bad argument, or a rule that cannot fuse a module it matched (e.g. adapters of different
            ranks in one list): the model is then left exactly as it was.
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
    rules = registered_rules()
    options = PatchOptions(backend=backend)
    report = PatchReport()
    done: List[Tuple[str, PatchRule, nn.Module]] = []
    try:
        for rule in rules:
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
                done.append((name, rule, fused))
                report.rules[rule.name] += 1
                report.kinds.update(rule.kinds)
    except BaseException:
        # Atomic: a rule that fails half-way (e.g. adapters of different ranks in one list) leaves the model
        # exactly as it was, not half-patched.
        for name, rule, fused in reversed(done):
            _restore(model, name, rule, fused)
        raise
    patched = {name for name, _, _ in done}
    report.skipped = [entry for entry in report.skipped if entry[0] not in patched]  # another rule took it
    if report.total == 0:
        message = _nothing_to_patch_message(model, rules, report.skipped)
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
    report = PatchReport()
    # Reverse application order: a container's patch depends on its fused children.
    for rule in reversed(registered_rules()):
        for name, module in list(model.named_modules()):
            if getattr(module, _RULE_ATTR, None) != rule.name:
                continue
            _restore(model, name, rule, module)
            report.rules[rule.name] += 1
            report.kinds.update(rule.kinds)
    del model.__dict__[_STATE_ATTR]
    return report
