"""The backend contract: each op's protocol, the registry every implementation joins (a missing member is an error
at registration, naming the backend and the member), and the one backend list the tools share."""
import ast
from pathlib import Path

import pytest

from conftest import available_backends
from monkey_kernels.ops import registry
from monkey_kernels.ops.backends import BACKENDS, implementation, resolve_backend
from monkey_kernels.ops.multi_lora.torch_impl import TorchMultiLoRA
from monkey_kernels.ops.registry import MultiLoRABackend, SLPBackend, contract_members, register_backend

ROOT = Path(__file__).resolve().parents[2]


def test_protocols_declare_methods_and_capabilities():
    attributes, methods = contract_members(MultiLoRABackend)
    assert attributes == {"name": str, "outer_zeroes_unowned": bool, "supports_merged_weights": bool}
    assert methods == {"shrink": None, "fused_gemm": None, "outer": None, "dropout_keep_mask": None,
                       "merge_worthwhile": "supports_merged_weights", "merged_linear": "supports_merged_weights"}
    attributes, methods = contract_members(SLPBackend)
    assert attributes == {"name": str} and methods == {"forward": None, "backward": None}


@pytest.mark.parametrize("op", registry.OPS)
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_every_shipped_backend_is_registered(op, backend):
    resolve_backend(backend, "cpu", op)  # imports and registers the implementation
    impl = registry.registered(op, backend)
    assert impl is not None and impl is implementation(op, backend) and impl.name == backend


def _without(cls, member):
    namespace = {k: v for k, v in vars(cls).items() if k != member and not k.startswith("__")}
    return type("Incomplete", (), namespace)


def test_a_backend_missing_a_method_is_refused_at_registration():
    before = registry.registered("multi_lora", "torch")
    with pytest.raises(ValueError, match=r"the multi_lora backend 'torch' \(Incomplete\) does not implement "
                                         r"MultiLoRABackend: it lacks the method fused_gemm"):
        register_backend("multi_lora", "torch", _without(TorchMultiLoRA, "fused_gemm"))
    assert registry.registered("multi_lora", "torch") is before  # the good registration stays


def test_a_missing_capability_or_a_non_bool_one_is_refused():
    with pytest.raises(ValueError, match="lacks the attribute outer_zeroes_unowned"):
        register_backend("multi_lora", "torch", _without(TorchMultiLoRA, "outer_zeroes_unowned"))
    flawed = type("Flawed", (_without(TorchMultiLoRA, "supports_merged_weights"),), {"supports_merged_weights": 1})
    with pytest.raises(ValueError, match="has supports_merged_weights = 1, expected True or False"):
        register_backend("multi_lora", "torch", flawed)


def test_a_capability_requires_its_methods():
    claims_merge = type("ClaimsMerge", (TorchMultiLoRA,), {"supports_merged_weights": True})
    with pytest.raises(ValueError, match=r"lacks the method merge_worthwhile \(required with supports_merged_weights"
                                         r" = True\); it lacks the method merged_linear"):
        register_backend("multi_lora", "torch", claims_merge)


def test_registration_checks_the_op_the_backend_name_and_the_name_attribute():
    resolve_backend("torch", "cpu", "slp")
    slp_impl = registry.registered("slp", "torch")
    with pytest.raises(ValueError, match="op must be one of"):
        register_backend("conv", "torch", slp_impl)
    with pytest.raises(ValueError, match="backend must be one of .*BACKENDS"):
        register_backend("slp", "cuda-magic", slp_impl)
    with pytest.raises(ValueError, match="has name = 'torch', expected 'native'"):
        register_backend("slp", "native", slp_impl)
    with pytest.raises(ValueError, match="lacks the method backward"):
        register_backend("slp", "torch", _without(slp_impl, "backward"))


def test_the_tools_share_the_one_backend_list():
    """No other hard-coded list of the backends: the CLI, the benchmarks, the test matrix and the examples import
    ``BACKENDS`` (a list or tuple literal holding all three names anywhere else is a second copy)."""
    assert available_backends() == list(BACKENDS)
    copies = []
    for folder in ("monkey_kernels", "benchmarks", "examples", "tests/conftest.py", "tests/ops", "tests/tools"):
        base = ROOT / folder
        for path in ([base] if base.is_file() else base.rglob("*.py")):
            if path.name == "registry.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.List, ast.Tuple)):
                    names = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                    if set(BACKENDS) <= names:
                        copies.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert copies == []
