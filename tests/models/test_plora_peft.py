"""A PEFT LoRA over InternLM-XComposer's PLoRA (the fine-tuning recipe: ``get_peft_model`` on the five linears; PEFT
wraps each PLoRA as ``base_layer``), patched by ``plora_peft_linear``: one fused pass (image rows: the
concatenated [PEFT | PLoRA] adapter; text rows: PEFT's alone), both sets of Parameters with the reference's
gradients, dropout with independent masks (two op calls), ``save_pretrained`` / reload unchanged, per-row adapter
selection and other calls left to PEFT's forward."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from conftest import available_backends, kernel_device  # noqa: E402
from helpers.accuracy import rel_err  # noqa: E402
from helpers.internlm2_plora_double import (  # noqa: E402
    HIDDEN, MASKS, PLORA_TARGETS, B, N, PLoRA, PLoRAIXC2, assert_same_results, build, image_mask, run,
)
from monkey_kernels import adapter_selection, dropout_keep_mask  # noqa: E402
from monkey_kernels.patching import patch_model, rule_of, unpatch_model  # noqa: E402
from monkey_kernels.rules.plora import PEFT_RULE_NAME, RULE_NAME  # noqa: E402


def peft_model(form: str = "ixc2d5", dtype=torch.float64, dropout: float = 0.0, plora_dropout: float = 0.0,
               r: int = 4, alpha: int = 4, freeze_base: bool = True, base_dtype=None):
    """The recipe: the whole InternLM2 frozen (``freeze_base``), then a PEFT LoRA on the five targets, lora_B drawn
    non-zero (PEFT starts it at 0, which would hide the PEFT term)."""
    base = build(form, dtype=base_dtype or dtype, dropout=plora_dropout)
    if freeze_base:
        for p in base.model.parameters():
            p.requires_grad_(False)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=PLORA_TARGETS,
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    if not freeze_base:  # full fine-tuning plus PEFT (get_peft_model froze everything but its adapters)
        for p in model.parameters():
            p.requires_grad_(True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    if base_dtype is None:
        model.to(dtype)
    return model


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("form", ["ixc2", "ixc2d5"])
def test_one_pass_matches_peft_over_plora(form, backend):
    """Training mode with dropout 0 (one op call per layer); wqkv's PLoRA scale 2 differs from PEFT's
    scale 1 (the scales folded into B), the other linears share scale 1. Frozen base (the recipe)."""
    device = kernel_device(backend)
    reference = peft_model(form).train()
    dtype = torch.float32 if backend == "triton" else torch.float64
    model = copy.deepcopy(reference).to(device=device, dtype=dtype)
    report = patch_model(model, backend=backend)
    assert report.rules[PEFT_RULE_NAME] == 5 and report.rules[RULE_NAME] == 5 and report.skipped == []
    x = torch.randn(B, N, HIDDEN, dtype=torch.float64)
    weights = torch.randn(B, N, 128, dtype=torch.float64)
    for spans in MASKS.values():
        mask = image_mask(spans, N)
        want = run(reference, x, mask, weights)
        got = run(model, x.to(device, dtype), mask.to(device), weights.to(device, dtype))
        assert_same_results(got, want, 1e-10 if dtype == torch.float64 else 2e-5)
        assert sum(g is not None for n, g in got[2].items() if "lora_" in n and "Plora" not in n) == 10


@pytest.mark.parametrize("alpha", [4, 6])
def test_everything_trainable_and_other_scales(alpha):
    """Full fine-tuning plus PEFT (base, Plora and PEFT Parameters all trainable); PEFT alpha 6 / r 4 = 1.5 differs
    from every PLoRA scale (folded into B: exact in float64); the all-text batch gives Plora zero gradients."""
    reference = peft_model(alpha=alpha, freeze_base=False).train()
    model = copy.deepcopy(reference)
    patch_model(model, backend="native")
    x = torch.randn(B, N, HIDDEN, dtype=torch.float64)
    weights = torch.randn(B, N, 128, dtype=torch.float64)
    for name in ("mixed", "all_text"):
        mask = image_mask(MASKS[name], N)
        got, want = run(model, x, mask, weights), run(reference, x, mask, weights)
        assert_same_results(got, want, 1e-10)
        plora = {n: g for n, g in got[2].items() if "Plora_" in n}
        assert len(plora) == 10 and all(g is not None for g in plora.values())
        if name == "all_text":
            assert all(torch.count_nonzero(g) == 0 for g in plora.values())


def test_bf16_base_with_fp32_adapters():
    """PEFT's default keeps its adapters in fp32 over a bf16 base (it computes its LoRA in fp32); the fused pass
    computes both LoRAs in bf16 with fp32 accumulation: within bf16 rounding of the float64 reference."""
    reference = peft_model(base_dtype=torch.bfloat16).train()
    assert reference.base_model.model.model.layers[0].attention.wqkv.lora_A["default"].weight.dtype == torch.float32
    model = copy.deepcopy(reference)
    patch_model(model, backend="native")
    exact = copy.deepcopy(reference).double()
    x = torch.randn(B, N, HIDDEN, dtype=torch.float64)
    weights = torch.randn(B, N, 128, dtype=torch.float64)
    mask = image_mask(MASKS["mixed"], N)
    want = run(exact, x, mask, weights)
    got = run(model, x.bfloat16(), mask, weights.bfloat16())
    plain = run(reference, x.bfloat16(), mask, weights.bfloat16())
    for got_part, plain_part, want_part in ((got[0], plain[0], want[0]), (got[1], plain[1], want[1])):
        assert rel_err(got_part, want_part) <= 2 * rel_err(plain_part, want_part) + 1e-3
    for name, grad in want[2].items():
        if grad is not None:
            assert rel_err(got[2][name], grad) <= 2 * rel_err(plain[2][name], grad) + 1e-3, name
            assert got[2][name].dtype == plain[2][name].dtype, name


@pytest.mark.parametrize("backend", available_backends())
def test_training_dropout_two_independent_masks(backend):
    """Train mode with PLoRA p = 0.3 and PEFT p = 0.2: two op calls per layer (the PLoRA pass, then PEFT's LoRA on
    every row over it), each with its own mask drawn from its own seed: the reference formula with those masks."""
    device = kernel_device(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    module = nn.ModuleDict({"wqkv": PLoRAIXC2(16, 12, bias=True, lora_r=4, lora_alpha=8, lora_dropout=0.3)})
    for p in module.parameters():
        nn.init.normal_(p)
    model = get_peft_model(module, LoraConfig(r=3, lora_alpha=3, lora_dropout=0.2, target_modules=["wqkv"]))
    layer = model.base_model.model["wqkv"]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    model.to(device, dtype).train()
    patch_model(model, backend=backend)
    assert rule_of(layer) == PEFT_RULE_NAME
    x = torch.randn(2, 9, 16, dtype=dtype, device=device)
    mask = image_mask([[(1, 4), (7, 9)], [(0, 2)]], 9, device)
    torch.manual_seed(5)
    y = layer(x, mask)
    torch.manual_seed(5)
    seeds = [int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64)) for _ in range(2)]
    keep_plora, keep_peft = (dropout_keep_mask(s, 18, 16, p, device, backend=backend).view(2, 9, 16)
                             for s, p in zip(seeds, (0.3, 0.2)))
    assert not torch.equal(keep_plora, keep_peft)
    base, x64 = layer.base_layer, x.double()
    plora = torch.where(keep_plora, x64 / 0.7, 0.0) @ base.Plora_A.weight.double().t() @ \
        base.Plora_B.weight.double().t() * 2.0
    lora = torch.where(keep_peft, x64 / 0.8, 0.0) @ layer.lora_A["default"].weight.double().t() @ \
        layer.lora_B["default"].weight.double().t()
    expected = x64 @ base.weight.double().t() + base.bias.double() + torch.where(mask[..., None], plora, 0.0) + lora
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y.double(), expected, **tol)


def test_gradient_checkpointing_recipe():
    """The recipe's training setup: frozen base, PEFT LoRA r = alpha = 64 (dropout 0.05 both), reentrant
    checkpointing with ``enable_input_require_grads``, ``inputs_embeds`` from the frozen embedding: the
    checkpointed patched model gives the un-checkpointed patched model's gradients (same seed)."""
    model = peft_model(dropout=0.05, plora_dropout=0.05, r=64, alpha=64)  # finetune.py's LoraArguments
    model.train()
    patch_model(model, backend="native")
    inner = model.base_model.model
    inner.enable_input_require_grads()
    ids = torch.randint(3, 128, (B, N))
    mask = image_mask(MASKS["mixed"], N)
    grads = []
    for checkpointing in (False, True):
        inner.model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        embeds = inner.model.tok_embeddings(ids)
        loss = model(inputs_embeds=embeds, im_mask=mask, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-10, atol=1e-12, msg=name)


def test_train_save_pretrained_and_reload(tmp_path):
    """Patched training updates PEFT's own Parameters; ``save_pretrained`` writes what PEFT writes (lora_A /
    lora_B only); the reloaded model, patched or not, gives the trained model's outputs."""
    model = peft_model(form="ixc2").train()
    patch_model(model, backend="native")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(B, N, HIDDEN, dtype=torch.float64)
    mask = image_mask(MASKS["mixed"], N)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(2):
        optimizer.zero_grad()
        model(inputs_embeds=x, im_mask=mask).logits.square().mean().backward()
        optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        expected = model(inputs_embeds=x, im_mask=mask).logits
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(saved) == 10 and all("lora_A" in k or "lora_B" in k for k in saved)
    clone = copy.deepcopy(model)
    unpatch_model(clone)
    fresh = clone.unload()  # the same frozen base (PLoRA layers, their Parameters), without PEFT's layers
    assert not any(".lora_A." in n for n, _ in fresh.named_parameters())
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path)).to(torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs_embeds=x, im_mask=mask).logits, expected, rtol=1e-10, atol=1e-12)
        patch_model(loaded, backend="torch")
        torch.testing.assert_close(loaded(inputs_embeds=x, im_mask=mask).logits, expected, rtol=1e-10, atol=1e-12)
    unpatch_model(loaded)
    assert all(rule_of(m) is None for m in loaded.modules())


def test_selection_and_several_adapters_run_pefts_forward():
    """Two adapters, one per batch row (``adapter_selection``), or PEFT's ``disable_adapter``: PEFT's own forward
    (its base-layer call is the fused PLoRA): the reference's outputs."""
    reference = peft_model()
    reference.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=PLORA_TARGETS))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B.other" in name:
                p.normal_(0, 0.2)
    reference.to(torch.float64).eval()
    model = copy.deepcopy(reference)
    patch_model(model, backend="native")
    x = torch.randn(B, N, HIDDEN, dtype=torch.float64)
    mask = image_mask(MASKS["mixed"], N)
    rows = ["default", "__base__", "other"]
    with torch.no_grad():
        want = reference(inputs_embeds=x, im_mask=mask, adapter_names=rows).logits
        with adapter_selection(model, rows):
            got = model(inputs_embeds=x, im_mask=mask).logits
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        with model.disable_adapter(), reference.disable_adapter():
            torch.testing.assert_close(model(inputs_embeds=x, im_mask=mask).logits,
                                       reference(inputs_embeds=x, im_mask=mask).logits, rtol=1e-10, atol=1e-12)


def test_peft_on_an_unfusable_plora_is_skipped_with_both_reasons():
    class Odd(PLoRA):
        def forward(self, x, im_mask=None, mem_mask=None):
            return super().forward(x, im_mask)

    module = nn.ModuleDict({"wqkv": Odd(8, 6, lora_r=2, lora_alpha=2, lora_dropout=0.0)})
    model = get_peft_model(module, LoraConfig(r=2, lora_alpha=2, target_modules=["wqkv"]))
    with pytest.warns(UserWarning, match="nothing to patch"):
        report = patch_model(model, strict=False)
    reasons = {rule: reason for _, rule, reason in report.skipped}
    assert "takes mem_mask" in reasons[RULE_NAME] and "base layer PLoRA" in reasons[PEFT_RULE_NAME]


def test_merge_and_unload_of_a_patched_model():
    """PEFT's ``merge_adapter`` (PEFT's forward while merged) and ``merge_and_unload`` (the adapter added into the
    PLoRA's own weight; the PLoRA stays, still fused) give the unmerged outputs."""
    model = peft_model().eval()
    patch_model(model, backend="native")
    x = torch.randn(B, N, HIDDEN, dtype=torch.float64)
    mask = image_mask(MASKS["mixed"], N)
    with torch.no_grad():
        expected = model(inputs_embeds=x, im_mask=mask).logits
        model.merge_adapter()
        torch.testing.assert_close(model(inputs_embeds=x, im_mask=mask).logits, expected, rtol=1e-10, atol=1e-12)
        model.unmerge_adapter()
        merged = model.merge_and_unload()
        assert all(rule_of(m) == RULE_NAME for m in merged.modules() if isinstance(m, PLoRA))
        torch.testing.assert_close(merged(inputs_embeds=x, im_mask=mask).logits, expected, rtol=1e-10, atol=1e-12)


def test_compiles_fullgraph_with_peft_stacked():
    """``torch.compile(fullgraph=True)`` of the PEFT model: the one-pass path in eval, the two-call path with both
    dropouts in training (same seed: same masks), the eager outputs."""
    model = peft_model(dtype=torch.float32, dropout=0.1, plora_dropout=0.1)
    patch_model(model, backend="torch")
    x = torch.randn(B, N, HIDDEN)
    mask = image_mask(MASKS["mixed"], N)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for training in (False, True):
        model.train(training)
        outputs = []
        for fn in (model, compiled):
            torch.manual_seed(4)
            with torch.set_grad_enabled(training):
                outputs.append(fn(inputs_embeds=x, im_mask=mask).logits)
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
