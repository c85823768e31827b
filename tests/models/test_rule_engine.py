"""The patch engine: rule modules found without a hand-kept list, order declared by the rules, user rules,
the composed nothing-to-patch message, a new family added by dropping a module in ``monkey_kernels/rules``,
light imports, and the one Monkey-structure recogniser shared by the rules and growth."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import monkey_kernels.patching as patching
from helpers.monkey_models import Lora_Adapter, UserTower, make_model, randomize_
from monkey_kernels.growth import grow_tile_adapters
from monkey_kernels.monkey_structure import adapter_problem, block_problem, is_monkey_block
from monkey_kernels.patching import (NothingToPatchError, PatchRule, patch_model, register_rule, registered_rules,
                                     rule_modules, unpatch_model)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def saved_registry():
    """Restores the registry (and the discovery state) after a test that registers rules."""
    registered_rules()
    saved = (list(patching._registry), dict(patching._before), patching._discovery)
    yield
    patching._registry[:] = saved[0]
    patching._before.clear()
    patching._before.update(saved[1])
    patching._discovery = saved[2]
    patching._ordered = None


def test_every_rule_module_is_found_and_registers_in_declared_order():
    rules_dir = os.path.join(ROOT, "monkey_kernels", "rules")
    on_disk = sorted(f"monkey_kernels.rules.{f[:-3]}" for f in os.listdir(rules_dir)
                     if f.endswith(".py") and not f.startswith("_"))
    assert rule_modules() == on_disk
    rules = registered_rules()
    names = [r.name for r in rules]
    assert {"monkey_transformer", "monkey_block", "monkey_vision_model", "monkey_vlm", "peft_lora_linear",
            "slp_embedding"} <= set(names)
    for position, rule in enumerate(rules):
        assert all(names.index(first) < position for first in rule.after), (rule.name, rule.after)
        assert rule.description, f"{rule.name} has no description"
    for module in on_disk:  # each module defines its own rules
        assert any(r.to_fused.__module__ == module for r in rules), module


def test_user_rules_order_and_errors(saved_registry):
    def never(module):
        return False

    def keep(module, options):
        return module

    first = register_rule(PatchRule("user_first", never, keep, keep))
    assert [r.name for r in registered_rules()][-1] == "user_first"
    register_rule(PatchRule("user_before", never, keep, keep), before="monkey_block")
    names = [r.name for r in registered_rules()]
    assert names.index("user_before") < names.index("monkey_block")
    register_rule(PatchRule("user_after", never, keep, keep, after=("user_before",)), before="monkey_vlm")
    names = [r.name for r in registered_rules()]
    assert names.index("user_before") < names.index("user_after") < names.index("monkey_vlm")

    before = [r.name for r in registered_rules()]
    with pytest.raises(ValueError, match="names no registered rule"):
        register_rule(PatchRule("bad", never, keep, keep, after=("no_such_rule",)))
    with pytest.raises(ValueError, match="is not a registered rule"):
        register_rule(PatchRule("bad", never, keep, keep), before="no_such_rule")
    with pytest.raises(ValueError, match="cycle"):
        register_rule(PatchRule("user_first", never, keep, keep, after=("monkey_vlm",)), before="monkey_block")
    assert [r.name for r in registered_rules()] == before, "a refused rule left the registry changed"
    assert registered_rules()[before.index("user_first")] is first
    with pytest.raises(ValueError, match="rule must be a PatchRule"):
        register_rule("rule")


class Doubler(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return x * self.scale


def test_a_user_rule_patches_reports_and_unpatches(saved_registry):
    def to_fused(module, options):
        module.forward = patching.InstanceForward(lambda m, x: torch.mul(x, m.scale), module)
        return module

    def to_reference(module):
        module.__dict__.pop("forward")
        return module

    register_rule(PatchRule("doubler", lambda m: type(m) is Doubler, to_fused, to_reference, kinds={"mul": 1},
                            description="a Doubler"))
    model = nn.Sequential(Doubler(), nn.ReLU())
    x = torch.randn(3)
    report = patch_model(model)
    assert report.rules == {"doubler": 1} and report.kinds == {"mul": 1}
    torch.testing.assert_close(model(x), torch.relu(2 * x))
    assert unpatch_model(model).rules == {"doubler": 1} and "forward" not in model[0].__dict__
    with pytest.raises(NothingToPatchError) as error:
        patch_model(nn.Sequential(nn.ReLU()))
    message = str(error.value)
    assert "doubler: a Doubler" in message
    for rule in registered_rules():
        assert f"{rule.name}: {rule.description}" in message


def test_adding_a_family_is_dropping_a_module_in_rules(saved_registry, tmp_path):
    """A new module in the rules package is found and its rule applied, in the order it declares; nothing else
    changes."""
    (tmp_path / "toy_family.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn
        from monkey_kernels.patching import InstanceForward, PatchRule, register_builtin_rule

        def _to_fused(module, options):
            module.forward = InstanceForward(lambda m, x: torch.mul(x, m.scale), module)
            return module

        def _to_reference(module):
            module.__dict__.pop("forward")
            return module

        TOY_RULE = register_builtin_rule(PatchRule(
            "toy_scale", lambda m: type(m).__name__ == "Doubler", _to_fused, _to_reference,
            after=("monkey_vlm",), description="a Doubler"))
    '''))
    import monkey_kernels.rules as rules_package

    rules_package.__path__.append(str(tmp_path))
    try:
        patching._discovery = "not started"
        assert "monkey_kernels.rules.toy_family" in rule_modules()
        names = [r.name for r in registered_rules()]
        assert names.index("toy_scale") > names.index("monkey_vlm")
        model = nn.Sequential(Doubler())
        assert patch_model(model).rules == {"toy_scale": 1}
        unpatch_model(model)
    finally:
        rules_package.__path__.remove(str(tmp_path))
        sys.modules.pop("monkey_kernels.rules.toy_family", None)


def test_patching_an_slp_layer_imports_neither_transformers_nor_peft():
    code = textwrap.dedent('''
        import sys
        import torch
        from torch import nn
        from monkey_kernels import patch_model
        from monkey_kernels.ops.slp.reference import SLPEmbeddingRef, SpatialLayoutProjector
        layer = nn.Sequential(SLPEmbeddingRef(nn.Embedding(9, 4), SpatialLayoutProjector(4), box_token_id=0,
                                              image_token_id=8))
        report = patch_model(layer, backend="torch")
        assert report.rules["slp_embedding"] == 1, report
        heavy = [m for m in ("transformers", "peft") if m in sys.modules]
        assert not heavy, heavy
        print("ok")
    ''')
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------
# The one Monkey-structure recogniser
# ---------------------------------------------------------------------------------------------------------
def broken_adapters():
    """``{what: (adapter, fragment of the problem)}``: modules that are not Monkey LoRA adapters."""
    biased = Lora_Adapter(8, 8, r=2)
    biased.lora_b = nn.Linear(2, 8, bias=True)
    two_scales = Lora_Adapter(8, 8, r=2)
    two_scales.lora_scale = nn.Parameter(torch.ones(2))
    odd_dropout = Lora_Adapter(8, 8, r=2)
    odd_dropout.lora_dropout = nn.ReLU()
    ranks = Lora_Adapter(8, 8, r=2)
    ranks.lora_b = nn.Linear(3, 8, bias=False)
    conv = Lora_Adapter(8, 8, r=2)
    conv.lora_a = nn.Conv1d(8, 2, 1, bias=False)
    return {"bias": (biased, "has a bias"), "scale": (two_scales, "not one value"),
            "dropout": (odd_dropout, "lora_dropout of type ReLU"), "rank": (ranks, "of rank 3"),
            "conv": (conv, "not a LoRA adapter"), "linear": (nn.Linear(8, 8), "not a LoRA adapter")}


def test_adapter_definition():
    assert adapter_problem(Lora_Adapter(8, 8, r=2)) is None
    buffer_scale = Lora_Adapter(8, 8, r=2)
    del buffer_scale.lora_scale
    buffer_scale.register_buffer("lora_scale", torch.ones(1))  # a frozen scale as a buffer is an adapter too
    assert adapter_problem(buffer_scale) is None
    no_dropout = Lora_Adapter(8, 8, r=2)
    del no_dropout.lora_dropout
    assert adapter_problem(no_dropout) is None
    for what, (adapter, fragment) in broken_adapters().items():
        assert fragment in adapter_problem(adapter), what


@pytest.mark.parametrize("what", list(broken_adapters()))
def test_patching_and_growth_agree_on_what_an_adapter_is(what):
    """A block holding a non-adapter is skipped by patch_model (model untouched, still runs) and refused by
    grow_tile_adapters, with the same problem."""
    adapter, fragment = broken_adapters()[what]
    tower = randomize_(UserTower()).double().eval()
    tower.transformer.resblocks[1].attn.out_proj_lora[3] = adapter.double()
    block = tower.transformer.resblocks[1]
    assert not is_monkey_block(block) and fragment in block_problem(block)
    x = torch.randn(4, 2, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = tower(x, idx=0)
    with pytest.raises(NothingToPatchError, match=r"out_proj_lora\[3\]") as error:
        patch_model(tower, backend="torch")
    assert fragment in str(error.value)
    with pytest.raises(ValueError, match=r"attn.out_proj_lora\[3\]") as grown:
        grow_tile_adapters(tower, 6, "mean")
    assert fragment in str(grown.value)
    with torch.no_grad():
        assert torch.equal(tower(x, idx=0), expected)


def test_fused_blocks_are_monkey_blocks_too():
    model = make_model("cpu")
    patch_model(model, backend="torch")
    assert all(is_monkey_block(b) for b in model.transformer.resblocks)
