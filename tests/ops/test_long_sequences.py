"""Partial LoRA's layout at the op level: long token rows (8k+), several image spans per row, a span cut by
truncation at the end of a row, text runs as base-only (id -1) segments; rank 256 and rank 8, under fp16 / bf16
autocast, every backend.

The reference is InternLM-XComposer's ``PLoRA`` forward restated (reference-models.md §7): ``res = x W^T + b;
res[im_mask] += B(A(x[im_mask])) * scaling``, run unpatched under the same autocast; the op runs the image runs
as segments of adapter 0 and the text runs as base-only segments. Under Triton's interpreter (no GPU) a kernel
program costs tens of milliseconds, so the triton backend runs the same layout on rows of 600 tokens there (the
kernels have no path that depends on the row count); CPU backends and compiled kernels run 4200-token rows.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import available_backends, kernel_device
from helpers.accuracy import assert_within_pytorch_error
from monkey_kernels import SegmentInfo, multi_lora_linear
from monkey_kernels._triton.env import interpreter_active

BACKENDS = available_backends()


def segments_from_image_mask(im_mask: torch.Tensor) -> SegmentInfo:
    """Each row's runs of image tokens as segments of adapter 0 and its text runs as base-only segments (a run
    never crosses a row), over the flattened ``[B * S]`` tokens."""
    indptr, ids = [0], []
    for row in im_mask.cpu().tolist():
        start = 0
        for i in range(1, len(row) + 1):
            if i == len(row) or row[i] != row[start]:
                indptr.append(indptr[-1] + i - start)
                ids.append(0 if row[start] else -1)
                start = i
    return SegmentInfo.from_indptr(indptr, ids, device=im_mask.device)


def image_mask(batch: int, seq: int, span: int, device) -> torch.Tensor:
    """Row 0: text, two image spans with text between, a third span cut by the end of the row; row 1: one span
    at the start, a short one in the middle, text to the end; more rows repeat the pattern shifted."""
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    for b in range(batch):
        shift = 3 * b
        if b % 2 == 0:
            mask[b, 7 + shift:7 + shift + span] = True
            mask[b, 2 * span:3 * span] = True
            mask[b, seq - span // 2:] = True  # truncated: the span runs past the end of the row
        else:
            mask[b, shift:shift + span] = True
            mask[b, seq // 2:seq // 2 + 20] = True
    return mask.to(device)


def plora_reference(x, weight, bias, plora_a, plora_b, scaling, im_mask):
    """``PLoRA.forward(x, im_mask)`` of the public InternLM-XComposer code, restated (no dropout)."""
    res = F.linear(x, weight, bias)
    if im_mask.any():
        part = x[im_mask]
        res[im_mask] += F.linear(F.linear(part, plora_a), plora_b) * scaling
    return res


def _cases():
    for backend in BACKENDS:
        for rank, amp in ((256, torch.bfloat16), (8, torch.float16), (256, torch.float16), (8, torch.bfloat16)):
            if backend == "triton" and interpreter_active() and (rank, amp) in ((256, torch.float16),
                                                                              (8, torch.bfloat16)):
                continue  # the interpreter is slow: one case per rank (both dtypes) on the Triton kernels
            yield pytest.param(backend, rank, amp, id=f"{backend}-rank{rank}-{str(amp).split('.')[-1]}")


@pytest.mark.parametrize("backend, rank, amp", list(_cases()))
def test_partial_lora_layout_under_autocast(backend, rank, amp):
    device = kernel_device(backend)
    seq, span = (600, 150) if backend == "triton" and interpreter_active() else (4200, 1225)
    batch, K, N, scaling = 2, 16, 24, 2.0
    im_mask = image_mask(batch, seq, span, device)
    segments = segments_from_image_mask(im_mask)
    assert segments.num_rows == batch * seq and (segments.adapter_ids == -1).any()

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).float().to(device).requires_grad_()

    x, weight, bias = rand(batch, seq, K), rand(N, K, scale=K**-0.5), rand(N)
    plora_a, plora_b = rand(rank, K, scale=K**-0.5), rand(N, rank, scale=rank**-0.5)
    masters = dict(input=x, weight=weight, bias=bias, lora_a=plora_a, lora_b=plora_b)
    with torch.autocast(device.type, dtype=amp):
        out = multi_lora_linear(x.view(batch * seq, K), weight, bias, plora_a[None], plora_b[None],
                                torch.tensor([scaling], device=device), segments, backend=backend)
    out = out.view(batch, seq, N)

    def reference(dtype, autocast):
        leaves = {n: t.detach().cpu().to(dtype).requires_grad_() for n, t in masters.items()}
        with torch.autocast("cpu", dtype=amp, enabled=autocast):
            y = plora_reference(leaves["input"], leaves["weight"], leaves["bias"], leaves["lora_a"],
                                leaves["lora_b"], scaling, im_mask.cpu())
        return y, leaves

    plain, plain_leaves = reference(torch.float32, True)
    ref64, leaves64 = reference(torch.float64, False)
    assert out.dtype == plain.dtype == amp
    grad_output = torch.randn(out.shape, dtype=torch.float64).to(amp)
    names = list(masters)
    grads = dict(zip(names, torch.autograd.grad(out, [masters[n] for n in names], grad_output.to(device))))
    grads_plain = dict(zip(names, torch.autograd.grad(plain, [plain_leaves[n] for n in names], grad_output)))
    grads64 = dict(zip(names, torch.autograd.grad(ref64, [leaves64[n] for n in names], grad_output.double())))
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
    assert_within_pytorch_error(backend, amp, out, plain, ref64, grads, grads_plain, grads64)
    # text rows get the base linear only: exactly what the op computes without any adapter
    text = ~im_mask
    with torch.autocast(device.type, dtype=amp):
        base = multi_lora_linear(x.detach()[text], weight.detach(), bias.detach(), plora_a.detach()[None],
                                 plora_b.detach()[None], torch.tensor([scaling], device=device),
                                 SegmentInfo.from_indptr([0, int(text.sum())], [-1], device=device), backend=backend)
    torch.testing.assert_close(out.detach()[text], base, rtol=0, atol=0)
