"""Kernel coverage of the PLoRA rule on every backend: rank 256 (the released PLoRA rank) and 8 (4KHD's ``wqkv``),
half precision against float64, and long sequences (8k+ tokens, several image spans per row, a span cut at the
end of a row), forward and backward."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from conftest import available_backends, kernel_device  # noqa: E402
from helpers.accuracy import rel_err  # noqa: E402
from helpers.internlm2_plora_double import PLoRA, PLoRAIXC2, image_mask  # noqa: E402
from monkey_kernels.patching import patch_model  # noqa: E402


def make_layer(cls, fan_in: int, fan_out: int, rank: int, alpha: int, bias: bool = True) -> nn.Module:
    layer = cls(fan_in, fan_out, bias=bias, lora_r=rank, lora_alpha=alpha, lora_dropout=0.0)
    with torch.no_grad():
        nn.init.normal_(layer.weight, std=fan_in ** -0.5)
        nn.init.normal_(layer.Plora_A.weight, std=fan_in ** -0.5)
        nn.init.normal_(layer.Plora_B.weight, std=rank ** -0.5)
        if bias:
            nn.init.normal_(layer.bias)
    return layer


def results(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor, grad_out: torch.Tensor):
    """``(y, [dx, dW, db, dA, dB])`` of ``layer(x, mask)`` (every Parameter trainable)."""
    x = x.detach().clone().requires_grad_()
    y = layer(x, mask)
    params = [x] + [p for p in layer.parameters()]
    return y.detach(), torch.autograd.grad(y, params, grad_out.to(y.dtype))


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("rank, alpha", [(256, 256), (8, 16)])
def test_released_ranks_match_float64(backend, rank, alpha):
    device = kernel_device(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    reference = make_layer(PLoRA, 24, 20, rank, alpha).double()
    layer = copy.deepcopy(reference).to(device, dtype)
    patch_model(layer, backend=backend)
    mask = image_mask([[(3, 17), (25, 31)], [(0, 9), (36, 60)]], 40)
    x = torch.randn(2, 40, 24, dtype=torch.float64)
    grad_out = torch.randn(2, 40, 20, dtype=torch.float64)
    want = results(reference, x, mask, grad_out)
    got = results(layer, x.to(device, dtype), mask.to(device), grad_out.to(device))
    limit = 1e-12 if dtype == torch.float64 else 2e-6
    assert rel_err(got[0], want[0]) <= limit
    for name, g, w in zip(["x", "weight", "bias", "Plora_A", "Plora_B"], got[1], want[1]):
        assert rel_err(g, w) <= limit, (name, rel_err(g, w))


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_within_pytorch_error(backend, dtype):
    """A bf16 / fp16 model (weights and activations in that dtype, as InternLM-XComposer runs): the fused
    layer's error against float64 is at most twice the reference's own error in the same dtype (it accumulates
    the base and both LoRA GEMMs in fp32 and rounds once; the reference rounds the base, the LoRA product and
    their sum), plus a small floor."""
    device = kernel_device(backend)
    exact = make_layer(PLoRAIXC2, 32, 24, 256, 256).double()
    reference = copy.deepcopy(exact).to(dtype)
    layer = copy.deepcopy(exact).to(device, dtype)
    patch_model(layer, backend=backend)
    mask = image_mask([[(2, 20), (30, 33)], [(5, 40)]], 40)
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    grad_out = torch.randn(2, 40, 24, dtype=torch.float64)
    want = results(exact, x, mask, grad_out)
    plain = results(reference, x.to(dtype), mask, grad_out)
    got = results(layer, x.to(device, dtype), mask.to(device), grad_out.to(device))
    floor = 2 * torch.finfo(dtype).eps
    factor = 3.0 if backend == "triton" and dtype == torch.bfloat16 else 2.0  # the interpreter truncates bf16
    assert got[0].dtype == dtype
    assert rel_err(got[0], want[0]) <= factor * rel_err(plain[0], want[0]) + floor
    for name, g, p, w in zip(["x", "weight", "bias", "Plora_A", "Plora_B"], got[1], plain[1], want[1]):
        assert g.dtype == dtype, name
        assert rel_err(g, w) <= factor * rel_err(p, w) + floor, (name, rel_err(g, w), rel_err(p, w))


@pytest.mark.parametrize("backend", available_backends())
def test_long_sequences_with_several_spans(backend):
    """Two rows of 4200 tokens (8400 rows): 2.5-sized image spans (841 and 1225 tokens), several per row, one
    cut by the end of its row, text between; rank 8."""
    device = kernel_device(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    seq = 4200
    spans = [[(100, 1325), (1400, 2625), (3600, 4825)], [(0, 841), (900, 1741), (3000, 3841)]]
    mask = image_mask(spans, seq)
    assert mask[0, -1] and int(mask.sum()) == 1225 * 2 + 600 + 841 * 3
    reference = make_layer(PLoRA, 16, 12, 8, 16).double()
    layer = copy.deepcopy(reference).to(device, dtype)
    patch_model(layer, backend=backend)
    x = torch.randn(2, seq, 16, dtype=torch.float64)
    grad_out = torch.randn(2, seq, 12, dtype=torch.float64)
    want = results(reference, x, mask, grad_out)
    got = results(layer, x.to(device, dtype), mask.to(device), grad_out.to(device))
    limit = 1e-12 if dtype == torch.float64 else 2e-6
    assert rel_err(got[0], want[0]) <= limit
    text = ~mask
    assert rel_err(got[0].cpu()[text], want[0][text]) <= limit  # text rows alone: the base linear
    for name, g, w in zip(["x", "weight", "bias", "Plora_A", "Plora_B"], got[1], want[1]):
        assert rel_err(g, w) <= limit, (name, rel_err(g, w))
