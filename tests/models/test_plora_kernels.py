"""Kernel coverage of the PLoRA rule on every backend: rank 256 (the released PLoRA rank) and 8 (4KHD's ``wqkv``),
half precision against float64, and long sequences (8k+ tokens, several image spans per row, a span cut at the
end of a row), forward and backward; the same under ``torch.autocast`` (bf16 and fp16 over fp32 weights)."""
from __future__ import annotations

import copy
import itertools
from unittest import mock

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from conftest import available_backends, kernel_device  # noqa: E402
from helpers.accuracy import assert_within_pytorch_error, rel_err  # noqa: E402
from helpers.internlm2_plora_double import PLoRA, PLoRAIXC2, image_mask  # noqa: E402
from monkey_kernels.patching import patch_model  # noqa: E402
from monkey_kernels.rules import plora as plora_rules  # noqa: E402


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


# ------------------------------------------------------------------------------------------------------------
# torch.autocast: fp32 master weights, the layer computing in bf16 / fp16 as the reference does there
# ------------------------------------------------------------------------------------------------------------
AMP_DTYPES = [torch.bfloat16, torch.float16]


def fused_calls():
    """A context counting the PLoRA rules' op calls (``.call_count`` of what it yields)."""
    return mock.patch.object(plora_rules, "multi_lora_linear", wraps=plora_rules.multi_lora_linear)


def autocast_results(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor, grad_out: torch.Tensor, amp):
    """``(y, [dx, dW, db, dA, dB])`` of ``layer(x, mask)`` run under ``torch.autocast(amp)`` (``amp=None``: off);
    the backward outside the region, as a training step runs it."""
    x = x.detach().clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        y = layer(x, mask)
    return y.detach(), torch.autograd.grad(y, [x] + list(layer.parameters()), grad_out.to(y.dtype))


def assert_autocast_layer_matches(backend: str, amp, reference: nn.Module, mask: torch.Tensor, fan_in: int,
                                  fan_out: int) -> None:
    """The patched copy of fp32 ``reference`` under ``autocast(amp)``: the reference's output dtype (the autocast
    dtype), fp32 gradients, and outputs and gradients whose error against float64 is at most the tolerance
    factor times the unpatched layer's own autocast error (``helpers/accuracy.py``)."""
    device = kernel_device(backend)
    exact = copy.deepcopy(reference).double()
    layer = copy.deepcopy(reference).to(device)
    patch_model(layer, backend=backend)
    batch, seq = mask.shape
    x = torch.randn(batch, seq, fan_in).double()  # the same fp32 values for every run
    x = x.float().double()
    grad_out = torch.randn(batch, seq, fan_out).to(amp).double()  # what reaches the autocast output
    want = autocast_results(exact, x, mask, grad_out, None)
    plain = autocast_results(reference, x.float(), mask, grad_out, amp)
    with fused_calls() as calls:
        got = autocast_results(layer, x.float().to(device), mask.to(device), grad_out.to(device), amp)
    assert calls.call_count == 1  # served by the fused op, not the original forward
    assert got[0].dtype == plain[0].dtype == amp
    names = ["x", "weight", "bias", "Plora_A", "Plora_B"]
    for name, g, p in zip(names, got[1], plain[1]):
        assert g.dtype == p.dtype == torch.float32, name
    assert_within_pytorch_error(backend, amp, got[0], plain[0], want[0], dict(zip(names, got[1])),
                                dict(zip(names, plain[1])), dict(zip(names, want[1])))


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("amp", AMP_DTYPES, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("rank, alpha", [(256, 256), (8, 16)])
def test_released_ranks_under_autocast(backend, amp, rank, alpha):
    """Rank 256 (scale 1) and 8 (4KHD's ``wqkv``, scale 2), fp32 master weights, both forms' fused layer under
    CPU autocast bf16 and fp16 (the Triton kernels under the interpreter)."""
    for cls in (PLoRA, PLoRAIXC2):
        reference = make_layer(cls, 32, 24, rank, alpha)
        mask = image_mask([[(2, 20), (30, 33)], [(5, 40)]], 40)
        assert_autocast_layer_matches(backend, amp, reference, mask, 32, 24)


def _long_cases():
    """(backend, amp, rank) of the long-sequence autocast test: every pair on the CPU backends; on the Triton
    interpreter (about 25 s per rank-256 pass over 8400 rows) rank 8 in bf16 only, the other pairings being
    covered there at 80 rows (``test_released_ranks_under_autocast``)."""
    cases = []
    for backend in available_backends():
        for amp, rank in itertools.product(AMP_DTYPES, (256, 8)):
            if backend != "triton" or (amp, rank) == (torch.bfloat16, 8):
                cases.append(pytest.param(backend, amp, rank, id=f"{backend}-{str(amp)[6:]}-r{rank}"))
    return cases


@pytest.mark.parametrize("backend, amp, rank", _long_cases())
def test_long_sequences_under_autocast(backend, amp, rank):
    """8400 rows (two rows of 4200 tokens, 2.5-sized spans of 841 and 1225 tokens, several per row, one cut by
    the end of its row) under autocast."""
    spans = [[(100, 1325), (1400, 2625), (3600, 4825)], [(0, 841), (900, 1741), (3000, 3841)]]
    mask = image_mask(spans, 4200)
    assert mask[0, -1]
    layer = make_layer(PLoRA, 16, 12, rank, 2 * rank)
    assert_autocast_layer_matches(backend, amp, layer, mask, 16, 12)
