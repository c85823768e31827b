"""CUDA-graph capture of the fused ops and of a patched model's forward (needs a GPU; skipped without one).

Capture fails on any host synchronisation (``.item()``, ``.cpu()``, a host-to-device copy) inside the
captured region, so a passing capture shows the ops and the patched forward have none; replaying with new
inputs must then give the eager result.
"""
from __future__ import annotations

import pytest
import torch

from monkey_kernels import SegmentInfo, multi_lora_linear
from monkey_kernels.cuda_graphs import capture_forward
from monkey_kernels.patching import patch_model
from helpers.monkey_models import make_model, views

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def test_capture_forward_rejects_cpu_inputs():
    with pytest.raises(ValueError, match="example must be a CUDA tensor"):
        capture_forward(lambda x: x, torch.randn(2))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_ragged_multi_lora_linear_replays(dtype):
    device = torch.device("cuda")
    lengths, ids = [37, 0, 129, 64, 5], [2, 0, -1, 1, 2]
    M, K, N, A, R = sum(lengths), 96, 80, 3, 16
    w = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
    bias = torch.randn(N, device=device, dtype=dtype)
    a = torch.randn(A, R, K, device=device, dtype=dtype) / K**0.5
    b = torch.randn(A, N, R, device=device, dtype=dtype) / R**0.5
    s = torch.rand(A, device=device, dtype=dtype) + 0.5
    indptr = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    id_tensor = torch.tensor(ids, dtype=torch.int32, device=device)
    ranks = torch.tensor([16, 4, 9], dtype=torch.int32, device=device)  # a host list would be copied in capture

    def forward(x):
        # metadata built inside the captured region, from device tensors and a known row count
        segments = SegmentInfo.from_indptr(indptr, id_tensor, num_rows=M, validate=False)
        return multi_lora_linear(x, w, bias, a, b, s, segments, ranks=ranks, ranks_checked=True)

    graphed = capture_forward(forward, torch.randn(M, K, device=device, dtype=dtype))
    for _ in range(2):
        x = torch.randn(M, K, device=device, dtype=dtype)
        torch.testing.assert_close(graphed(x).clone(), forward(x))


@needs_cuda
def test_patched_monkey_forward_replays():
    device = torch.device("cuda")
    model = make_model(device, dtype=torch.float16)
    patch_model(model)
    model.eval()
    example = views(2, 4, model.config, device, torch.float16)
    graphed = capture_forward(model, example)
    for _ in range(2):
        x = views(2, 4, model.config, device, torch.float16)
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(graphed(x).clone(), expected, rtol=2e-3, atol=2e-3)
