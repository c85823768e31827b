"""The ``textmonkey_vlm`` rule on the structural double of the public TextMonkey VLM
(``tests/helpers/textmonkey_double.py`` on the Qwen double): patched vs unpatched logits, loss and gradients
(float64 on the CPU backends, float32 under the Triton interpreter; training mode, so the images go through
``encode``'s JPEG re-encoding, seeded alike), with per-window adapters and without adapters (the release recipe),
one block call per layer for all the images of a forward, generation with the KV cache, gradient checkpointing
(where the original's in-place write fails), unpatching, pickling and ``save_pretrained``, bad spans."""
from __future__ import annotations

import copy
import random
from typing import Dict, List

import numpy as np
import pytest
import torch
from torch import nn

from conftest import kernel_device, require_native
from helpers.accuracy import rel_err
from helpers.monkey_vlm_double import QWenConfig
from helpers.textmonkey_double import (CrossWindowAttention, TextMonkeyLMHeadModel, VisualAttentionBlock,
                                       randomize_textmonkey_, tiny_textmonkey_visual)
from monkey_kernels.patching import is_patched, patch_model, unpatch_model
from monkey_kernels.rules.monkey_vit import FusedMonkeyBlock
from monkey_kernels.rules.textmonkey_vlm import TextMonkeyVLMForward, is_textmonkey_vlm

START = tiny_textmonkey_visual()["image_start_id"]
END, PAD = START + 1, START + 2
SPAN = 8 + 4  # r (the token filter's kept tokens) + the global view's queries
LAYERS = tiny_textmonkey_visual()["layers"]
PATHS = ["a.png", "bb.jpg", "c.png"]
CASES = [("torch", torch.float64, 4), ("torch", torch.float64, 0), ("native", torch.float64, 4),
         ("native", torch.float64, 0), ("triton", torch.float32, 4)]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def image_files(tmp_path, monkeypatch):
    """Three RGB files of different sizes in the working directory (the spans hold their short names)."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    for name, (h, w) in zip(PATHS, [(150, 130), (90, 200), (112, 112)]):
        Image.fromarray(np.random.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(name)
    return PATHS


def image_span(path: str, length: int = SPAN) -> List[int]:
    body = list(path.encode("utf-8"))
    return [START] + body + [PAD] * (length - len(body)) + [END]


def text(n: int) -> List[int]:
    return torch.randint(0, 256, (n,)).tolist()


def make_model(dtype=torch.float64, device="cpu", lora_repeat_num=4, trainable="release") -> nn.Module:
    """A randomised tiny double in training mode; ``trainable``: the release's recipe (``fix_vit``: adapters,
    cross-window attention, attn_pool, ln_post, proj, the Perceiver) or ``"all"``."""
    model = TextMonkeyLMHeadModel(QWenConfig(visual=tiny_textmonkey_visual(lora_repeat_num=lora_repeat_num)))
    randomize_textmonkey_(model)
    for module in model.modules():
        if isinstance(module, CrossWindowAttention):
            module.shift_attn.mlp.drop1.p = 0.0
    for name, p in model.named_parameters():
        visual = name.startswith("transformer.visual.")
        release = visual and ("lora" in name or "window_attention" in name or any(
            name.startswith(f"transformer.visual.{part}") for part in ("attn_pool", "ln_post", "proj",
                                                                       "downresampler")))
        p.requires_grad_(trainable == "all" or release)
    return model.to(device=device, dtype=dtype).train()


def batch_of_three():
    """Two sequences, three images (two in the first), the second right-padded: ``(ids, mask, labels)``."""
    first = text(3) + image_span(PATHS[0]) + text(2) + image_span(PATHS[1]) + text(3)
    second = text(2) + image_span(PATHS[2]) + text(4)
    pad = len(first) - len(second)
    ids = torch.tensor([first, second + [0] * pad])
    mask = torch.ones_like(ids)
    mask[1, len(second):] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def run(model: nn.Module, ids, mask, labels):
    """``(logits, loss, grads)`` after ``loss.backward()``; Python's ``random`` seeded first (the JPEG
    re-encoding's quality in training)."""
    model.zero_grad(set_to_none=True)
    random.seed(11)
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {n: (None if p.grad is None else p.grad.detach().clone())
             for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


def count_block_calls(model: nn.Module) -> List[int]:
    calls = [0]
    for block in model.transformer.visual.transformer.resblocks:
        block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def compare_grads(grads: Dict, ref_grads: Dict, base_grads: Dict = None, floor=1e-10, factor=4.0):
    """Per parameter family (the scales together, the float32-resized tables at float32's level), relative."""
    assert set(grads) == set(ref_grads)
    families: Dict[str, List[str]] = {}
    for name, ref in ref_grads.items():
        key = "scalars" if ref is not None and ref.numel() == 1 else name
        families.setdefault(key, []).append(name)
    for key, names in families.items():
        if ref_grads[names[0]] is None:
            assert grads[names[0]] is None, f"{key}: a gradient where the reference has none"
            continue
        got = torch.cat([grads[n].double().cpu().reshape(-1) for n in names])
        ref = torch.cat([ref_grads[n].double().cpu().reshape(-1) for n in names])
        limit = max(floor, 1e-6) if key.endswith(("pos_embed", "positional_embedding")) else floor
        if base_grads is not None:
            limit += factor * rel_err(torch.cat([base_grads[n].double().cpu().reshape(-1) for n in names]), ref)
        assert rel_err(got, ref) <= limit, f"{key}: gradient error {rel_err(got, ref):.3e} > {limit:.3e}"


# ---------------------------------------------------------------------------------------------------------
# Patched vs reference
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,dtype,adapters", CASES, ids=[f"{c[0]}-{c[2]}adapters" for c in CASES])
def test_patched_matches_reference(image_files, backend, dtype, adapters):
    if backend == "native":
        require_native()
    device = kernel_device(backend)
    model = make_model(dtype, device, lora_repeat_num=adapters)
    ids, mask, labels = batch_of_three()
    reference64 = copy.deepcopy(model).double().cpu()
    ref_calls = count_block_calls(reference64)
    ref_logits, ref_loss, ref_grads = run(reference64, ids, mask, labels)
    assert ref_calls[0] == LAYERS * (4 + 1), "the reference: one call per window and layer, then the global views"
    if dtype != torch.float64:
        base_logits, base_loss, base_grads = run(copy.deepcopy(model), ids.to(device), mask.to(device),
                                                 labels.to(device))

    report = patch_model(model, backend=backend)
    assert report.rules["textmonkey_vlm"] == 1 and report.rules["textmonkey_block"] == LAYERS
    assert isinstance(model.transformer.__dict__["forward"], TextMonkeyVLMForward)
    calls = count_block_calls(model)
    logits, loss, grads = run(model, ids.to(device), mask.to(device), labels.to(device))
    assert calls[0] == LAYERS, f"{calls[0]} block calls for 3 images; one per layer expected"
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    if dtype == torch.float64:
        assert rel_err(logits, ref_logits) <= 1e-12 and rel_err(loss, ref_loss) <= 1e-12
        compare_grads(grads, ref_grads)
    else:
        assert rel_err(logits, ref_logits) <= 4 * rel_err(base_logits, ref_logits) + 1e-6
        assert rel_err(loss, ref_loss) <= 4 * rel_err(base_loss, ref_loss) + 1e-6
        compare_grads(grads, ref_grads, base_grads, floor=1e-5)


def test_language_model_trainable_and_text_only(image_files):
    model = make_model(trainable="all")
    ids, mask, labels = batch_of_three()
    reference = copy.deepcopy(model)
    ref_logits, ref_loss, ref_grads = run(reference, ids, mask, labels)
    patch_model(model, backend="torch")
    logits, loss, grads = run(model, ids, mask, labels)
    assert rel_err(logits, ref_logits) <= 1e-12 and rel_err(loss, ref_loss) <= 1e-12
    assert grads["transformer.wte.weight"] is not None and grads["lm_head.weight"] is not None
    compare_grads(grads, ref_grads)
    plain = torch.randint(0, 256, (2, 9))
    calls = count_block_calls(model)
    with torch.no_grad():
        assert torch.equal(model(plain).logits, reference(plain).logits)
    assert calls[0] == 0


# ---------------------------------------------------------------------------------------------------------
# Generation, checkpointing
# ---------------------------------------------------------------------------------------------------------
def test_generation_with_kv_cache_gives_the_same_tokens(image_files):
    model = make_model().eval()
    ids, mask, _ = batch_of_three()
    ids, mask = ids[:1], mask[:1]
    reference = copy.deepcopy(model)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    patch_model(model, backend="torch")
    calls = count_block_calls(model)
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert calls[0] == LAYERS, "the image path runs on the first step only, one call per layer"
    assert torch.equal(tokens, expected)
    uncached = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                              use_cache=False)
    assert torch.equal(uncached, expected)


def test_gradient_checkpointing(image_files):
    """transformers' ``activation_checkpointing_enable`` makes the frozen embedding's output require grad: the
    original's in-place write then fails on a view of a leaf; the patched model trains, checkpointed, with the
    gradients of the original run without checkpointing."""
    model = make_model()
    ids, mask, labels = batch_of_three()
    reference = copy.deepcopy(model)
    ref_logits, ref_loss, ref_grads = run(reference, ids, mask, labels)
    reference.activation_checkpointing_enable()
    with pytest.raises(RuntimeError, match="view of a leaf Variable"):
        reference(ids, attention_mask=mask, labels=labels)
    patch_model(model, backend="torch")
    model.activation_checkpointing_enable()
    assert model.transformer.gradient_checkpointing
    lm_block_calls = [0]
    model.transformer.h[0].register_forward_pre_hook(lambda *_: lm_block_calls.__setitem__(0, lm_block_calls[0] + 1))
    logits, loss, grads = run(model, ids, mask, labels)
    assert lm_block_calls[0] == 2, "a checkpointed language-model block runs again in the backward"
    assert rel_err(logits, ref_logits) <= 1e-12 and rel_err(loss, ref_loss) <= 1e-12
    compare_grads(grads, ref_grads)


# ---------------------------------------------------------------------------------------------------------
# Unpatching, pickling, save_pretrained
# ---------------------------------------------------------------------------------------------------------
def test_unpatch_pickle_and_save_pretrained(image_files, tmp_path):
    model = make_model().eval()
    ids, mask, _ = batch_of_three()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "reference")
    patch_model(model, backend="torch")
    assert list(model.state_dict()) == list(state)
    with torch.no_grad():
        patched = model(ids, attention_mask=mask).logits
    assert rel_err(patched, expected) <= 1e-12
    torch.save(model, tmp_path / "whole.pt")
    for clone in (torch.load(tmp_path / "whole.pt", weights_only=False), copy.deepcopy(model)):
        assert is_patched(clone) and clone.transformer.__dict__["forward"].module is clone.transformer
        assert isinstance(clone.transformer.visual.transformer.resblocks[0], FusedMonkeyBlock)
        calls = count_block_calls(clone)
        with torch.no_grad():
            assert torch.equal(clone(ids, attention_mask=mask).logits, patched)
        assert calls[0] == LAYERS
    model.save_pretrained(tmp_path / "patched")
    from safetensors.torch import load_file

    saved, saved_reference = (load_file(tmp_path / d / "model.safetensors") for d in ("patched", "reference"))
    assert sorted(saved) == sorted(saved_reference) and all(torch.equal(saved[k], saved_reference[k]) for k in saved)
    loaded = TextMonkeyLMHeadModel.from_pretrained(tmp_path / "patched").double().eval()
    with torch.no_grad():
        assert rel_err(loaded(ids, attention_mask=mask).logits, expected) <= 1e-12

    report = unpatch_model(model)
    assert report.rules["textmonkey_vlm"] == 1 and not is_patched(model)
    assert "forward" not in model.transformer.__dict__ and "encode" not in model.transformer.visual.__dict__
    assert all(type(b) is VisualAttentionBlock for b in model.transformer.visual.transformer.resblocks)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, expected)


# ---------------------------------------------------------------------------------------------------------
# Recognition and bad input
# ---------------------------------------------------------------------------------------------------------
def test_recognised_by_structure_once_its_encoder_is_patched():
    model = make_model()
    assert not is_textmonkey_vlm(model.transformer), "an unpatched encoder: no one-pass encode to run"
    report = patch_model(model, backend="torch")
    assert report.rules["textmonkey_vlm"] == 1 and "monkey_vlm" not in report.rules and report.skipped == []
    assert not is_textmonkey_vlm(model.transformer), "already patched"


@pytest.mark.parametrize("problem", ["short_span", "long_span", "too_many_windows"])
def test_bad_inputs_raise_value_errors(image_files, problem):
    model = make_model(lora_repeat_num=2 if problem == "too_many_windows" else 4).eval()
    patch_model(model, backend="torch")
    length = {"short_span": SPAN - 1, "long_span": SPAN + 1}.get(problem, SPAN)
    good = text(2) + image_span(PATHS[0]) + text(2)
    bad = text(2) + image_span(PATHS[1], length) + text(3)
    width = max(len(good), len(bad))
    ids = torch.tensor([good + [0] * (width - len(good)), bad + [0] * (width - len(bad))])
    message = {"short_span": f"sequence 1: the image 'bb.jpg'.*holds {SPAN - 1} positions.*gives {SPAN} features",
               "long_span": f"sequence 1: the image 'bb.jpg'.*holds {SPAN + 1} positions",
               "too_many_windows": r"image 0 \('a.png'\).*has 4 windows \(2x2\).*has 2 per-window adapters"}[problem]
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(ids)
