"""``torch.compile`` on the fused ops and on patched models (CPU).

The fused ops are PyTorch custom ops (``torch.ops.monkey_kernels.*``) with fake implementations and a
registered autograd formula, so Dynamo keeps each one whole: no graph break inside them, and a patched model
compiles with ``fullgraph=True``, in eval and in training with LoRA dropout (the seeds are drawn as tensors).
"""
from __future__ import annotations

import pytest
import torch

from conftest import kernel_device
from monkey_kernels import SegmentInfo, multi_lora_linear, multi_lora_linear_bwd, multi_lora_linear_fwd
from monkey_kernels.patching import patch_model
from helpers.monkey_models import make_model, views

BACKENDS = ["triton", "torch"]


def small_problem(dtype, device, lora_in=None):
    K, N, A, R = 24, 20, 3, 6
    lengths, ids = [5, 0, 11, 7], [2, 0, -1, 1]
    x = torch.randn(sum(lengths), K, dtype=dtype, device=device, requires_grad=True)
    v = None if lora_in is None else torch.randn(sum(lengths), lora_in, dtype=dtype, device=device,
                                                 requires_grad=True)
    w = torch.randn(N, K, dtype=dtype, device=device, requires_grad=True)
    bias = torch.randn(N, dtype=dtype, device=device, requires_grad=True)
    a = torch.randn(A, R, lora_in or K, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(A, N, R, dtype=dtype, device=device, requires_grad=True)
    s = torch.rand(A, dtype=dtype, device=device).add_(0.5).requires_grad_()
    res = torch.randn(sum(lengths), N, dtype=dtype, device=device, requires_grad=True)
    indptr = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    segments = SegmentInfo.from_indptr(indptr, ids, device=device)
    return dict(x=x, v=v, w=w, bias=bias, a=a, b=b, s=s, res=res, segments=segments, ranks=[6, 3, 5])


def run(fn, p, dropout_p, seed):
    y = fn(p["x"], p["w"], p["bias"], p["a"], p["b"], p["s"], p["res"], p["v"], p["segments"], p["ranks"],
           dropout_p, seed)
    leaves = [t for k, t in p.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y) + 0.1 * torch.arange(y.numel()).view_as(y) / y.numel())
    return y, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["shared_input", "separate_input_dropout"])
def test_op_compiles_fullgraph_and_matches_eager(backend, variant):
    device = kernel_device(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    p = small_problem(dtype, device, lora_in=None if variant == "shared_input" else 9)
    dropout_p = 0.0 if variant == "shared_input" else 0.25

    def op(x, w, bias, a, b, s, res, v, segments, ranks, dropout_p, seed):
        return multi_lora_linear(x, w, bias, a, b, s, segments, ranks=ranks, lora_input=v, residual=res,
                                 dropout_p=dropout_p, seed=seed, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(op, fullgraph=True, backend="aot_eager")
    y_eager, g_eager = run(op, p, dropout_p, 1234)
    y_comp, g_comp = run(compiled, p, dropout_p, 1234)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_comp, y_eager, **tol)
    for got, want in zip(g_comp, g_eager):
        torch.testing.assert_close(got, want, **tol)


def test_custom_ops_pass_opcheck():
    """Schema, fake implementation, autograd registration and dispatch of both ops, checked by PyTorch."""
    p = small_problem(torch.float64, torch.device("cpu"))
    seg = p["segments"]
    ranks = torch.tensor(p["ranks"], dtype=torch.int32)
    seed = torch.tensor(7, dtype=torch.int64)
    fwd_args = (p["x"], None, p["w"], p["bias"], p["a"], p["b"], p["s"], p["res"], ranks, seg.seg_indptr,
                seg.adapter_ids, seg.row_segment, seg.row_adapter, -1, 8, 0.1, seed, "torch")
    torch.library.opcheck(multi_lora_linear_fwd, fwd_args)
    y, h = multi_lora_linear_fwd(*fwd_args)
    bwd_args = (torch.randn_like(y), p["x"].detach(), None, p["w"].detach(), p["a"].detach(), p["b"].detach(),
                p["s"].detach(), h.detach(), ranks, seg.seg_indptr, seg.adapter_ids, seg.row_segment,
                seg.row_adapter, -1, 8, 0.1, seed, "torch", [True, False, True, False, True])
    torch.library.opcheck(multi_lora_linear_bwd, bwd_args)


def test_patched_model_compiles_without_graph_breaks_inductor():
    """``torch.compile(model)`` with the default (Inductor) backend: no graph break, same outputs."""
    model = make_model("cpu")
    patch_model(model, backend="torch")
    model.eval()
    x = views(2, 4, model.config, "cpu")
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        # fullgraph=True is the no-graph-break check: Dynamo raises at the first break, with its reason
        # (a separate torch._dynamo.explain pass would trace the model a second time).
        got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_patched_model_trains_compiled_with_dropout():
    """Training mode with LoRA dropout compiles as one graph (seeds drawn as tensors inside it) and gives the
    eager outputs and gradients for the same ``torch.manual_seed``."""
    model = make_model("cpu", lora_dropout=0.2)
    patch_model(model, backend="torch")
    model.train()
    x = views(2, 2, model.config, "cpu")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")

    def step(fn):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(99)
        out = fn(x)
        out.square().mean().backward()
        return out.detach(), {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}

    out_eager, grads_eager = step(model)
    out_comp, grads_comp = step(compiled)
    torch.testing.assert_close(out_comp, out_eager, rtol=1e-4, atol=1e-5)
    assert grads_comp.keys() == grads_eager.keys() and any("lora_scale" in n for n in grads_comp)
    for name in grads_eager:
        torch.testing.assert_close(grads_comp[name], grads_eager[name], rtol=1e-4, atol=1e-5, msg=name)
    # the masks depend on the seed: another seed gives another output
    torch.manual_seed(100)
    assert not torch.allclose(compiled(x), out_eager)


def test_patched_peft_model_compiles_without_graph_breaks():
    """A PEFT model patched in place, with one adapter (or none) per batch row: one graph, same output."""
    pytest.importorskip("peft")
    from monkey_kernels import set_adapter_rows
    from helpers.peft_towers import ADAPTERS, make_peft, pixels

    model = make_peft("siglip")
    patch_model(model, backend="torch")
    model.eval()
    names = list(ADAPTERS)
    set_adapter_rows(model, [names[0], "__base__", names[-1]])
    x = pixels(model, 3, "cpu")
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state
        torch._dynamo.reset()
        # fullgraph=True: any graph break raises (see the Monkey model's test above)
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(pixel_values=x).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
