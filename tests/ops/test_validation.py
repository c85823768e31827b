"""Backend choice (``resolve_backend``, the environment variable) and the module constructor's checks: bad input
gives a ValueError naming the argument. The op's argument tables are in ``test_multi_lora_inputs.py``."""
import pytest
import torch

from conftest import available_backends

from monkey_kernels import MultiLoRALinear, resolve_backend, settings
from monkey_kernels.ops.backends import ENV_BACKEND


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda-magic", cpu)
    monkeypatch.setenv(ENV_BACKEND, "torch")
    assert resolve_backend(None, cpu) == "torch"
    monkeypatch.setenv(ENV_BACKEND, "nonsense")
    with pytest.raises(ValueError, match=ENV_BACKEND):
        resolve_backend(None, cpu)
    monkeypatch.delenv(ENV_BACKEND)
    monkeypatch.setenv(settings.TRITON_INTERPRET.name, "0")
    # CPU tensors: the native extension (CI builds it), else the pure-PyTorch path
    from monkey_kernels import _native

    native_ok = _native.available() or not settings.ALLOW_NO_NATIVE.get()
    assert resolve_backend(None, cpu) == ("native" if native_ok else "torch"), _native.status()
    monkeypatch.setenv(ENV_BACKEND, "native")
    if _native.available():
        assert resolve_backend(None, cpu) == "native"
    else:
        with pytest.raises(ValueError, match="native"):
            resolve_backend(None, cpu)
    monkeypatch.delenv(ENV_BACKEND)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", cpu)
    monkeypatch.setenv(settings.TRITON_INTERPRET.name, "1")
    assert resolve_backend(None, cpu) == "triton"


def test_module_constructor_validation():
    with pytest.raises(ValueError, match="rank"):
        MultiLoRALinear(8, 5, 2, [4])
    with pytest.raises(ValueError, match="ranks must be >= 1"):
        MultiLoRALinear(8, 5, 2, [4, 0])
    with pytest.raises(ValueError, match="lora_dropout"):
        MultiLoRALinear(8, 5, 2, 4, lora_dropout=1.5)


def test_resolve_backend_arguments():
    cpu = torch.device("cpu")
    assert resolve_backend("torch", cpu) == "torch" and resolve_backend("auto", cpu) in available_backends()
    for bad in (3, "", "TORCH", "triton "):
        with pytest.raises(ValueError, match="backend must be one of"):
            resolve_backend(bad, cpu)


def test_resolve_backend_accepts_a_device_string():
    assert resolve_backend(None, "cpu") == resolve_backend(None, torch.device("cpu"))
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="device must be"):
        resolve_backend("torch", "no-such-device")
