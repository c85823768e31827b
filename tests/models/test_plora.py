"""The ``plora_linear`` rule on the InternLM2 + PLoRA double (both public forward forms): outputs and gradients of
the patched model against the reference (float64, every backend), the all-text batch's zero (not None) gradients,
dropout (the rows it applies to, its distribution, the op's own masks), the segments built once per forward
(gradient checkpointing's recompute included), the calls it leaves to the original forward, what it skips and
why, unpatching, pickling and ``torch.compile``."""
from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from conftest import available_backends, kernel_device  # noqa: E402
from helpers.internlm2_plora_double import (  # noqa: E402
    HIDDEN, MASKS, B, N, PLoRA, PLoRAIXC2, assert_same_results, build, image_mask, plora_layers, run,
)
from monkey_kernels import SegmentInfo, dropout_keep_mask  # noqa: E402
from monkey_kernels.patching import NothingToPatchError, patch_model, rule_of, unpatch_model  # noqa: E402
from monkey_kernels.rules.plora import RULE_NAME  # noqa: E402

FORMS = ["ixc2", "ixc2d5"]


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("form", FORMS)
def test_patched_model_matches_reference(form, backend):
    """Every mask kind, train mode (dropout 0), bias on; float64 on the CPU backends (summation order only),
    float32 on triton against the float64 reference."""
    device = kernel_device(backend)
    reference = build(form, bias=True).train()
    dtype = torch.float32 if backend == "triton" else torch.float64
    model = copy.deepcopy(reference).to(device=device, dtype=dtype)
    report = patch_model(model, backend=backend)
    assert report.rules[RULE_NAME] == 5 and report.skipped == []
    x = torch.randn(B, N, HIDDEN, dtype=torch.float64)
    weights = torch.randn(B, N, reference.config.vocab_size, dtype=torch.float64)
    for name, spans in MASKS.items():
        mask = image_mask(spans, N)
        want = run(reference, x, mask, weights)
        got = run(model, x.to(device, dtype), mask.to(device), weights.to(device, dtype))
        assert_same_results(got, want, 1e-10 if dtype == torch.float64 else 2e-5)


@pytest.mark.parametrize("form", FORMS)
def test_all_text_batch_keeps_zero_gradients_not_none(form):
    """The reference's zero-multiply branch keeps Plora_A / Plora_B in the graph: zero gradients, not None
    (weight decay and DDP's unused-parameter check see them); the patched model gives the same, and exactly the
    base linear's output."""
    model = build(form)
    reference = copy.deepcopy(model)
    patch_model(model, backend="native")
    x = torch.randn(B, N, HIDDEN, dtype=torch.float64)
    mask = torch.zeros(B, N, dtype=torch.bool)
    weights = torch.randn(B, N, model.config.vocab_size, dtype=torch.float64)
    got, want = run(model, x, mask, weights), run(reference, x, mask, weights)
    assert_same_results(got, want, 1e-10)
    plora = [n for n in got[2] if "Plora_" in n]
    assert len(plora) == 10
    for name in plora:
        assert got[2][name] is not None and torch.count_nonzero(got[2][name]) == 0, name


def test_text_rows_get_exactly_the_base_linear_and_image_rows_the_lora():
    layer = PLoRA(16, 12, bias=True, lora_r=4, lora_alpha=8, lora_dropout=0.0).double()
    for p in layer.parameters():
        nn.init.normal_(p)
    reference = copy.deepcopy(layer)
    patch_model(layer, backend="torch")
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    mask = image_mask([[(2, 5)], [(6, 7)]], 7)
    y = layer(x, mask)
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.equal(y[~mask], base[~mask])
    lora = (x @ layer.Plora_A.weight.t() @ layer.Plora_B.weight.t()) * 2.0
    torch.testing.assert_close(y[mask], base[mask] + lora[mask], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, reference(x, mask), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", available_backends())
def test_dropout_uses_the_ops_mask_on_image_rows_only(backend):
    """Train mode, p = 0.3: the output is the reference formula with the op's own keep-mask (drawn from the seed
    the op takes from torch's CPU generator) on the image rows; text rows are the base linear, untouched."""
    device = kernel_device(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    layer = PLoRAIXC2(16, 12, bias=True, lora_r=4, lora_alpha=4, lora_dropout=0.3).to(device, dtype).train()
    for p in layer.parameters():
        nn.init.normal_(p)
    patch_model(layer, backend=backend)
    x = torch.randn(2, 9, 16, dtype=dtype, device=device, requires_grad=True)
    mask = image_mask([[(1, 4), (7, 9)], [(0, 2)]], 9, device)
    torch.manual_seed(1234)
    y = layer(x, mask)
    torch.manual_seed(1234)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))  # what the op draws
    keep = dropout_keep_mask(seed, 18, 16, 0.3, device, backend=backend).view(2, 9, 16)
    x64 = x.detach().double()
    base = x64 @ layer.weight.double().t() + layer.bias.double()
    dropped = torch.where(keep, x64 / 0.7, 0.0)
    lora = dropped @ layer.Plora_A.weight.double().t() @ layer.Plora_B.weight.double().t()
    expected = torch.where(mask[..., None], base + lora, base)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y.double(), expected, **tol)
    assert 0 < int((~keep[mask]).sum()) < keep[mask].numel()  # some image elements dropped, not all
    # gradients with the same mask: d x = W^T g + mask * drop(A^T B^T g)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, [x], g)
    g64 = g.double()
    lora_grad = torch.where(keep, (g64 @ layer.Plora_B.weight.double() @ layer.Plora_A.weight.double()) / 0.7, 0.0)
    expected_gx = g64 @ layer.weight.double() + torch.where(mask[..., None], lora_grad, 0.0)
    torch.testing.assert_close(gx.double(), expected_gx, **tol)


@pytest.mark.parametrize("form", FORMS)
def test_dropout_distribution_matches_the_reference(form):
    """Over many draws (train mode, p = 0.5): mean and per-element variance of the patched and the reference
    outputs both match the analytic ones of ``nn.Dropout`` on the image rows (the streams differ, the
    distribution does not); text rows never vary."""
    cls = PLoRAIXC2 if form == "ixc2" else PLoRA
    layer = cls(8, 6, bias=False, lora_r=3, lora_alpha=3, lora_dropout=0.5).double().train()
    for p in layer.parameters():
        nn.init.normal_(p)
    reference = copy.deepcopy(layer)
    patch_model(layer, backend="native")
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = image_mask([[(1, 3)], [(4, 5)]], 5)
    with torch.no_grad():
        lora_in = x[..., None, :] * (layer.Plora_B.weight @ layer.Plora_A.weight)  # [2, 5, 6, 8]: x_k (BA)_jk
        mean = nn.Linear.forward(layer, x) + torch.where(mask[..., None], lora_in.sum(-1), 0.0)
        variance = torch.where(mask[..., None], lora_in.square().sum(-1), 0.0)  # p / (1 - p) = 1
        draws = 600
        for module in (layer, reference):
            samples = torch.stack([module(x, mask) for _ in range(draws)])
            assert (samples[:, ~mask] == samples[0, ~mask]).all()
            ratio = (samples.var(0)[mask] / variance[mask]).mean().item()
            assert abs(ratio - 1.0) < 0.15, (module is layer, ratio)
            z = (samples.mean(0) - mean)[mask] / (variance[mask] / draws).sqrt()
            assert z.abs().max() < 5.0


def count_builds(monkeypatch):
    calls = []
    original = SegmentInfo.from_row_mask.__func__

    def counting(cls, mask, **kwargs):
        calls.append(tuple(mask.shape))
        return original(cls, mask, **kwargs)

    monkeypatch.setattr(SegmentInfo, "from_row_mask", classmethod(counting))
    return calls


@pytest.mark.parametrize("checkpointing", [False, True])
def test_segments_are_built_once_per_forward(monkeypatch, checkpointing):
    """One ``SegmentInfo`` per model forward (10 PLoRA layers), also across the reentrant recompute of gradient
    checkpointing (the same mask object in the closure); a new mask, or the same one edited in place, builds
    again."""
    calls = count_builds(monkeypatch)
    model = build(layers=2).train()
    model.model.gradient_checkpointing = checkpointing
    patch_model(model, backend="torch")
    x = torch.randn(B, N, HIDDEN, dtype=torch.float64, requires_grad=True)
    mask = image_mask(MASKS["mixed"], N)
    model(inputs_embeds=x, im_mask=mask).logits.sum().backward()
    assert calls == [(B, N)]
    model(inputs_embeds=x, im_mask=mask).logits.sum().backward()
    assert len(calls) == 1  # the same, unchanged mask: reused
    mask[0, 0] = True  # in place: the version counter moves
    model(inputs_embeds=x, im_mask=mask)
    assert len(calls) == 2
    model(input_ids=torch.randint(0, 128, (B, N)))  # the input_ids path: a fresh all-False mask per call
    model(input_ids=torch.randint(0, 128, (B, N)))
    assert len(calls) == 4


def test_inference_mode_masks_are_never_stale(monkeypatch):
    """A mask made under ``torch.inference_mode`` has no version counter: it is built per layer (never cached), so
    editing it in place between two forwards gives the new mask's result."""
    calls = count_builds(monkeypatch)
    model = build().eval()
    reference = copy.deepcopy(model)
    patch_model(model, backend="native")
    x = torch.randn(B, N, HIDDEN, dtype=torch.float64)
    with torch.inference_mode():
        mask = image_mask(MASKS["mixed"], N)
        first = model(inputs_embeds=x, im_mask=mask).logits
        assert len(calls) == 5  # one per PLoRA layer
        mask.fill_(True)  # in place: no version bump for an inference tensor
        second = model(inputs_embeds=x, im_mask=mask).logits
        expected = reference(inputs_embeds=x, im_mask=mask).logits
    torch.testing.assert_close(second, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("form", FORMS)
def test_gradient_checkpointing_with_dropout(form):
    """Reentrant checkpointing (the public code's): the recompute draws the same dropout masks (torch's RNG
    state is replayed, the op's seed comes from it), so gradients equal the un-checkpointed run's; with p = 0
    they equal the checkpointed reference's."""
    x = torch.randn(B, N, HIDDEN, dtype=torch.float64)
    mask = image_mask(MASKS["mixed"], N)
    weights = torch.randn(B, N, 128, dtype=torch.float64)
    model = build(form, dropout=0.2, layers=2).train()
    patch_model(model, backend="native")
    results = []
    for checkpointing in (False, True):
        model.model.gradient_checkpointing = checkpointing
        torch.manual_seed(7)
        results.append(run(model, x, mask, weights))
    assert_same_results(results[1], results[0], 1e-12)
    torch.manual_seed(8)
    assert not torch.equal(run(model, x, mask, weights)[0], results[0][0])  # another seed, other masks
    reference = build(form, layers=2).train()
    patched = copy.deepcopy(reference)
    patch_model(patched, backend="native")
    for net in (reference, patched):
        net.model.gradient_checkpointing = True
    assert_same_results(run(patched, x, mask, weights), run(reference, x, mask, weights), 1e-10)


@pytest.mark.parametrize("form", FORMS)
def test_calls_the_fused_forward_does_not_serve_run_the_original(form):
    """``im_mask=None`` (IXC2: a plain linear; 2.5: the original's AttributeError), an integer mask (read as
    indices by the original), a mask of another shape: the class's forward, unchanged (dtype mixes autocast does
    not reconcile: ``test_plora_autocast.py``)."""
    cls = PLoRAIXC2 if form == "ixc2" else PLoRA
    layer = cls(8, 6, bias=True, lora_r=2, lora_alpha=2, lora_dropout=0.0).double()
    for p in layer.parameters():
        nn.init.normal_(p)
    reference = copy.deepcopy(layer)
    patch_model(layer, backend="torch")
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    if form == "ixc2":
        assert torch.equal(layer(x, None), nn.Linear.forward(layer, x))
        assert torch.equal(layer(x), reference(x))
    else:
        with pytest.raises(AttributeError):
            layer(x, None)
    index_mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]])  # long: the original indexes rows with it
    assert torch.equal(layer(x, index_mask), reference(x, index_mask))
    if form == "ixc2":
        row_mask = torch.tensor([True, False])  # [B]: whole sequences for the IXC2 form
        assert torch.equal(layer(x, row_mask), reference(x, row_mask))


def test_flattened_input_is_served():
    """``x [T, C]`` with ``im_mask [T]`` (the IXC2 form's flattened call; the 2.5 form's own forward needs 3-D
    ``x``): fused, the reference's values and gradients."""
    layer = PLoRAIXC2(8, 6, bias=False, lora_r=2, lora_alpha=4, lora_dropout=0.0).double()
    for p in layer.parameters():
        nn.init.normal_(p)
    reference = copy.deepcopy(layer)
    patch_model(layer, backend="native")
    x = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(11) > 0.5
    y, y_ref = layer(x, mask), reference(x, mask)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    params = [x] + list(layer.parameters())
    for got, want in zip(torch.autograd.grad(y.sum(), params), torch.autograd.grad(y_ref.sum(), [x] + list(
            reference.parameters()))):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# What the rule recognises and skips
# ---------------------------------------------------------------------------------------------------------
class WithMemoryMask(PLoRA):
    """A PLoRA-like layer with another argument (like 2.5-OL's memory LoRA): not served."""

    def forward(self, x, im_mask=None, mem_mask=None):
        return super().forward(x, im_mask)


class WithMainBranch(PLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.Plora_main = nn.Linear(self.in_features, self.out_features, bias=False)


def _variants():
    def plain():
        return PLoRA(8, 6, lora_r=2, lora_alpha=2, lora_dropout=0.0)

    def with_bias_in_a():
        layer = plain()
        layer.Plora_A = nn.Linear(8, 2, bias=True)
        return layer

    def other_dropout():
        layer = plain()
        layer.lora_dropout = lambda t: t * 0.5
        return layer

    def instance_forward():
        layer = plain()
        layer.forward = lambda x, im_mask=None: nn.Linear.forward(layer, x)
        return layer

    def bad_scaling():
        layer = plain()
        layer.lora_scaling = None
        return layer

    return {
        "mem_mask": (lambda: WithMemoryMask(8, 6, lora_r=2, lora_alpha=2), "takes mem_mask"),
        "main_branch": (lambda: WithMainBranch(8, 6, lora_r=2, lora_alpha=2), "other submodules (Plora_main)"),
        "bias_in_a": (with_bias_in_a, "Plora_A has a bias"),
        "other_dropout": (other_dropout, "not the identity"),
        "instance_forward": (instance_forward, "instance-level forward"),
        "bad_scaling": (bad_scaling, "lora_scaling is None"),
    }


@pytest.mark.parametrize("variant", list(_variants()))
def test_lookalikes_are_skipped_with_a_reason(variant):
    make, reason = _variants()[variant]
    model = nn.Sequential(make())
    with pytest.raises(NothingToPatchError, match=re.escape(reason)):
        patch_model(model)
    assert rule_of(model[0]) is None and "forward" not in model[0].__dict__ or variant == "instance_forward"


def test_nothing_to_patch_names_the_plora_rule():
    with pytest.raises(NothingToPatchError, match="plora_linear: InternLM-XComposer's PLoRA"):
        patch_model(nn.Sequential(nn.Linear(3, 3)))


def test_unpatch_pickle_and_state_dict():
    model = build(dropout=0.05).eval()  # nn.Dropout: the public code's p = 0 identity lambda does not pickle
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}
    report = patch_model(model, backend="torch")
    assert report.rules[RULE_NAME] == 5
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys
    x = torch.randn(B, N, HIDDEN, dtype=torch.float64)
    mask = image_mask(MASKS["mixed"], N)
    expected = model(inputs_embeds=x, im_mask=mask).logits
    clone = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(clone(inputs_embeds=x, im_mask=mask).logits, expected, rtol=0, atol=0)
    assert all(rule_of(m) == RULE_NAME for m in plora_layers(clone).values())
    unpatch_model(model)
    for layer in plora_layers(model).values():
        assert "forward" not in layer.__dict__ and rule_of(layer) is None
    torch.testing.assert_close(model(inputs_embeds=x, im_mask=mask).logits, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
def test_compiles_fullgraph_in_eval_and_training(form):
    """``torch.compile(fullgraph=True)``: the segments are built by device ops inside the graph (no host read),
    with the static segment count; same outputs and gradients as eager, dropout included (same seed)."""
    model = build(form, dtype=torch.float32, dropout=0.2)
    patch_model(model, backend="torch")
    x = torch.randn(2, N, HIDDEN)
    mask = image_mask(MASKS["mixed"][:2], N)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(inputs_embeds=x, im_mask=mask).logits,
                                   model(inputs_embeds=x, im_mask=mask).logits, rtol=1e-5, atol=1e-5)
    model.train()

    def step(fn):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        out = fn(inputs_embeds=x, im_mask=mask).logits
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager, compiled_step = step(model), step(compiled)
    torch.testing.assert_close(compiled_step[0], eager[0], rtol=1e-5, atol=1e-5)
    assert compiled_step[1].keys() == eager[1].keys()
    for name in eager[1]:
        torch.testing.assert_close(compiled_step[1][name], eager[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_capture_replays_new_inputs_and_masks():
    """The patched forward captures (no host read: the segments are built from the mask by device ops in the
    graph, with the static count) and replays new embeddings and a mask edited in place."""
    from monkey_kernels.cuda_graphs import capture_forward

    device = torch.device("cuda")
    model = build(dtype=torch.float16, layers=2).to(device).eval()
    patch_model(model)
    mask = image_mask(MASKS["mixed"], N, device)

    def forward(x):
        return model(inputs_embeds=x, im_mask=mask).logits

    graphed = capture_forward(forward, torch.randn(B, N, HIDDEN, device=device, dtype=torch.float16))
    for spans in (MASKS["mixed"], MASKS["cut_at_end"], MASKS["all_text"]):
        mask.copy_(image_mask(spans, N, device))
        x = torch.randn(B, N, HIDDEN, device=device, dtype=torch.float16)
        with torch.no_grad():
            expected = forward(x)
        torch.testing.assert_close(graphed(x).clone(), expected, rtol=2e-3, atol=2e-3)
