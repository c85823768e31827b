"""Edge cases of the multi-LoRA op and its module that a hostile user reaches: no adapters at all, float ranks,
a ranks buffer loaded from a bad checkpoint, a second derivative, meta-device metadata, float64 under dropout."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import available_backends, kernel_device
from monkey_kernels import MultiLoRALinear, SegmentInfo, dropout_keep_mask, multi_lora_linear, multi_lora_linear_ref

BACKENDS = available_backends()


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_adapters, r_max", [(0, 4), (3, 0)])
def test_no_adapter_or_rank_zero_is_the_base_linear(backend, num_adapters, r_max):
    device, dtype = kernel_device(backend), _dtype(backend)
    x = torch.randn(3, 5, 12, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(7, 12, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(7, device=device, dtype=dtype, requires_grad=True)
    a = torch.randn(num_adapters, r_max, 12, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(num_adapters, 7, r_max, device=device, dtype=dtype, requires_grad=True)
    s = torch.rand(num_adapters, device=device, dtype=dtype, requires_grad=True)
    ids = [-1, -1, -1] if num_adapters == 0 else [0, -1, 2]
    y = multi_lora_linear(x, w, bias, a, b, s, ids, backend=backend)
    want = F.linear(x.detach().double(), w.detach().double(), bias.detach().double())
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(y.double(), want, atol=tol, rtol=tol)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(x.grad.double(), dy.double() @ w.detach().double(), atol=tol * 10, rtol=tol * 10)
    for t in (a, b, s):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


def test_an_adapter_id_with_no_adapters_is_named():
    x, w = torch.randn(2, 3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="adapter id 0, out of range for num_adapters=0"):
        multi_lora_linear(x, w, None, torch.randn(0, 2, 4), torch.randn(0, 5, 2), torch.rand(0), [0, -1],
                          backend="torch")


@pytest.mark.parametrize("ranks", [[1.5, 2], [True, 2], [2, "2"]])
def test_ranks_must_be_ints(ranks):
    x, w = torch.randn(2, 3, 4), torch.randn(5, 4)
    a, b, s = torch.randn(2, 2, 4), torch.randn(2, 5, 2), torch.rand(2)
    with pytest.raises(ValueError, match="ranks must be ints"):
        multi_lora_linear(x, w, None, a, b, s, [0, 1], ranks=ranks, backend="torch")
    with pytest.raises(ValueError, match="rank must be an int or a sequence of ints"):
        MultiLoRALinear(4, 5, num_adapters=2, rank=ranks)


def test_a_ranks_buffer_above_r_max_from_a_checkpoint_is_an_error():
    layer = MultiLoRALinear(6, 5, num_adapters=2, rank=[2, 3], backend="torch")
    x = torch.randn(2, 3, 6)
    layer(x, [0, 1])  # validated once, then steady-state calls read nothing back
    state = layer.state_dict()
    state["ranks"] = torch.tensor([2, 9], dtype=torch.int32)
    layer.load_state_dict(state)
    with pytest.raises(ValueError, match=r"ranks must be <= r_max=3"):
        layer(x, [0, 1])
    with torch.no_grad():
        layer.ranks.copy_(torch.tensor([1, 3], dtype=torch.int32))
    torch.testing.assert_close(layer(x, [0, 1]), multi_lora_linear_ref(
        x, layer.weight, layer.bias, layer.lora_a, layer.lora_b, layer.lora_scale,
        SegmentInfo.from_batch([0, 1], 3), ranks=[1, 3]))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_create_graph_gives_first_order_gradients_and_a_second_derivative_is_refused(backend):
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64)
    a = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 5, 2, dtype=torch.float64, requires_grad=True)
    s = torch.rand(2, dtype=torch.float64, requires_grad=True)
    y = multi_lora_linear(x, w, None, a, b, s, [0, 1], backend=backend)
    (grad_a,) = torch.autograd.grad(y.square().sum(), a, create_graph=True)
    x_ref, a_ref = x.detach().requires_grad_(), a.detach().requires_grad_()
    y_ref = multi_lora_linear_ref(x_ref, w, None, a_ref, b, s, SegmentInfo.from_batch([0, 1], 3))
    torch.testing.assert_close(grad_a, torch.autograd.grad(y_ref.square().sum(), a_ref)[0])
    with pytest.raises(RuntimeError, match="multi_lora_linear has no second derivative"):
        grad_a.sum().backward()


def test_segment_metadata_for_meta_tensors_from_host_ids():
    segments = SegmentInfo.from_batch([0, 1, -1], 4, device="meta")
    assert segments.device.type == "meta" and segments.max_adapter_id == 1 and segments.num_rows == 12
    ragged = SegmentInfo.from_indptr([0, 2, 5], [1, -1], device="meta")
    assert ragged.num_rows == 5 and ragged.max_adapter_id == 1
    with pytest.raises(ValueError, match="adapter_ids\\[1\\]=-2 is invalid"):
        SegmentInfo.from_batch([0, -2], 4, device="meta")
    x = torch.empty(3, 4, 8, device="meta")
    y = multi_lora_linear(x, torch.empty(6, 8, device="meta"), None, torch.empty(2, 2, 8, device="meta"),
                          torch.empty(2, 6, 2, device="meta"), torch.empty(2, device="meta"), segments,
                          backend="torch")
    assert y.shape == (3, 4, 6) and y.device.type == "meta"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_float64_stays_float64_under_dropout(backend):
    """The dropout scale 1 / (1 - p) and the masked LoRA input stay in float64 (no float32 round trip)."""
    p, seed = 0.3, 1234
    x = torch.randn(4, 6, 10, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 10, dtype=torch.float64)
    a = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 7, 4, dtype=torch.float64, requires_grad=True)
    s = torch.rand(3, dtype=torch.float64, requires_grad=True)
    segments = SegmentInfo.from_batch([0, 2, -1, 1], 6)
    y = multi_lora_linear(x, w, None, a, b, s, segments, dropout_p=p, seed=seed, backend=backend)
    keep = dropout_keep_mask(seed, 24, 10, p, "cpu", backend=backend)
    leaves = [t.detach().requires_grad_() for t in (x, a, b, s)]
    y_ref = multi_lora_linear_ref(leaves[0], w, None, leaves[1], leaves[2], leaves[3], segments, keep_mask=keep,
                                  dropout_p=p)
    torch.testing.assert_close(y, y_ref, atol=1e-13, rtol=1e-13)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    for got, want in zip((x, a, b, s), leaves):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-12, rtol=1e-12)
