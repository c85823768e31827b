"""The one adapter-stacking helper (``monkey_kernels.adapter_stack``): padded stacks and their gradients against a
float64 reference, scales as tensors or floats, the no-grad cache and what invalidates it, id remapping."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from monkey_kernels.adapter_stack import AdapterStack, remap_adapter_ids

RANKS, K, N = (3, 5, 2), 7, 6


def weights(dtype=torch.float64, requires_grad=True):
    a = [torch.randn(r, K, dtype=dtype, requires_grad=requires_grad) for r in RANKS]
    b = [torch.randn(N, r, dtype=dtype, requires_grad=requires_grad) for r in RANKS]
    s = [torch.rand(1, dtype=dtype, requires_grad=requires_grad) + 0.5 for _ in RANKS]
    return a, b, [x.detach().requires_grad_(requires_grad) for x in s]


def reference(a, b, s, dtype):
    r_max = max(RANKS)
    return (torch.stack([F.pad(w, (0, 0, 0, r_max - w.shape[0])).to(dtype) for w in a]),
            torch.stack([F.pad(w, (0, r_max - w.shape[1])).to(dtype) for w in b]),
            torch.cat([x.reshape(1) for x in s]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_padded_stacks_and_gradients_equal_the_reference(dtype):
    a, b, s = weights()
    stacked = AdapterStack()(a, b, s, dtype=dtype, with_ranks=True)
    ref = reference(a, b, s, dtype)
    assert stacked.lora_a.dtype == stacked.lora_b.dtype == dtype
    assert torch.equal(stacked.lora_a, ref[0]) and torch.equal(stacked.lora_b, ref[1])
    assert torch.equal(stacked.scale, ref[2]) and stacked.ranks.tolist() == list(RANKS)
    assert stacked.ranks.dtype == torch.int32
    cotangents = [torch.randn_like(t) for t in ref]
    got = torch.autograd.grad(list(stacked[:3]), a + b + s, cotangents)
    want = torch.autograd.grad(list(ref), a + b + s, cotangents)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=0, atol=0 if dtype == torch.float64 else 1e-6)


def test_float_scales_are_cached_constants():
    a, b, _ = weights(requires_grad=False)
    stack = AdapterStack()
    first = stack(a, b, [0.5, 2.0, 1.25], dtype=torch.float32, scale_dtype=torch.float64)
    assert first.scale.dtype == torch.float64 and first.scale.tolist() == [0.5, 2.0, 1.25]
    assert stack(a, b, [0.5, 2.0, 1.25], dtype=torch.float32, scale_dtype=torch.float64).scale is first.scale
    assert stack(a, b, [0.5, 2.0, 1.5], dtype=torch.float32, scale_dtype=torch.float64).scale.tolist()[2] == 1.5


def test_no_grad_cache_and_what_invalidates_it():
    a, b, s = weights()
    stack = AdapterStack()
    with torch.no_grad():
        first = stack(a, b, s)
        assert stack(a, b, s).lora_a is first.lora_a  # unchanged weights: the cached stacks
        a[1].add_(1.0)  # an in-place write (an optimizer step) bumps the version
        second = stack(a, b, s)
    assert second.lora_a is not first.lora_a and torch.equal(second.lora_a, reference(a, b, s, torch.float64)[0])
    with torch.no_grad():
        b[0].data = b[0].data * 3  # a new storage
        third = stack(a, b, s)
        assert torch.equal(third.lora_b, reference(a, b, s, torch.float64)[1])
        assert stack(a[:2], b[:2], s[:2]).lora_a.shape[0] == 2  # another adapter set
        assert stack(a, b, s, dtype=torch.float32).lora_a.dtype == torch.float32
    trained = stack(a, b, s)  # autograd needed: never cached
    assert trained.lora_a.requires_grad and stack(a, b, s).lora_a is not trained.lora_a
    frozen = [w.detach() for w in a], [w.detach() for w in b], [w.detach() for w in s]
    assert stack(*frozen).lora_a is stack(*frozen).lora_a  # frozen weights are cached in training too
    for clone in (copy.deepcopy(stack), pickle.loads(pickle.dumps(stack))):
        assert clone._stacked is None and not clone._consts  # caches are not copied


def test_bad_calls_raise():
    a, b, s = weights()
    with pytest.raises(ValueError, match="same number"):
        AdapterStack()(a, b[:2], s)
    with pytest.raises(ValueError, match="same number"):
        AdapterStack()([], [], [])


def test_remap_adapter_ids():
    used, positions = remap_adapter_ids(torch.tensor([3, -1, 1, 3]))
    assert used == [1, 3] and positions.tolist() == [1, -1, 0, 1]
    used, positions = remap_adapter_ids(torch.tensor([2, 0, -1]), used=[0, 2, 5])
    assert used == [0, 2, 5] and positions.tolist() == [1, 0, -1]
    ids = torch.tensor([1, 0, -1, 1])
    used, positions = remap_adapter_ids(ids)
    assert used == [0, 1] and positions is ids  # already positions: no remap
    assert remap_adapter_ids(torch.tensor([-1, -1]))[0] == []
