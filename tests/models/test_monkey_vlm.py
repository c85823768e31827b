"""The ``monkey_vlm`` rule on the structural double of the public Monkey VLM (``tests/helpers/monkey_vlm_double.py``):
patched vs unpatched logits, loss and gradients (float64 on the CPU backends, float32 under the Triton
interpreter), one encoder pass per forward, 4 and 6 windows and a batch mixing both, generation with the KV cache,
gradient checkpointing, unpatching, pickling and ``save_pretrained``, and the errors on bad spans."""
from __future__ import annotations

import copy
import functools
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from torch import nn

from helpers.accuracy import rel_err
from conftest import kernel_device, require_native
from monkey_kernels.rules.monkey_vit import FusedMonkeyBlock
from monkey_kernels.models import MonkeyVisionBlock
from monkey_kernels.rules.monkey_vlm import MonkeyVLMForward, find_image_spans, is_monkey_vlm
from monkey_kernels.patching import is_patched, patch_model, unpatch_model
from helpers.monkey_vlm_double import MonkeyLMHeadModel, QWenConfig, tiny_visual_config

START = tiny_visual_config()["image_start_id"]
END, PAD = START + 1, START + 2
QUERIES = tiny_visual_config()["n_queries"]
WINDOW = tiny_visual_config()["window_size"]
IMAGE_SHAPES = {4: (2 * WINDOW, 2 * WINDOW), 6: (2 * WINDOW, 3 * WINDOW)}  # (H, W): 2x2 and 2 rows x 3 cols
# (backend, dtype, windows): float64 on the CPU backends with 4 and 6 windows, float32 under the Triton
# interpreter (4 windows: the interpreter is slow; the window count is not a kernel parameter).
CASES = [("torch", torch.float64, 4), ("torch", torch.float64, 6), ("native", torch.float64, 4),
         ("native", torch.float64, 6), ("triton", torch.float32, 4)]


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def one_thread():
    """The tiny shapes run faster on one thread than with the intra-op pool's hand-offs (CI has 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def image_span(path: str, windows: int, length: Optional[int] = None) -> List[int]:
    """``<start> path bytes <pad>... <end>`` with ``(windows + 1) * QUERIES`` positions between the markers."""
    body = list(path.encode("utf-8"))
    length = (windows + 1) * QUERIES if length is None else length
    return [START] + body + [PAD] * (length - len(body)) + [END]


def text(n: int) -> List[int]:
    return torch.randint(0, 256, (n,)).tolist()


def make_model(dtype=torch.float64, device="cpu", trainable="release", lora_repeat_num=6, **config) -> nn.Module:
    """A randomised tiny double. ``trainable``: ``"release"`` (LoRA + resampler, the release's recipe) or
    ``"all"`` (every parameter but the frozen sin-cos table)."""
    cfg = QWenConfig(visual=tiny_visual_config(lora_repeat_num=lora_repeat_num), **config)
    model = MonkeyLMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_scale"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("lora_b.weight"):
                p.normal_(0.0, 0.3)
            elif p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    for name, p in model.named_parameters():
        if name.endswith("pos_embed"):
            continue
        release = name.startswith("transformer.visual.") and ("lora" in name or ".attn_pool." in name)
        p.requires_grad_(trainable == "all" or release)
    return model.to(device=device, dtype=dtype).train()


def add_images(model: nn.Module, shapes: Dict[str, Tuple[int, int]], dtype) -> None:
    """Synthetic, normalized test images ``path -> [3, H, W]`` for ``visual.encode``."""
    model.transformer.visual.image_bank.update({p: torch.randn(3, *hw, dtype=dtype) for p, hw in shapes.items()})


def batch_of_three(windows: int):
    """Two sequences, three images (two in the first), the second right-padded: ``(ids, mask, labels, paths)``."""
    paths = ["img0.png", "dir/ü-1.jpg", "c.png"]
    first = text(3) + image_span(paths[0], windows) + text(2) + image_span(paths[1], windows) + text(3)
    second = text(2) + image_span(paths[2], windows) + text(4)
    pad = len(first) - len(second)
    ids = torch.tensor([first, second + [0] * pad])
    mask = torch.ones_like(ids)
    mask[1, len(second):] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels, paths


def run(model: nn.Module, ids, mask, labels):
    """``(logits, loss, {name: grad or None})`` of every trainable parameter after ``loss.backward()``."""
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {n: (None if p.grad is None else p.grad.detach().clone())
             for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


def count_encoder_passes(model: nn.Module) -> List[int]:
    """A counter (``[n]``) of calls of the vision tower's transformer (one per encoder pass)."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    model.transformer.visual.transformer.register_forward_hook(hook)
    return calls


def unused_adapter(name: str, used: int) -> bool:
    """Whether ``name`` is a parameter of an adapter index ``>= used`` (no view of the batch runs it)."""
    for key in ("in_proj_lora.", "out_proj_lora.", "mlp_lora."):
        if key in name:
            return int(name.split(key)[1].split(".")[0]) >= used
    return False


def compare_grads(grads, ref_grads, base_grads=None, *, used: int, factor=4.0, floor=1e-10):
    """Every trainable parameter's gradient against the float64 reference's. An adapter no view used has no
    gradient (``None``) in both (the fused blocks stack only the adapters the batch uses). With ``base_grads`` (the reference in the patched dtype) the error may be ``factor``
    times that one's, plus ``floor``; errors are relative to the norm of the parameter's family."""
    assert set(grads) == set(ref_grads)
    families: Dict[str, List[torch.Tensor]] = {}
    for name, grad in ref_grads.items():
        family = next((k for k in ("lora_scale", "lora_a", "lora_b") if k in name), name)
        if grad is not None:
            families.setdefault(family, []).append(grad.double().reshape(-1))
    norms = {k: torch.cat(v).norm().clamp_min(1e-30).item() for k, v in families.items()}
    for name, ref in ref_grads.items():
        grad = grads[name]
        if unused_adapter(name, used):
            assert ref is None, f"{name}: the reference ran an adapter no window uses"
            assert grad is None, f"{name}: an adapter no view used got a gradient (the reference leaves None)"
            continue
        assert ref is not None and grad is not None, f"{name}: missing gradient"
        assert torch.isfinite(grad).all(), name
        family = next((k for k in ("lora_scale", "lora_a", "lora_b") if k in name), name)
        error = (grad.double().cpu() - ref.double().cpu()).norm().item() / norms[family]
        limit = floor
        if base_grads is not None:
            limit += factor * (base_grads[name].double().cpu() - ref.double().cpu()).norm().item() / norms[family]
        assert error <= limit, f"{name}: gradient error {error:.3e} > {limit:.3e}"


# ---------------------------------------------------------------------------------------------------------
# Patched vs reference
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,dtype,windows", CASES, ids=[f"{c[0]}-{c[2]}windows" for c in CASES])
def test_patched_matches_reference(backend, dtype, windows):
    if backend == "native":
        require_native()
    device = kernel_device(backend)
    model = make_model(dtype, device)
    ids, mask, labels, paths = batch_of_three(windows)
    add_images(model, {p: IMAGE_SHAPES[windows] for p in paths}, torch.float64)
    reference64 = copy.deepcopy(model).double().cpu()
    ref_calls = count_encoder_passes(reference64)
    ref_logits, ref_loss, ref_grads = run(reference64, ids, mask, labels)
    assert ref_calls[0] == windows + 1, "the reference runs one pass per window + one for the global views"
    if dtype != torch.float64:  # the reference in the model's dtype: PyTorch's own error
        base_logits, base_loss, base_grads = run(copy.deepcopy(model), ids.to(device), mask.to(device),
                                                 labels.to(device))

    report = patch_model(model, backend=backend)
    assert report.rules["monkey_vlm"] == 1 and report.rules["monkey_block"] == 2
    assert isinstance(model.transformer.__dict__["forward"], MonkeyVLMForward)
    calls = count_encoder_passes(model)
    logits, loss, grads = run(model, ids.to(device), mask.to(device), labels.to(device))
    assert calls[0] == 1, f"{calls[0]} encoder passes for 3 images; one batched pass expected"
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    if dtype == torch.float64:
        assert rel_err(logits, ref_logits) <= 1e-12 and rel_err(loss, ref_loss) <= 1e-12
        compare_grads(grads, ref_grads, used=windows, floor=1e-10)
    else:
        assert rel_err(logits, ref_logits) <= 4 * rel_err(base_logits, ref_logits) + 1e-6
        assert rel_err(loss, ref_loss) <= 4 * rel_err(base_loss, ref_loss) + 1e-6
        compare_grads(grads, ref_grads, base_grads, used=windows, factor=4.0, floor=1e-5)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_language_model_trainable_and_text_only(backend):
    """Every parameter trainable (the LM too); a text-only batch goes through the original forward unchanged."""
    if backend == "native":
        require_native()
    model = make_model(trainable="all")
    ids, mask, labels, paths = batch_of_three(4)
    add_images(model, {p: IMAGE_SHAPES[4] for p in paths}, torch.float64)
    reference = copy.deepcopy(model)
    ref_logits, ref_loss, ref_grads = run(reference, ids, mask, labels)
    patch_model(model, backend=backend)
    logits, loss, grads = run(model, ids, mask, labels)
    assert rel_err(logits, ref_logits) <= 1e-12 and rel_err(loss, ref_loss) <= 1e-12
    assert grads["transformer.wte.weight"] is not None and grads["lm_head.weight"] is not None
    compare_grads(grads, ref_grads, used=4)

    plain = torch.randint(0, 256, (2, 9))
    calls = count_encoder_passes(model)
    with torch.no_grad():
        torch.testing.assert_close(model(plain).logits, reference(plain).logits, rtol=0, atol=0)
    assert calls[0] == 0


def test_mixed_window_counts_in_one_batch():
    """``encode`` returning one window list per image: a 4-window and a 6-window image in one batch, one pass,
    equal to the reference run on each sequence alone."""
    model = make_model(dtype=torch.float64)
    add_images(model, {"four.png": IMAGE_SHAPES[4], "six.png": IMAGE_SHAPES[6]}, torch.float64)
    reference = copy.deepcopy(model).eval()
    first = text(2) + image_span("four.png", 4) + text(3)
    second = text(1) + image_span("six.png", 6) + text(2)
    width = max(len(first), len(second))
    ids = torch.tensor([first + [0] * (width - len(first)), second + [0] * (width - len(second))])
    mask = (torch.arange(width)[None] < torch.tensor([[len(first)], [len(second)]])).long()
    patch_model(model, backend="torch")
    model.eval().transformer.visual.per_image_windows = True
    calls = count_encoder_passes(model)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        for row, seq in enumerate((first, second)):
            expected = reference(torch.tensor([seq])).logits[0]
            torch.testing.assert_close(logits[row, :len(seq)], expected, rtol=1e-12, atol=1e-12)
    assert calls[0] == 1


# ---------------------------------------------------------------------------------------------------------
# Generation, checkpointing, the reference's in-place failure
# ---------------------------------------------------------------------------------------------------------
def test_generation_with_kv_cache_gives_the_same_tokens():
    model = make_model(dtype=torch.float64).eval()
    ids, mask, _, paths = batch_of_three(4)
    ids, mask = ids[:1], mask[:1]  # the unpadded prompt with two images
    add_images(model, {p: IMAGE_SHAPES[4] for p in paths}, torch.float64)
    reference = copy.deepcopy(model)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    patch_model(model, backend="torch")
    calls = count_encoder_passes(model)
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert calls[0] == 1, "the image path runs on the first step only"
    assert torch.equal(tokens, expected)
    uncached = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                              use_cache=False)
    assert torch.equal(uncached, expected), "with and without the KV cache"
    assert torch.equal(model.chat(ids, max_new_tokens=3), expected[:, ids.shape[1]:ids.shape[1] + 3])


@pytest.mark.parametrize("trainable", ["release", "all"])
def test_gradient_checkpointing(trainable):
    """transformers' ``activation_checkpointing_enable`` (which also makes the embedding output require grad,
    as PEFT does): with a frozen embedding the reference's in-place write then fails on a view of a leaf (Monkey
    #83); the patched model trains, checkpointed, with the gradients of the reference run without it."""
    model = make_model(trainable=trainable)
    ids, mask, labels, paths = batch_of_three(4)
    add_images(model, {p: IMAGE_SHAPES[4] for p in paths}, torch.float64)
    reference = copy.deepcopy(model)
    ref_logits, ref_loss, ref_grads = run(reference, ids, mask, labels)
    reference.activation_checkpointing_enable()
    if trainable == "release":  # a frozen embedding: its output made to require grad is a leaf
        with pytest.raises(RuntimeError, match="view of a leaf Variable"):
            reference(ids, attention_mask=mask, labels=labels)
    if trainable == "release":  # both orders: checkpointing enabled before and after patching
        model.activation_checkpointing_enable()
        patch_model(model, backend="torch")
    else:
        patch_model(model, backend="torch")
        model.activation_checkpointing_enable()
    assert model.transformer.gradient_checkpointing
    assert all(b.gradient_checkpointing for b in model.transformer.visual.transformer.resblocks)
    lm_block_calls = [0]
    # a pre-hook: the recompute stops early, once it has what the backward needs, before forward hooks run
    model.transformer.h[0].register_forward_pre_hook(lambda *_: lm_block_calls.__setitem__(0, lm_block_calls[0] + 1))
    logits, loss, grads = run(model, ids, mask, labels)
    assert lm_block_calls[0] == 2, "a checkpointed language-model block runs again in the backward"
    assert rel_err(logits, ref_logits) <= 1e-12 and rel_err(loss, ref_loss) <= 1e-12
    compare_grads(grads, ref_grads, used=4)


# ---------------------------------------------------------------------------------------------------------
# Unpatching, pickling, save_pretrained
# ---------------------------------------------------------------------------------------------------------
def test_unpatch_restores_forward_and_state_dict():
    model = make_model().eval()
    ids, mask, _, paths = batch_of_three(4)
    add_images(model, {p: IMAGE_SHAPES[4] for p in paths}, torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    patch_model(model, backend="torch")
    assert list(model.state_dict()) == list(state)
    with torch.no_grad():
        patched = model(ids, attention_mask=mask).logits
    report = unpatch_model(model)
    assert report.rules["monkey_vlm"] == 1 and not is_patched(model)
    assert "forward" not in model.transformer.__dict__
    assert model.transformer.forward.__func__ is type(model.transformer).forward
    assert all(type(b) is MonkeyVisionBlock for b in model.transformer.visual.transformer.resblocks)
    assert dict(model.named_parameters()) == params
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    calls = count_encoder_passes(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, expected, rtol=0, atol=0)
    assert calls[0] == 5
    torch.testing.assert_close(patched, expected, rtol=1e-12, atol=1e-12)


def test_previous_instance_forward_is_kept_and_restored():
    """An instance-level forward already on the model (e.g. an accelerate hook) runs under the patch and comes
    back on unpatching."""
    model = make_model().eval()
    ids, mask, _, paths = batch_of_three(4)
    add_images(model, {p: IMAGE_SHAPES[4] for p in paths}, torch.float64)
    seen = []
    class_forward = model.transformer.forward

    @functools.wraps(class_forward)
    def wrapper(*args, **kwargs):
        seen.append(kwargs.get("input_ids", args[0] if args else None))
        return class_forward(*args, **kwargs)

    model.transformer.forward = wrapper
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        patch_model(model, backend="torch")
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, expected, rtol=1e-12, atol=1e-12)
    assert len(seen) == 2 and not (seen[1] == START).any(), "the wrapper ran, with the start markers masked"
    unpatch_model(model)
    assert model.transformer.__dict__["forward"] is wrapper


def test_pickle_deepcopy_and_save_pretrained(tmp_path):
    model = make_model().eval()
    ids, mask, _, paths = batch_of_three(4)
    add_images(model, {p: IMAGE_SHAPES[4] for p in paths}, torch.float64)
    reference = copy.deepcopy(model)
    reference.save_pretrained(tmp_path / "reference")
    patch_model(model, backend="torch")
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    torch.save(model, tmp_path / "whole.pt")
    for clone in (torch.load(tmp_path / "whole.pt", weights_only=False), copy.deepcopy(model)):
        assert is_patched(clone) and isinstance(clone.transformer.__dict__["forward"], MonkeyVLMForward)
        assert clone.transformer.__dict__["forward"].module is clone.transformer
        assert isinstance(clone.transformer.visual.transformer.resblocks[0], FusedMonkeyBlock)
        calls = count_encoder_passes(clone)
        with torch.no_grad():
            assert torch.equal(clone(ids, attention_mask=mask).logits, expected)
        assert calls[0] == 1
    model.save_pretrained(tmp_path / "patched")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "patched" / "model.safetensors")
    saved_reference = load_file(tmp_path / "reference" / "model.safetensors")
    assert sorted(saved) == sorted(saved_reference)
    assert all(torch.equal(saved[k], saved_reference[k]) for k in saved)
    loaded = MonkeyLMHeadModel.from_pretrained(tmp_path / "patched").double().eval()
    assert not is_patched(loaded)
    loaded.transformer.visual.image_bank.update(model.transformer.visual.image_bank)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Recognition and bad input
# ---------------------------------------------------------------------------------------------------------
def test_recognised_by_structure_only_once_fused():
    model = make_model()
    assert not is_monkey_vlm(model.transformer), "unfused vision blocks: no one-pass forward possible"
    report = patch_model(model, backend="torch")
    assert report.rules["monkey_vlm"] == 1
    assert not is_monkey_vlm(model.transformer), "already patched"
    assert not is_monkey_vlm(model.transformer.visual) and not is_monkey_vlm(model)


def test_a_visual_that_reads_idx_itself_is_not_claimed_and_the_model_still_runs():
    """The monkey_vlm rule hands the encoder one adapter id per view; a vision tower whose forward does more with
    ``idx`` than handing it to its transformer is left alone (the ViT rules still fuse its transformer)."""

    class Visual(type(make_model().transformer.visual)):
        def forward(self, x, idx=None):
            if isinstance(idx, int):
                idx = idx % 6
            return super().forward(x, idx=idx)

    model = make_model()
    model.transformer.visual.__class__ = Visual
    add_images(model, {p: IMAGE_SHAPES[4] for p in ["img0.png", "dir/ü-1.jpg", "c.png"]}, torch.float64)
    ids, mask, labels, _ = batch_of_three(4)
    reference = copy.deepcopy(model).eval()
    report = patch_model(model, backend="torch")
    assert "monkey_vlm" not in report.rules and report.rules["monkey_transformer"] == 1
    reason = next(r for name, rule, r in report.skipped if rule == "monkey_vlm")
    assert "idx" in reason and "self.transformer" in reason, reason
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids, attention_mask=mask).logits,
                                   reference(ids, attention_mask=mask).logits, rtol=1e-10, atol=1e-10)


def test_find_image_spans_decodes_like_the_original():
    first = text(2) + image_span("a/ü.png", 4) + text(1) + image_span("b", 6)
    ids = torch.tensor([first, text(3) + [7] * (len(first) - 3)])
    spans = find_image_spans(ids, START)
    assert [(s.sequence, s.path, s.length) for s in spans] == [(0, "a/ü.png", 20), (0, "b", 28)]
    assert spans[0].start == 2 and spans[1].start == spans[0].end + 2


@pytest.mark.parametrize("problem", ["no_end", "no_start", "short_span", "long_span", "too_many_windows", "no_pad"])
def test_bad_inputs_raise_value_errors_naming_the_sequence(problem):
    model = make_model(lora_repeat_num=4).eval()
    windows = 6 if problem == "too_many_windows" else 4
    add_images(model, {"ok.png": IMAGE_SHAPES[4], "x.png": IMAGE_SHAPES[windows]}, torch.float64)
    patch_model(model, backend="torch")
    model.transformer.visual.per_image_windows = problem == "too_many_windows"  # images of two sizes
    good = text(2) + image_span("ok.png", 4) + text(2)
    bad = {
        "no_end": text(2) + image_span("x.png", 4)[:-1] + text(3),
        "no_start": text(2) + image_span("x.png", 4)[1:] + text(3),
        "short_span": text(2) + image_span("x.png", 4, length=19) + text(3),
        "long_span": text(1) + image_span("x.png", 4, length=21) + text(2),
        "too_many_windows": text(2) + image_span("x.png", 6, length=20) + text(2),
        "no_pad": text(2) + [START] + [ord("x")] * 19 + [PAD, END] + text(2),
    }[problem]
    width = max(len(good), len(bad))
    ids = torch.tensor([good + [0] * (width - len(good)), bad + [0] * (width - len(bad))])
    message = {"no_end": "end marker", "no_start": "end marker", "short_span": r"\(4 \+ 1\) x 4 = 20",
               "long_span": r"\(4 \+ 1\) x 4 = 20", "too_many_windows": "only 4 per-tile adapters",
               "no_pad": "no pad token"}[problem]
    with pytest.raises(ValueError, match=f"sequence 1.*{message}"):
        with torch.no_grad():
            model(ids)
