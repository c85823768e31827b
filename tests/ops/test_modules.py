"""``MultiLoRALinear``: training every adapter part, state dicts, bad calls and empty batches."""
import copy

import pytest
import torch

from conftest import available_backends, kernel_device
from monkey_kernels import MultiLoRALinear, SegmentInfo, multi_lora_linear_ref

BACKENDS = available_backends()
K, N, NUM_ADAPTERS = 8, 5, 2


@pytest.mark.parametrize("backend", available_backends())
def test_module_trains_every_adapter_part_and_keeps_unused_rank_columns_zero(backend):
    device = kernel_device(backend)
    layer = MultiLoRALinear(24, 18, 3, [4, 8, 2], lora_dropout=0.1, backend=backend, device=device)
    assert layer.lora_a.shape == (3, 8, 24) and layer.lora_b.shape == (3, 18, 8)
    assert (layer.lora_a[0, 4:] == 0).all() and (layer.lora_b == 0).all()
    with torch.no_grad():
        layer.lora_b.normal_()
        layer.lora_scale.uniform_(0.5, 1.5)
    x = torch.randn(2, 10, 24, device=device, requires_grad=True)
    ids = torch.tensor([2, -1], device=device)
    layer.train()
    out = layer(x, ids, seed=5)
    assert torch.equal(out, layer(x, ids, seed=5))
    assert not torch.equal(out, layer(x, ids, seed=6))
    out.square().sum().backward()
    assert layer.weight.grad is not None and layer.lora_scale.grad is not None
    assert (layer.lora_a.grad[[0, 1]] == 0).all(), "adapters 0 and 1 own no rows"
    assert (layer.lora_a.grad[2, 2:] == 0).all() and (layer.lora_b.grad[2, :, 2:] == 0).all()
    assert layer.lora_a.grad[2, :2].abs().sum() > 0 and layer.lora_scale.grad[2] != 0

    layer.eval()  # no dropout: equals the reference loop
    segments = SegmentInfo.from_batch([2, -1], 10, device=device)
    with torch.no_grad():
        expected = multi_lora_linear_ref(
            x.double().cpu(), layer.weight.double().cpu(), layer.bias.double().cpu(), layer.lora_a.double().cpu(),
            layer.lora_b.double().cpu(), layer.lora_scale.double().cpu(), segments.to("cpu"), ranks=[4, 8, 2],
        )
        torch.testing.assert_close(layer(x, segments).double().cpu(), expected, rtol=1e-5, atol=1e-5)


def test_module_state_dict_round_trip():
    layer = MultiLoRALinear(6, 4, 2, [2, 3])
    clone = MultiLoRALinear(6, 4, 2, [2, 3])
    clone.load_state_dict(layer.state_dict())
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, clone.state_dict()[name]), name
    assert set(layer.state_dict()) == {"weight", "bias", "lora_a", "lora_b", "lora_scale", "ranks"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_bad_calls_and_empty_training_batch(backend):
    device = kernel_device(backend)
    layer = MultiLoRALinear(K, N, NUM_ADAPTERS, [2, 3], lora_dropout=0.2, backend=backend).to(device).train()
    x = torch.randn(2, 3, K, device=device)
    with pytest.raises(ValueError, match="segments must be a SegmentInfo"):
        layer(x, None)
    with pytest.raises(ValueError, match="seed"):
        layer(x, [0, 1], seed=-1)
    with pytest.raises(ValueError, match="seed"):
        layer(x, [0, 1], seed=2**31)
    with pytest.raises(ValueError, match=r"weight must be \[N, K=7\]"):
        layer(torch.randn(2, 3, 7, device=device), [0, 1])
    with pytest.raises(ValueError, match="weight has dtype"):
        layer(x.double(), [0, 1])
    with pytest.raises(ValueError, match="lora_input must have the leading dims"):
        layer(x, [0, 1], lora_input=torch.randn(3, 2, K, device=device))
    # the largest valid seed, and an empty batch in training mode with dropout on
    assert layer(x, [0, 1], seed=2**31 - 1).shape == (2, 3, N)
    empty = torch.randn(0, 3, K, device=device, requires_grad=True)
    out = layer(empty, [])
    assert out.shape == (0, 3, N)
    out.sum().backward()
    assert layer.lora_a.grad is not None and (layer.lora_a.grad == 0).all()
    with pytest.raises(ValueError, match="weight is on meta"):
        copy.deepcopy(layer).to("meta")(x, [0, 1])


def test_module_constructor_rejects_nan_dropout():
    with pytest.raises(ValueError, match="lora_dropout"):
        MultiLoRALinear(K, N, 2, 2, lora_dropout=float("nan"))
