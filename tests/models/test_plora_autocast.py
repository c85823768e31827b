"""The PLoRA rules under ``torch.autocast`` (CPU bf16 and fp16; the Triton kernels under the interpreter): an fp32
InternLM2 + PLoRA double (both forms), with and without a PEFT LoRA stacked, patched and run in an autocast
region against the unpatched model in the same region. Every PLoRA / PEFT layer returns the reference's dtype,
the fused op serves every call (no fallback to the original forward), outputs and every gradient have an error
against float64 of at most a small factor of the reference's own autocast error (``helpers/accuracy.py``);
dropout with the op's masks against the reference formula with the same masks; ``torch.compile(fullgraph=True)``
in an autocast region equals eager.

The reference under autocast: ``res = F.linear(x, W, b)`` in the autocast dtype, then ``res[im_mask] +=
Plora_B(Plora_A(dropout(x[im_mask]))) * lora_scaling`` (each linear autocast, rounded, the scaling and the add
in that dtype); PEFT adds ``lora_B(lora_A(dropout(x))) * scaling`` the same way (its ``x`` cast to the
adapter's dtype first, then autocast's cast)."""
from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402

from conftest import available_backends, kernel_device  # noqa: E402
from helpers.accuracy import assert_within_pytorch_error  # noqa: E402
from helpers.internlm2_plora_double import (  # noqa: E402
    HIDDEN, MASKS, PLORA_TARGETS, B, N, PLoRA, PLoRAIXC2, build, image_mask,
)
from monkey_kernels import dropout_keep_mask  # noqa: E402
from monkey_kernels.patching import patch_model, rule_of  # noqa: E402
from monkey_kernels.rules import plora as plora_rules  # noqa: E402

AMP_DTYPES = [torch.bfloat16, torch.float16]
AMP_IDS = ["bfloat16", "float16"]
FORMS = ["ixc2", "ixc2d5"]


def backend_amp_pairs():
    """(backend, amp) of the model-level tests: both autocast dtypes on the CPU backends, bf16 on the Triton
    interpreter (slow; fp16 runs there at layer level, ``test_plora_kernels.py``)."""
    return [pytest.param(backend, amp, id=f"{backend}-{name}")
            for backend in available_backends() for amp, name in zip(AMP_DTYPES, AMP_IDS)
            if backend != "triton" or amp == torch.bfloat16]


def fused_calls():
    """A context counting the PLoRA rules' op calls (``.call_count`` of what it yields)."""
    return mock.patch.object(plora_rules, "multi_lora_linear", wraps=plora_rules.multi_lora_linear)


def layer_dtypes(model: nn.Module):
    """``(dtypes, handles)``: every PLoRA and PEFT LoRA layer appends ``(name, output dtype)`` to ``dtypes`` when
    it runs (remove the hooks with ``handles``); a PLoRA wrapped by PEFT is not hooked (the fused PEFT layer
    never calls it)."""
    dtypes, handles = [], []
    for name, module in model.named_modules():
        if isinstance(module, (PLoRA, PeftLinear)) and not name.endswith(".base_layer"):
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: dtypes.append((name, out.dtype))))
    return dtypes, handles


def run_model(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, grad_weights: torch.Tensor, amp):
    """``(logits, {"inputs_embeds": grad, name: grad of every trainable Parameter used}, layer dtypes)`` of
    ``sum(logits * grad_weights)``, the forward under ``autocast(amp)`` (``None``: off)."""
    model.zero_grad(set_to_none=True)
    embeds = x.detach().clone().requires_grad_()
    dtypes, handles = layer_dtypes(model)
    try:
        with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            logits = model(inputs_embeds=embeds, im_mask=mask).logits
    finally:
        for handle in handles:
            handle.remove()
    (logits * grad_weights.to(logits.dtype)).sum().backward()
    grads = {"inputs_embeds": embeds.grad}
    # every trainable Parameter but the token embedding (the double runs on inputs_embeds)
    grads.update({n: p.grad for n, p in model.named_parameters() if p.requires_grad and "tok_embeddings" not in n})
    return logits.detach(), grads, dtypes


def assert_model_matches_under_autocast(backend: str, amp, reference: nn.Module, masks, expected_calls: int):
    """The patched copy of the fp32 ``reference`` against it, both under ``autocast(amp)``, judged against the
    float64 copy (no autocast: float64 is never cast). ``expected_calls``: op calls per forward."""
    device = kernel_device(backend)
    exact = copy.deepcopy(reference).double()
    model = copy.deepcopy(reference).to(device)
    patch_model(model, backend=backend)
    x = torch.randn(B, N, HIDDEN).double()  # fp32 values, exact in float64
    grad_weights = torch.randn(B, N, reference.config.vocab_size).double()
    for spans in masks:
        mask = image_mask(spans, N)
        want = run_model(exact, x, mask, grad_weights, None)
        plain = run_model(reference, x.float(), mask, grad_weights.float(), amp)
        with fused_calls() as calls:
            got = run_model(model, x.float().to(device), mask.to(device), grad_weights.float().to(device), amp)
        assert calls.call_count == expected_calls
        assert got[2] == plain[2]  # every layer's output dtype, in call order
        assert {dtype for _, dtype in got[2]} == {amp}
        assert got[1].keys() == plain[1].keys() == want[1].keys()
        for name, grad in got[1].items():
            assert grad is not None and grad.dtype == plain[1][name].dtype == torch.float32, name
        assert_within_pytorch_error(backend, amp, got[0], plain[0], want[0], got[1], plain[1], want[1])
        if not mask.any():  # the reference's zero-multiply branch: exact zero PLoRA gradients, as here
            assert all(torch.count_nonzero(g) == 0 for n, g in got[1].items() if "Plora_" in n)


@pytest.mark.parametrize("backend, amp", backend_amp_pairs())
@pytest.mark.parametrize("form", FORMS)
def test_model_under_autocast(form, backend, amp):
    """Two decoder layers (10 PLoRAs), bias on, train mode (dropout 0): mixed spans, a span cut at the end,
    an all-text batch."""
    reference = build(form, dtype=torch.float32, layers=2, bias=True).train()
    masks = [MASKS["mixed"], MASKS["cut_at_end"], MASKS["all_text"]]
    assert_model_matches_under_autocast(backend, amp, reference, masks, expected_calls=10)


def peft_over_plora(form: str, alpha: int, dropout: float = 0.0, plora_dropout: float = 0.0) -> nn.Module:
    """fp32 double with a PEFT LoRA (r 4) on the five linears, every Parameter trainable, lora_B non-zero."""
    base = build(form, dtype=torch.float32, layers=2, bias=True, dropout=plora_dropout)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=alpha, lora_dropout=dropout,
                                            target_modules=PLORA_TARGETS, task_type="CAUSAL_LM"))
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("backend, amp", backend_amp_pairs())
@pytest.mark.parametrize("form, alpha", [("ixc2", 4), ("ixc2d5", 6)])
def test_peft_over_plora_under_autocast(form, alpha, backend, amp):
    """One fused pass per layer (train mode, dropout 0); PEFT alpha 4 (scale 1: shared with every PLoRA but
    ``wqkv``'s 2) or 6 (scale 1.5: folded into the concatenated B in the autocast dtype)."""
    reference = peft_over_plora(form, alpha).train()
    masks = [MASKS["mixed"], MASKS["all_text"]]
    assert_model_matches_under_autocast(backend, amp, reference, masks, expected_calls=10)


# ------------------------------------------------------------------------------------------------------------
# dropout under autocast: the reference formula with the op's masks
# ------------------------------------------------------------------------------------------------------------
def masked_reference(layer, x, mask, keep_plora, p_plora, keep_peft=None, p_peft=0.0):
    """The reference forward of a PLoRA (or a PEFT LoRA over one: ``layer`` has ``base_layer``) with the given
    keep-masks as its dropouts; run it under autocast for the reference's roundings."""
    peft_layer = layer if hasattr(layer, "base_layer") else None
    base = layer.base_layer if peft_layer is not None else layer
    res = F.linear(x, base.weight, base.bias)
    dropped = torch.where(keep_plora, x / (1.0 - p_plora), 0.0)
    lora = F.linear(F.linear(dropped, base.Plora_A.weight), base.Plora_B.weight) * base.lora_scaling
    res = torch.where(mask[..., None], res + lora, res)
    if peft_layer is not None:
        lora_a, lora_b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        dropped = torch.where(keep_peft, x / (1.0 - p_peft), 0.0)
        res = res + F.linear(F.linear(dropped, lora_a), lora_b) * peft_layer.scaling["default"]
    return res


@pytest.mark.parametrize("amp", AMP_DTYPES, ids=AMP_IDS)
@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("stacked", [False, True], ids=["plora", "peft_over_plora"])
def test_dropout_under_autocast(stacked, backend, amp):
    """Train mode, PLoRA p = 0.3 (and PEFT p = 0.2: two op calls, independent masks): outputs and every
    gradient against the reference formula with the op's masks, run under the same autocast and in float64."""
    device = kernel_device(backend)
    plora = PLoRAIXC2(16, 12, bias=True, lora_r=4, lora_alpha=8, lora_dropout=0.3)
    for p in plora.parameters():
        nn.init.normal_(p)
    if stacked:
        holder = get_peft_model(nn.ModuleDict({"wqkv": plora}),
                                LoraConfig(r=3, lora_alpha=3, lora_dropout=0.2, target_modules=["wqkv"]))
        layer = holder.base_model.model["wqkv"]
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_()
        for p in layer.parameters():
            p.requires_grad_(True)
    else:
        layer = plora
    layer.train()
    patched = copy.deepcopy(layer).to(device)
    patch_model(patched, backend=backend)
    x = torch.randn(2, 9, 16).double()
    mask = image_mask([[(1, 4), (7, 9)], [(0, 2)]], 9)
    grad_out = torch.randn(2, 9, 12).to(amp).double()
    xin = x.float().to(device).requires_grad_()
    torch.manual_seed(5)
    with fused_calls() as calls, torch.autocast(device.type, dtype=amp):
        y = patched(xin, mask.to(device))
    assert calls.call_count == (2 if stacked else 1) and y.dtype == amp
    params = dict(patched.named_parameters())
    got = torch.autograd.grad(y, [xin] + list(params.values()), grad_out.to(device, amp))
    torch.manual_seed(5)  # the seeds the op drew: one per op call, in call order
    seeds = [int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64)) for _ in range(2)]
    keeps = [dropout_keep_mask(s, 18, 16, p, device, backend=backend).view(2, 9, 16).cpu()
             for s, p in zip(seeds, (0.3, 0.2))]
    extra = dict(keep_peft=keeps[1], p_peft=0.2) if stacked else {}
    results = []
    for module, dtype, region in ((layer, torch.float32, amp), (copy.deepcopy(layer).double(), torch.float64, None)):
        xr = x.to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=region or torch.bfloat16, enabled=region is not None):
            out = masked_reference(module, xr, mask, keeps[0], 0.3, **extra)
        grads = torch.autograd.grad(out, [xr] + [p for _, p in module.named_parameters()], grad_out.to(out.dtype))
        results.append((out, grads))
    (plain, plain_grads), (want, want_grads) = results
    assert plain.dtype == amp
    names = ["x"] + list(params)
    assert_within_pytorch_error(backend, amp, y, plain, want, dict(zip(names, got)), dict(zip(names, plain_grads)),
                                dict(zip(names, want_grads)))


# ------------------------------------------------------------------------------------------------------------
# torch.compile under autocast
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stacked", [False, True], ids=["plora", "peft_over_plora"])
def test_compiles_fullgraph_under_autocast(stacked):
    """``torch.compile(fullgraph=True)`` called in an autocast region (bf16, fp32 weights): eval (one pass) and
    a training step with dropout (same seed: same masks; two op calls per layer when stacked) give the eager
    outputs, dtypes and gradients."""
    if stacked:
        model = peft_over_plora("ixc2d5", 4, dropout=0.1, plora_dropout=0.1)
    else:
        model = build("ixc2", dtype=torch.float32, layers=2, bias=True, dropout=0.2)
    patch_model(model, backend="torch")
    x = torch.randn(B, N, HIDDEN)
    mask = image_mask(MASKS["mixed"], N)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")

    def step(fn):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(inputs_embeds=x, im_mask=mask).logits
        if model.training:
            out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for training in (False, True):
        model.train(training)
        with torch.set_grad_enabled(training):
            eager, graph = step(model), step(compiled)
        assert graph[0].dtype == eager[0].dtype
        torch.testing.assert_close(graph[0], eager[0], rtol=1e-5, atol=1e-5)
        trained = [n for n, _ in model.named_parameters() if "tok_embeddings" not in n] if training else []
        assert sorted(graph[1]) == sorted(eager[1]) == sorted(trained)
        for name in eager[1]:
            assert graph[1][name].dtype == torch.float32
            torch.testing.assert_close(graph[1][name], eager[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_unserved_dtype_mixes_still_run_the_original():
    """What autocast does not reconcile still runs the class's forward: a bf16 ``x`` over fp32 weights outside
    autocast (the original fails there, so does the patched layer), and a float64 ``x`` over fp32 weights under
    autocast (autocast leaves float64 alone: the original fails too)."""
    layer = PLoRAIXC2(8, 6, bias=True, lora_r=2, lora_alpha=2, lora_dropout=0.0)
    patch_model(layer, backend="torch")
    assert rule_of(layer) == plora_rules.RULE_NAME
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    x = torch.randn(2, 4, 8)
    with fused_calls() as calls:
        with pytest.raises(RuntimeError):
            layer(x.bfloat16(), mask)
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError):
            layer(x.double(), mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x, mask).dtype == torch.bfloat16
            assert layer(x.bfloat16(), mask).dtype == torch.bfloat16
            assert layer.double()(x.double(), mask).dtype == torch.float64  # float64 throughout: never cast
    assert calls.call_count == 3
