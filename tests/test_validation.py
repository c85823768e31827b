"""Bad input to the public entry points gives a ValueError naming the argument."""
import os

import pytest
import torch

from conftest import ALLOW_NO_NATIVE, available_backends

from monkey_kernels import MultiLoRALinear, SegmentInfo, multi_lora_linear, resolve_backend
from monkey_kernels.backends import ENV_BACKEND


def make_args(dtype=torch.float32, rows=6, in_features=8, out_features=5, num_adapters=2, r_max=3):
    return dict(
        input=torch.randn(rows, in_features, dtype=dtype),
        weight=torch.randn(out_features, in_features, dtype=dtype),
        bias=torch.randn(out_features, dtype=dtype),
        lora_a=torch.randn(num_adapters, r_max, in_features, dtype=dtype),
        lora_b=torch.randn(num_adapters, out_features, r_max, dtype=dtype),
        scale=torch.ones(num_adapters),
        segments=SegmentInfo.from_indptr([0, 2, 6], [1, -1]),
    )


def call(backend="torch", **overrides):
    args = make_args()
    kwargs = {k: overrides.pop(k) for k in list(overrides) if k in ("ranks", "lora_input", "residual", "dropout_p", "seed")}
    args.update(overrides)
    return multi_lora_linear(
        args["input"], args["weight"], args["bias"], args["lora_a"], args["lora_b"], args["scale"],
        args["segments"], backend=backend, **kwargs,
    )


@pytest.mark.parametrize(
    "overrides, name",
    [
        ({"weight": torch.randn(5, 7)}, "weight"),
        ({"weight": torch.randn(5)}, "weight"),
        ({"bias": torch.randn(4)}, "bias"),
        ({"lora_a": torch.randn(2, 3, 7)}, "lora_a"),
        ({"lora_b": torch.randn(2, 5, 4)}, "lora_b"),
        ({"lora_b": torch.randn(3, 5, 3)}, "lora_b"),
        ({"scale": torch.ones(3)}, "scale"),
        ({"scale": torch.ones(2, dtype=torch.int64)}, "scale"),
        ({"weight": torch.randn(5, 8, dtype=torch.float64)}, "weight"),
        ({"lora_a": torch.randn(2, 3, 8, dtype=torch.bfloat16)}, "lora_a"),
        ({"residual": torch.randn(6, 4)}, "residual"),
        ({"residual": torch.randn(6, 5, dtype=torch.float16)}, "residual"),
        ({"lora_input": torch.randn(5, 8)}, "lora_input"),
        ({"lora_input": torch.randn(6, 9)}, "lora_a"),
        ({"segments": SegmentInfo.from_indptr([0, 2, 7], [1, -1])}, "rows"),
        ({"segments": SegmentInfo.from_indptr([0, 2, 6], [2, 0])}, "adapter id 2"),
        ({"ranks": [3, 4]}, "r_max"),
        ({"ranks": [3, -1]}, "ranks"),
        ({"ranks": [3]}, "ranks"),
        ({"ranks": torch.tensor([1.0, 2.0])}, "ranks"),
        ({"dropout_p": 1.0}, "dropout_p"),
        ({"dropout_p": -0.1}, "dropout_p"),
        ({"seed": -3}, "seed"),
        ({"input": torch.ones(6, 8, dtype=torch.int32)}, "input"),
        ({"input": torch.randn(6, 8, device="meta")}, "device"),
        ({"weight": [[1.0]]}, "weight"),
    ],
)
@pytest.mark.parametrize("backend", available_backends())
def test_bad_arguments_raise_value_error_naming_them(backend, overrides, name):
    with pytest.raises(ValueError, match=name):
        call(backend=backend, **overrides)


def test_adapter_ids_shorthand_needs_batch_layout():
    args = make_args()
    with pytest.raises(ValueError, match="batch, seq, K"):
        call(segments=torch.tensor([0, 1]))
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="one adapter id per batch row"):
        multi_lora_linear(x, args["weight"], None, args["lora_a"], args["lora_b"], args["scale"], [0, 1, 0])
    out = multi_lora_linear(x, args["weight"], None, args["lora_a"], args["lora_b"], args["scale"], [0, -1])
    assert out.shape == (2, 3, 5)


def test_segments_on_another_device_are_rejected():
    args = make_args()
    with pytest.raises(ValueError, match="segments are on"):
        call(input=args["input"].to("meta"), weight=args["weight"].to("meta"), bias=args["bias"].to("meta"),
             lora_a=args["lora_a"].to("meta"), lora_b=args["lora_b"].to("meta"), scale=args["scale"].to("meta"))


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
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    # CPU tensors: the native extension (CI builds it), else the pure-PyTorch path
    from monkey_kernels import _native

    native_ok = _native.available() or os.environ.get(ALLOW_NO_NATIVE, "0") in ("", "0")
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
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(None, cpu) == "triton"


def test_triton_backend_rejects_float64():
    args = make_args(dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        multi_lora_linear(args["input"], args["weight"], args["bias"], args["lora_a"], args["lora_b"],
                          args["scale"].double(), args["segments"], backend="triton")


def test_module_constructor_validation():
    with pytest.raises(ValueError, match="rank"):
        MultiLoRALinear(8, 5, 2, [4])
    with pytest.raises(ValueError, match="ranks must be >= 1"):
        MultiLoRALinear(8, 5, 2, [4, 0])
    with pytest.raises(ValueError, match="lora_dropout"):
        MultiLoRALinear(8, 5, 2, 4, lora_dropout=1.5)
