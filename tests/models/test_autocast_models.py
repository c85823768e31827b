"""Every patched model family under ``torch.autocast`` over fp32 master weights (what HF Trainer's ``bf16=True``
does), on the CPU (bf16): the Monkey encoder (this package's ``MonkeyVisionModel``, whose adapters add out of
place, and a user's copy of the public code, whose adapters add in place), the Monkey VLM (with gradient
checkpointing), a PEFT LoRA tower and the SLP embedding.

For each: every patched layer's output has the unpatched layer's dtype (forward hooks on both models, matched by
module name); the outputs and gradients are as close to the float64 model as the unpatched model's under the same
autocast (error at most 2x its error + a small floor, the flash-attention rule); gradients reach the fp32
Parameters in fp32, and the per-adapter scales keep full precision. TextMonkey's are in ``test_textmonkey.py``."""
from __future__ import annotations

import copy
import functools
import re
from typing import Dict

import pytest
import torch
from torch import nn

from conftest import kernel_device, require_native
from helpers.accuracy import (assert_grads_within_reference_error, assert_within_reference_error,
                              record_output_dtypes)
from monkey_kernels.patching import patch_model

AMP = torch.bfloat16
CPU_BACKENDS = ["torch", "native"]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny shapes run faster on one thread than with the intra-op pool's hand-offs (CI has 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def use_backend(backend: str) -> torch.device:
    if backend == "native":
        require_native()
    return kernel_device(backend)


def grads_of(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: (None if p.grad is None else p.grad.detach().clone())
            for n, p in model.named_parameters() if p.requires_grad}


def assert_fp32_master_grads(model: nn.Module) -> None:
    """Every trainable Parameter (the per-adapter scales too) is still fp32 and got an fp32 gradient (or none)."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, f"{name}: master weight is {p.dtype}"
            assert p.grad is None or p.grad.dtype == torch.float32, f"{name}: gradient is {p.grad.dtype}"


def role(name: str) -> str:
    """A parameter's role: its name with the layer and adapter indices wildcarded (``resblocks.*.attn.in_proj_lora.*
    .lora_a.weight``), so every adapter of every layer of one projection is judged together."""
    return re.sub(r"\.\d+(?=\.)", ".*", name)


def promoted(dtypes) -> torch.dtype:
    return functools.reduce(torch.promote_types, dtypes)


def assert_same_layer_dtypes(seen: Dict[str, set], base_seen: Dict[str, set], required=(),
                             mixed_views: bool = False) -> None:
    """Every module that ran in the patched model ran in the unpatched one too, with the same output dtypes.
    ``mixed_views``: the unpatched model runs its views one by one, adapter views in one dtype and the views
    without adapter in another; the fused module returns ONE tensor for all views, in the promoted dtype."""
    missing = [name for name in required if name not in seen]
    assert not missing, f"patched layers that did not run: {missing}"
    assert set(seen) <= set(base_seen), sorted(set(seen) - set(base_seen))
    for name, dtypes in seen.items():
        expected = {promoted(base_seen[name])} if mixed_views else base_seen[name]
        assert dtypes == expected, f"{name}: patched output dtypes {dtypes}, unpatched {base_seen[name]}"


# ---------------------------------------------------------------------------------------------------------
# (1) The Monkey encoder
# ---------------------------------------------------------------------------------------------------------
def _encoder_run(model, call, weights, device_type):
    model.zero_grad(set_to_none=True)
    seen, handles = record_output_dtypes(model)
    with torch.autocast(device_type, dtype=AMP):
        out = call(model)
    (out.double() * weights).sum().backward()
    for handle in handles:
        handle.remove()
    return out.detach(), grads_of(model), seen


# one Triton case (the interpreter is slow; the dtype logic does not depend on the backend)
ENCODER_CASES = [(b, v) for b in CPU_BACKENDS for v in ("tiles_and_global", "tiles_only")] + [
    ("triton", "tiles_and_global")]


@pytest.mark.parametrize("backend,views", ENCODER_CASES, ids=[f"{b}-{v}" for b, v in ENCODER_CASES])
def test_monkey_encoder_under_bf16_autocast(backend, views):
    """``MonkeyVisionModel`` (adapters added out of place: ``mixed + lora * lora_scale`` promotes to fp32): the
    fused blocks and attentions return the reference's dtypes (fp32 where an adapter ran), outputs and the release
    trainable set's gradients within 2x the unpatched model's autocast error. ``forward`` mixes tiles and the
    global view (the reference's bf16 view without adapter and fp32 tiles: the fused pass returns fp32 for all);
    ``forward_views`` with tiles only has exactly the reference's dtypes."""
    from helpers.monkey_models import make_model  # noqa: PLC0415 (imports transformers)

    device = use_backend(backend)
    model = make_model(device, lora_repeat_num=4, lora_dropout=0.0).train()
    cfg = model.config
    if views == "tiles_and_global":
        pixels = torch.randn(2, 4, 3, cfg.tile_size, cfg.tile_size, device=device)

        def call(m):
            return m(pixels.to(m.conv1.weight.dtype))
    else:
        pixels = torch.randn(4, 3, cfg.tile_size, cfg.tile_size, device=device)

        def call(m):
            return torch.cat(m.forward_views(pixels.to(m.conv1.weight.dtype), [0, 1, 2, 0], [3, 1]))
    reference64 = copy.deepcopy(model).double()
    reference64.zero_grad(set_to_none=True)
    expected = call(reference64)
    weights = torch.randn(expected.shape, dtype=torch.float64, device=device)
    (expected * weights).sum().backward()
    expected_grads = grads_of(reference64)
    unpatched = copy.deepcopy(model)
    report = patch_model(model, backend=backend)
    assert report.rules["monkey_block"] == cfg.layers
    base_out, base_grads, base_seen = _encoder_run(unpatched, call, weights, device.type)
    out, grads, seen = _encoder_run(model, call, weights, device.type)

    blocks = [f"transformer.resblocks.{i}" for i in range(cfg.layers)]
    assert_same_layer_dtypes(seen, base_seen, required=blocks + [f"{b}.attn" for b in blocks],
                             mixed_views=views == "tiles_and_global")
    if views == "tiles_only":
        assert all(seen[f"{b}.attn"] == {torch.float32} for b in blocks), "adapter views: fp32 (promoted)"
    assert out.dtype == base_out.dtype == AMP
    assert_fp32_master_grads(model)
    floor = 3e-3 if backend == "triton" else 1e-3  # the interpreter truncates fp32 -> bf16
    assert_within_reference_error("output", out, base_out, expected, floor=floor)
    assert_grads_within_reference_error(grads, base_grads, expected_grads, floor=floor, family=role)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_public_monkey_copy_in_place_adapters_under_bf16_autocast(backend):
    """A user's copy of the public code adds its adapters IN PLACE (``mixed_x_layer += lora``: bf16 under
    autocast): the fused attention then returns bf16 as the reference does, and the block the reference's dtype."""
    from helpers.monkey_models import UserTower, randomize_  # noqa: PLC0415

    device = use_backend(backend)
    model = randomize_(UserTower()).to(device).train()
    for name, p in model.named_parameters():
        p.requires_grad_("lora" in name)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    x = torch.randn(10, 3, 64, device=device)  # [seq, batch, width]

    def call(m):
        return m(x.to(next(m.parameters()).dtype), idx=[0, 3, -1])

    def run_unpatched(m):  # the reference loop: one call per batch row (view)
        return torch.cat([m(x[:, i:i + 1].to(next(m.parameters()).dtype), idx=None if a < 0 else a)
                          for i, a in enumerate([0, 3, -1])], dim=1)

    reference64 = copy.deepcopy(model).double()
    expected = run_unpatched(reference64)
    weights = torch.randn(expected.shape, dtype=torch.float64, device=device)
    (expected * weights).sum().backward()
    expected_grads = grads_of(reference64)
    unpatched = copy.deepcopy(model)
    patch_model(model, backend=backend)
    base_out, base_grads, base_seen = _encoder_run(unpatched, run_unpatched, weights, device.type)
    out, grads, seen = _encoder_run(model, call, weights, device.type)
    attns = [f"transformer.resblocks.{i}.attn" for i in range(2)]
    assert all(seen[a] == base_seen[a] == {AMP} for a in attns), (seen, base_seen)
    assert_same_layer_dtypes(seen, base_seen, required=attns + ["transformer.resblocks.0"])
    assert out.dtype == base_out.dtype
    assert_fp32_master_grads(model)
    assert_within_reference_error("output", out, base_out, expected)
    assert_grads_within_reference_error(grads, base_grads, expected_grads, family=role)


def test_monkey_encoder_compiled_under_bf16_autocast():
    """``torch.compile`` (aot_eager) of the patched encoder under autocast equals the eager patched encoder."""
    from helpers.monkey_models import make_model  # noqa: PLC0415

    model = make_model("cpu", lora_repeat_num=4, lora_dropout=0.0).train()
    patch_model(model, backend="torch")
    pixels = torch.randn(1, 4, 3, model.config.tile_size, model.config.tile_size)
    weights = torch.randn(1, 4 * model.config.n_queries, model.config.output_dim, dtype=torch.float64)
    eager_out, eager_grads, _ = _encoder_run(model, lambda m: m(pixels), weights, "cpu")
    compiled = torch.compile(model, backend="aot_eager")
    out, grads, _ = _encoder_run(model, lambda m: compiled(pixels), weights, "cpu")
    assert out.dtype == AMP and torch.allclose(out.float(), eager_out.float(), rtol=2e-2, atol=2e-2)
    for name, grad in eager_grads.items():
        if grad is None:
            assert grads[name] is None or not grads[name].any(), name
            continue
        assert grads[name].dtype == torch.float32
        assert torch.allclose(grads[name], grad, rtol=5e-2, atol=5e-3 * grad.abs().max().item()), name


# ---------------------------------------------------------------------------------------------------------
# (2) The Monkey VLM, with gradient checkpointing
# ---------------------------------------------------------------------------------------------------------
VLM_CASES = [(b, m) for b in CPU_BACKENDS for m in ("plain", "checkpointed")] + [
    ("torch", "checkpointed-release"), ("triton", "plain")]


@pytest.mark.parametrize("backend,mode", VLM_CASES, ids=[f"{b}-{m}" for b, m in VLM_CASES])
def test_monkey_vlm_under_bf16_autocast(backend, mode):
    """The whole VLM: logits, loss and every gradient within 2x the unpatched model's autocast error, with and
    without gradient checkpointing (the recompute runs under the autocast state of the forward), per-layer dtypes
    equal. ``plain`` / ``checkpointed``: every parameter trainable, both models checkpointed or neither;
    ``checkpointed-release``: the release's recipe (LoRA + resampler trainable, ``--gradient_checkpointing``, bf16),
    which the unpatched model cannot run checkpointed (its in-place image write into a view of a leaf, Monkey
    #83): the patched model checkpointed against the unpatched one without."""
    from test_monkey_vlm import IMAGE_SHAPES, add_images, batch_of_three, make_model  # noqa: PLC0415

    device = use_backend(backend)
    checkpointing = mode.startswith("checkpointed")
    model = make_model(torch.float32, device, trainable="release" if mode.endswith("release") else "all")
    ids, mask, labels, paths = batch_of_three(4)
    add_images(model, {p: IMAGE_SHAPES[4] for p in paths}, torch.float32)
    reference64 = copy.deepcopy(model).double().cpu()
    reference64.zero_grad(set_to_none=True)
    out64 = reference64(ids, attention_mask=mask, labels=labels)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    out64.loss.backward()
    expected_grads = grads_of(reference64)
    unpatched = copy.deepcopy(model)
    patch_model(model, backend=backend)
    recomputes = {}
    if checkpointing:
        for name, m in (("unpatched", unpatched), ("patched", model))[1 if mode.endswith("release") else 0:]:
            m.activation_checkpointing_enable()
            recomputes[name] = [0]
            # a pre-hook: the recompute stops early, once it has what the backward needs, before forward hooks
            m.transformer.h[0].register_forward_pre_hook(lambda *_, c=recomputes[name]: c.__setitem__(0, c[0] + 1))
        assert all(b.gradient_checkpointing for b in model.transformer.visual.transformer.resblocks)

    def run(m):
        m.zero_grad(set_to_none=True)
        seen, handles = record_output_dtypes(m)
        with torch.autocast(device.type, dtype=AMP):
            out = m(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        for handle in handles:
            handle.remove()
        return out.logits.detach(), out.loss.detach(), grads_of(m), seen

    base_logits, base_loss, base_grads, base_seen = run(unpatched)
    logits, loss, grads, seen = run(model)
    blocks = [f"transformer.visual.transformer.resblocks.{i}" for i in range(2)]
    # the windows run with adapters, the global views without: mixed views in one fused pass
    assert_same_layer_dtypes(seen, base_seen, required=blocks + [f"{b}.attn" for b in blocks], mixed_views=True)
    assert logits.dtype == base_logits.dtype
    assert_fp32_master_grads(model)
    floor = 3e-3 if backend == "triton" else 1e-3  # the interpreter truncates fp32 -> bf16
    assert_within_reference_error("logits", logits, base_logits, out64.logits, floor=floor)
    assert_within_reference_error("loss", loss, base_loss, out64.loss, floor=floor)
    assert_grads_within_reference_error(grads, base_grads, expected_grads, floor=floor, family=role)
    if checkpointing:
        assert all(c == [2] for c in recomputes.values()), f"no recompute in the backward: {recomputes}"


# ---------------------------------------------------------------------------------------------------------
# (3) A PEFT LoRA tower
# ---------------------------------------------------------------------------------------------------------
def _peft_model(device):
    pytest.importorskip("peft")
    from helpers.peft_towers import ADAPTERS, make_peft  # noqa: PLC0415

    model = make_peft("siglip", {"red": ADAPTERS["red"]}, device=device).train()
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def _lora_layer_names(model: nn.Module):
    return [name for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
def test_peft_tower_under_bf16_autocast(backend, monkeypatch):
    """Every PEFT LoRA Linear runs FUSED under autocast (no fallback to PEFT's forward, whatever the input's dtype:
    fp32 after a LayerNorm, bf16 after another linear), returns bf16 like PEFT's, and the outputs and LoRA
    gradients are within 2x PEFT's own autocast error."""
    from monkey_kernels.rules import peft_lora  # noqa: PLC0415

    device = use_backend(backend)
    model = _peft_model(device)
    size = model.base_model.model.config.image_size
    pixels = torch.randn(2, 3, size, size, device=device)
    reference64 = copy.deepcopy(model).double()
    reference64.zero_grad(set_to_none=True)
    expected = reference64(pixel_values=pixels.double()).last_hidden_state
    weights = torch.randn(expected.shape, dtype=torch.float64, device=device)
    (expected * weights).sum().backward()
    expected_grads = grads_of(reference64)
    unpatched = copy.deepcopy(model)
    patch_model(model, backend=backend)
    calls = [0]
    fused_op = peft_lora.multi_lora_linear

    def counting(*args, **kwargs):
        calls[0] += 1
        return fused_op(*args, **kwargs)

    monkeypatch.setattr(peft_lora, "multi_lora_linear", counting)

    def run(m):
        m.zero_grad(set_to_none=True)
        seen, handles = record_output_dtypes(m, set(_lora_layer_names(m)))
        with torch.autocast(device.type, dtype=AMP):
            out = m(pixel_values=pixels).last_hidden_state
        (out.double() * weights).sum().backward()
        for handle in handles:
            handle.remove()
        return out.detach(), grads_of(m), seen

    base_out, base_grads, base_seen = run(unpatched)
    out, grads, seen = run(model)
    layers = _lora_layer_names(model)
    assert calls[0] == len(layers) == 12, f"{calls[0]} fused calls for {len(layers)} LoRA layers"
    assert_same_layer_dtypes(seen, base_seen, required=layers)
    assert all(seen[name] == {AMP} for name in layers)
    assert out.dtype == base_out.dtype
    assert_fp32_master_grads(model)
    floor = 3e-3 if backend == "triton" else 1e-3
    assert_within_reference_error("output", out, base_out, expected, floor=floor)
    assert_grads_within_reference_error(grads, base_grads, expected_grads, floor=floor, family=role)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_peft_mixed_adapter_batch_under_bf16_autocast(backend):
    """A per-row selection (three adapters of different ranks, rsLoRA, a base-only row) under autocast against
    PEFT's own ``adapter_names`` (eval: PEFT refuses it in training) under the same autocast: bf16 from every
    LoRA layer as PEFT's, the output within 2x PEFT's error against its float64 run."""
    pytest.importorskip("peft")
    from helpers.peft_towers import make_peft, pixels  # noqa: PLC0415
    from monkey_kernels import adapter_selection  # noqa: PLC0415

    device = use_backend(backend)
    rows = ["red", "__base__", "blue", "green"]
    model = make_peft("siglip", device=device).eval()
    x = pixels(model, len(rows), device)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(pixel_values=x.double(), adapter_names=rows).last_hidden_state
        unpatched = copy.deepcopy(model)
        base_seen, handles = record_output_dtypes(unpatched, set(_lora_layer_names(unpatched)))
        with torch.autocast(device.type, dtype=AMP):
            base = unpatched(pixel_values=x, adapter_names=rows).last_hidden_state
        for handle in handles:
            handle.remove()
        patch_model(model, backend=backend)
        seen, handles = record_output_dtypes(model, set(_lora_layer_names(model)))
        with torch.autocast(device.type, dtype=AMP), adapter_selection(model, rows):
            out = model(pixel_values=x).last_hidden_state
        for handle in handles:
            handle.remove()
    assert_same_layer_dtypes(seen, base_seen, required=_lora_layer_names(model))
    assert all(dtypes == {AMP} for dtypes in seen.values())
    assert out.dtype == base.dtype
    assert_within_reference_error("output", out, base, expected)


def test_peft_tower_compiled_under_bf16_autocast():
    """``torch.compile`` (aot_eager) of the patched PEFT tower under autocast equals the eager patched tower."""
    model = _peft_model("cpu")
    patch_model(model, backend="torch")
    size = model.base_model.model.config.image_size
    pixels = torch.randn(2, 3, size, size)

    def run(fn):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=AMP):
            out = fn(pixel_values=pixels).last_hidden_state
        out.float().square().mean().backward()
        return out.detach(), grads_of(model)

    eager_out, eager_grads = run(model)
    out, grads = run(torch.compile(model, backend="aot_eager"))
    assert out.dtype == eager_out.dtype  # fp32: SigLIP's post_layernorm (not an autocast op on CPU)
    assert torch.allclose(out.float(), eager_out.float(), rtol=2e-2, atol=2e-2)
    for name, grad in eager_grads.items():
        assert grads[name].dtype == torch.float32
        assert torch.allclose(grads[name], grad, rtol=5e-2, atol=5e-3 * grad.abs().max().item()), name


# ---------------------------------------------------------------------------------------------------------
# (4) The SLP embedding
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
def test_slp_embedding_under_bf16_autocast(backend):
    """The LayTextLLM-like model: the fused embedding returns the table's dtype (fp32) as the reference's lookup
    and in-place writes do, the head bf16; output and gradients (table, SLP, image features) within 2x the
    unpatched model's autocast error."""
    from helpers.slp_models import BOX_ID, LayoutModel  # noqa: PLC0415

    device = use_backend(backend)
    vocab, hidden = 12, 16
    model = LayoutModel(vocab, hidden, device).train()
    ids = torch.randint(1, vocab - 1, (2, 9), device=device)
    ids[0, [1, 4]] = BOX_ID
    ids[1, 2] = BOX_ID
    ids[0, [6, 7]] = vocab - 1
    ids[1, [5, 6]] = vocab - 1
    corner = torch.rand(2, 2, 2, device=device) * 0.5
    boxes = torch.cat([corner, corner + 0.25], dim=-1)
    feats = torch.randn(2, 2, hidden, device=device, requires_grad=True)

    def run(m, dtype=torch.float32, amp=True):
        m.zero_grad(set_to_none=True)
        f = feats.detach().to(dtype).requires_grad_()
        seen, handles = record_output_dtypes(m)
        with torch.autocast(device.type, dtype=AMP, enabled=amp):
            out = m(ids, boxes.to(dtype), f)
        (out.double() * weights).sum().backward()
        for handle in handles:
            handle.remove()
        grads = grads_of(m)
        grads["image_features"] = f.grad
        return out.detach(), grads, seen

    reference64 = copy.deepcopy(model).double()
    weights = torch.randn(2, 9, 3, dtype=torch.float64, device=device)
    expected, expected_grads, _ = run(reference64, torch.float64, amp=False)
    unpatched = copy.deepcopy(model)
    report = patch_model(model, backend=backend)
    assert report.rules["slp_embedding"] == 1
    base_out, base_grads, base_seen = run(unpatched)
    out, grads, seen = run(model)
    assert_same_layer_dtypes(seen, base_seen, required=["embed", "head"])
    assert seen["embed"] == {torch.float32} and seen["head"] == {AMP}
    assert_fp32_master_grads(model)
    assert grads["image_features"].dtype == torch.float32
    floor = 3e-3 if backend == "triton" else 1e-3
    assert_within_reference_error("output", out, base_out, expected, floor=floor)
    assert_grads_within_reference_error(grads, base_grads, expected_grads, floor=floor, family=role)


def test_slp_embedding_compiled_under_bf16_autocast():
    """``torch.compile`` (aot_eager) of the patched LayTextLLM-like model under autocast equals the eager one."""
    from helpers.slp_models import BOX_ID, LayoutModel  # noqa: PLC0415

    vocab, hidden = 12, 16
    model = LayoutModel(vocab, hidden, "cpu").train()
    patch_model(model, backend="torch")
    ids = torch.randint(1, vocab - 1, (2, 9))
    ids[:, 1] = BOX_ID
    ids[:, [5, 6]] = vocab - 1
    corner = torch.rand(2, 1, 2) * 0.5
    boxes = torch.cat([corner, corner + 0.25], dim=-1)
    feats = torch.randn(2, 2, hidden)

    def run(fn):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=AMP):
            out = fn(ids, boxes, feats)
        out.float().square().mean().backward()
        return out.detach(), grads_of(model)

    eager_out, eager_grads = run(model)
    out, grads = run(torch.compile(model, backend="aot_eager"))
    assert out.dtype == eager_out.dtype == AMP
    assert torch.allclose(out.float(), eager_out.float(), rtol=2e-2, atol=2e-2)
    for name, grad in eager_grads.items():
        assert grads[name].dtype == torch.float32
        assert torch.allclose(grads[name], grad, rtol=5e-2, atol=5e-3 * grad.abs().max().item()), name

# ---------------------------------------------------------------------------------------------------------
# How the rule reads the reference's form (in place or not)
# ---------------------------------------------------------------------------------------------------------
class _InPlaceViaName(nn.Module):  # the public code's form
    def forward(self, query, idx=None):
        mixed = self.in_proj(query)
        if idx is not None:
            lora_res = self.in_proj_lora[idx](query)
            mixed += lora_res
        return mixed


class _InPlaceDirect(nn.Module):
    def forward(self, query, idx=None):
        mixed = self.in_proj(query)
        mixed += self.in_proj_lora[idx](query)
        return mixed


class _OutOfPlace(nn.Module):  # this package's MonkeyVisualAttention's form
    def forward(self, query, idx=None):
        mixed = self.in_proj(query)
        counter = 0
        counter += 1  # an unrelated in-place add does not count
        return mixed + self.in_proj_lora[idx](query)


def test_adds_in_place_reads_the_reference_form():
    from monkey_kernels.call_contract import adds_in_place  # noqa: PLC0415
    from monkey_kernels.models.monkey_vision import MonkeyVisualAttention  # noqa: PLC0415

    assert adds_in_place(_InPlaceViaName.forward, "in_proj_lora") is True
    assert adds_in_place(_InPlaceDirect.forward, "in_proj_lora") is True
    assert adds_in_place(_OutOfPlace.forward, "in_proj_lora") is False
    assert adds_in_place(MonkeyVisualAttention.forward, "in_proj_lora") is False
    assert adds_in_place(MonkeyVisualAttention.forward, "out_proj_lora") is False
    namespace: dict = {}
    exec("def forward(self, x):\n    x += self.in_proj_lora[0](x)\n    return x\n", namespace)  # no source file
    assert adds_in_place(namespace["forward"], "in_proj_lora") is None
