"""The TextMonkey encoder rules (``textmonkey_transformer`` / ``textmonkey_block`` / ``textmonkey_encoder``) on the
structural double of the public TextMonkey (``tests/helpers/textmonkey_double.py``): patched vs reference outputs
and gradients (float64 on the CPU backends, float32 under the Triton interpreter; eval mode, and train mode with
every dropout at p=0), the ``lora_idx`` modes, one block call per layer, the release's flags (no adapters, no
global view, no token filter, no cross-window attention), the 3x3-window size and growth, loading from files (the
JPEG re-encoding in training), the direct transformer calls, the errors, unpatching."""
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
from helpers.textmonkey_double import (CrossWindowAttention, VisionTransformer, VisualAttentionBlock,
                                       randomize_textmonkey_, tiny_textmonkey_visual)
from monkey_kernels.growth import grow_tile_adapters
from monkey_kernels.patching import is_patched, patch_model, rule_of, unpatch_model
from monkey_kernels.rules.monkey_vit import FusedMonkeyBlock
from monkey_kernels.rules.textmonkey import window_adapter_ids

IMAGE = 112  # the tiny double's image side: 2x2 windows of 4x4 patches (its "896 x 896")
LAYERS = tiny_textmonkey_visual()["layers"]
STITCHES = 2  # window_pos (1, 3, 24, 46) with 4 layers


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny shapes run faster on one thread than with the intra-op pool's hand-offs (CI has 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_encoder(dtype=torch.float64, device="cpu", **overrides) -> VisionTransformer:
    """A tiny randomised double in eval mode, every dropout at p=0 unless ``lora_dropout`` says otherwise (the
    cross-window MLP's hard-coded 0.05 set to 0 on the module)."""
    visual = tiny_textmonkey_visual(**overrides)
    visual.pop("image_start_id")
    model = randomize_textmonkey_(VisionTransformer(**visual))
    for module in model.modules():
        if isinstance(module, CrossWindowAttention):
            module.shift_attn.mlp.drop1.p = 0.0
    return model.to(device=device, dtype=dtype).eval()


def count_calls(model: nn.Module) -> Dict[str, List[int]]:
    """Forward-call counters of the blocks and of the cross-window modules (pre-hooks: they fire for a fused
    block too)."""
    counts = {"blocks": [0], "cross_window": [0]}

    def counter(key):
        def hook(*_):
            counts[key][0] += 1
        return hook

    for block in model.transformer.resblocks:
        block.register_forward_pre_hook(counter("blocks"))
    for module in getattr(model.transformer, "window_attention", []):
        module.register_forward_pre_hook(counter("cross_window"))
    return counts


def release_trainable_(model: nn.Module) -> nn.Module:
    """The release's recipe (``fix_vit``): the adapters, the cross-window attention, attn_pool (its sin-cos table
    too), ln_post, proj and the token filter's Perceiver train; the ViT blocks' base weights do not."""
    for name, p in model.named_parameters():
        p.requires_grad_("lora" in name or "window_attention" in name or name.startswith(("attn_pool", "ln_post",
                                                                                        "proj", "downresampler")))
    return model


def grads_of(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()
            if p.requires_grad}


def encode_and_backward(model: nn.Module, images: torch.Tensor, lora_idx, weights: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model.encode(None, lora_idx=lora_idx, input_image=images)
    (out * weights.to(out.dtype)).sum().backward()
    return out.detach(), grads_of(model)


# Tables the original resizes bicubically IN FLOAT32 whatever the model's dtype (get_abs_pos): their gradients
# pass a float32 interpolation backward, once per window call in the reference, once per pass when patched.
FLOAT32_RESIZED = ("attn_pool.pos_embed", "positional_embedding")


def assert_grads_close(grads, expected, base=None, floor=1e-10, factor=4.0):
    """Each parameter's gradient within ``floor`` (+ ``factor`` x the error of ``base``, the reference in the
    patched dtype) of the float64 reference's, relative; the one-element ones (the scales: sums over every
    token, with cancellation) judged together as one vector."""
    assert set(grads) == set(expected)
    scalars = [name for name, ref in expected.items() if ref is not None and ref.numel() == 1]
    groups = {name: [name] for name, ref in expected.items() if name not in scalars}
    if scalars:
        groups["the one-element parameters"] = scalars
    for label, names in groups.items():
        if expected[names[0]] is None:
            assert grads[names[0]] is None, f"{label}: the reference leaves no gradient, the patched model gave one"
            continue
        assert all(grads[n] is not None and torch.isfinite(grads[n]).all() for n in names), label
        got = torch.cat([grads[n].double().cpu().reshape(-1) for n in names])
        ref = torch.cat([expected[n].double().cpu().reshape(-1) for n in names])
        limit = max(floor, 1e-6) if label in FLOAT32_RESIZED else floor
        if base is not None:
            limit += factor * rel_err(torch.cat([base[n].double().cpu().reshape(-1) for n in names]), ref)
        assert rel_err(got, ref) <= limit, f"{label}: relative gradient error {rel_err(got, ref):.3e} > {limit:.3e}"


# ---------------------------------------------------------------------------------------------------------
# Patched vs reference
# ---------------------------------------------------------------------------------------------------------
CASES = [("torch", torch.float64), ("native", torch.float64), ("triton", torch.float32)]


@pytest.mark.parametrize("backend,dtype", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("lora_idx", [None, 0, 1, 4], ids=["none", "zero", "one", "per_window"])
def test_encode_matches_reference_with_one_block_call_per_layer(backend, dtype, lora_idx):
    """``encode`` (windows, cross-window attention, token filter, global view): outputs in eval mode, outputs and
    gradients of the release's trainable set in train mode (dropout p=0), against the float64 reference."""
    if backend == "native":
        require_native()
    device = kernel_device(backend)
    model = release_trainable_(make_encoder(dtype, device))
    images = torch.randn(2, 3, IMAGE, IMAGE, dtype=torch.float64)
    reference = copy.deepcopy(model).double().cpu()
    ref_counts = count_calls(reference)
    with torch.no_grad():
        expected = reference.encode(None, lora_idx=lora_idx, input_image=images)
    windows = 4
    assert ref_counts["blocks"][0] == LAYERS * (windows + 1), "the reference: a call per window and layer + global"
    assert ref_counts["cross_window"][0] == STITCHES
    weights = torch.randn_like(expected)
    reference.train()
    _, ref_grads = encode_and_backward(reference, images, lora_idx, weights)
    if dtype != torch.float64:  # the reference in the patched dtype: PyTorch's own rounding
        base = copy.deepcopy(model)
        with torch.no_grad():
            base_out = base.encode(None, lora_idx=lora_idx, input_image=images.to(device, dtype))
        _, base_grads = encode_and_backward(base.train(), images.to(device, dtype), lora_idx, weights.to(device))

    report = patch_model(model, backend=backend)
    assert report.rules["textmonkey_block"] == LAYERS and report.rules["textmonkey_encoder"] == 1
    assert all(isinstance(b, FusedMonkeyBlock) for b in model.transformer.resblocks)
    counts = count_calls(model)
    with torch.no_grad():
        out = model.encode(None, lora_idx=lora_idx, input_image=images.to(device, dtype))
    assert counts["blocks"][0] == LAYERS, f"{counts['blocks'][0]} block calls; one per layer expected"
    assert counts["cross_window"][0] == STITCHES
    assert out.shape == expected.shape == (2, 8 + 4, 32) and out.dtype == dtype
    _, grads = encode_and_backward(model.train(), images.to(device, dtype), lora_idx, weights.to(device))
    if dtype == torch.float64:
        assert rel_err(out, expected) <= 1e-12
        assert_grads_close(grads, ref_grads)
    else:
        assert rel_err(out, expected) <= 4 * rel_err(base_out, expected) + 1e-6
        assert_grads_close(grads, ref_grads, base_grads, floor=1e-5)


@pytest.mark.parametrize("lora_idx", [None, 0, 1, 3])
def test_forward_modes_match_reference(lora_idx):
    """``forward(x, lora_idx, add_window=True)`` (note: 1 is NOT mapped to 0 here, only ``encode`` does that) and
    the plain ``forward(x)`` (no adapter, whatever ``lora_idx``)."""
    model = make_encoder()
    reference = copy.deepcopy(model)
    images = torch.randn(3, 3, IMAGE, IMAGE, dtype=torch.float64)
    patch_model(model, backend="torch")
    with torch.no_grad():
        for add_window in (True, False):
            expected = reference(images, lora_idx=lora_idx, add_window=add_window)
            got = model(images, lora_idx=lora_idx, add_window=add_window)
            assert got.shape == expected.shape and rel_err(got, expected) <= 1e-12
        global_view = torch.randn(2, 3, 70, 70, dtype=torch.float64)  # a 5x5 grid: any size runs the plain pass
        assert rel_err(model(global_view), reference(global_view)) <= 1e-12


def test_lora_idx_semantics():
    assert window_adapter_ids(None, 4) == [-1] * 4
    assert window_adapter_ids(0, 4) == [0] * 4
    assert window_adapter_ids(1, 4) == [0, 1, 2, 3]  # the window loop: only encode maps 1 to 0
    assert window_adapter_ids(17, 3) == window_adapter_ids(-1, 3) == [0, 1, 2]
    for bad in (True, 1.0, "1"):
        with pytest.raises(ValueError, match="lora_idx must be None or an int"):
            window_adapter_ids(bad, 4)
    model = make_encoder()
    patch_model(model, backend="torch")
    with pytest.raises(ValueError, match="lora_idx must be None or an int"):
        model.encode(None, lora_idx=True, input_image=torch.randn(1, 3, IMAGE, IMAGE, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------
# The release's flags and other sizes
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["no_adapters", "no_global", "no_filter", "no_cross_window", "stitch_first"])
def test_flag_variants_match_reference(variant):
    """``lora_repeat_num=0`` (the release recipe: empty adapter lists, ``lora_idx=None``), ``use_global=False``,
    ``resampler=False``, ``add_window=False`` at construction (windows independent: a non-square 2x3 grid runs),
    a stitch before the first block."""
    overrides = {"no_adapters": dict(lora_repeat_num=0), "no_global": dict(use_global=False),
                 "no_filter": dict(resampler=False), "no_cross_window": dict(add_window=False, lora_repeat_num=6),
                 "stitch_first": dict(window_pos=(0, 2, 3, 46))}[variant]
    model = make_encoder(**overrides)
    reference = copy.deepcopy(model)
    side = (IMAGE, 168) if variant == "no_cross_window" else (IMAGE, IMAGE)
    images = torch.randn(2, 3, *side, dtype=torch.float64)
    lora_idx = None if variant == "no_adapters" else 5
    report = patch_model(model, backend="torch")
    assert report.rules["textmonkey_encoder"] == 1
    counts = count_calls(model)
    with torch.no_grad():
        expected = reference.encode(None, lora_idx=lora_idx, input_image=images)
        got = model.encode(None, lora_idx=lora_idx, input_image=images)
    assert got.shape == expected.shape and rel_err(got, expected) <= 1e-12
    assert counts["blocks"][0] == LAYERS
    stitches = {"no_cross_window": 0, "stitch_first": 3}.get(variant, STITCHES)
    assert counts["cross_window"][0] == stitches
    if variant == "no_adapters":
        assert len(model.transformer.resblocks[0].mlp_lora) == 0 and "lora" not in " ".join(model.state_dict())
        with pytest.raises(ValueError, match="has 0 per-window adapters"):
            model.encode(None, lora_idx=0, input_image=images)


def test_three_by_three_windows_and_growth():
    """The tiny analog of a 1344x1344 TextMonkey (constructed at that size: a 12x12 patch grid, 9 windows): with
    4 adapters the per-window mode raises a ValueError naming the image and the counts (the original: an
    IndexError); grown to 9 adapters (both models, the patched one in place) it matches the reference."""
    model = make_encoder(image_size=[168, 168])
    reference = copy.deepcopy(model)
    images = torch.randn(2, 3, 168, 168, dtype=torch.float64)
    patch_model(model, backend="torch")
    with torch.no_grad():
        with pytest.raises(IndexError):
            reference.encode(None, lora_idx=4, input_image=images)
        with pytest.raises(ValueError, match=r"image 0 \(as every image of this call, 2\) has 9 windows \(3x3\).*"
                                             r"has 4 per-window adapters"):
            model.encode(None, lora_idx=4, input_image=images)
    for grown in (model, reference):
        report = grow_tile_adapters(grown, 9, init="nearest", old_grid=(2, 2), new_grid=(3, 3))
        assert report.num_adapters == 9 and report.modules == [""] and grown.lora_repeat_num == 9
        randomize_textmonkey_(grown, 0.0)  # the new adapters' lora_b are copies; make them differ
    model.load_state_dict(reference.state_dict())
    counts = count_calls(model)
    with torch.no_grad():
        got = model.encode(None, lora_idx=9, input_image=images)
        expected = reference.encode(None, lora_idx=9, input_image=images)
    assert got.shape == (2, 8 + 4, 32) and rel_err(got, expected) <= 1e-12
    assert counts["blocks"][0] == LAYERS


@pytest.mark.parametrize("problem", ["not_multiple", "other_size", "non_square"])
def test_sizes_the_original_cannot_run_raise_value_errors(problem):
    """What the original fails on (or silently mis-masks) is a ValueError before any work."""
    model = make_encoder()
    reference = copy.deepcopy(model)
    side = {"not_multiple": (IMAGE, 126), "other_size": (168, 168), "non_square": (IMAGE, 168)}[problem]
    images = torch.randn(1, 3, *side, dtype=torch.float64)
    with pytest.raises(RuntimeError), torch.no_grad():
        reference.encode(None, lora_idx=None, input_image=images)
    patch_model(model, backend="torch")
    message = {"not_multiple": "not a multiple of the 4x4-patch window", "other_size": "built for a 8x8 patch grid",
               "non_square": "square grids only"}[problem]
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model.encode(None, lora_idx=None, input_image=images)


# ---------------------------------------------------------------------------------------------------------
# Loading, the transformer's own calls, dropout
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train_jpeg"])
def test_encode_from_image_files(tmp_path, monkeypatch, training):
    """Paths through PIL and ``image_transform``; in training the JPEG re-encoding draws its quality from Python's
    ``random`` exactly as the original (same seed, same images)."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    names = ["a.png", "b.jpg"]
    for name, (h, w) in zip(names, [(150, 130), (90, 200)]):
        Image.fromarray(np.random.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(name)
    model = make_encoder().train(training)
    reference = copy.deepcopy(model)
    patch_model(model, backend="torch")
    with torch.no_grad():
        random.seed(7)
        expected = reference.encode(names, lora_idx=4)
        random.seed(7)
        got = model.encode(names, lora_idx=4)
    assert rel_err(got, expected) <= 1e-12
    with pytest.raises(ValueError, match="image_paths must be a non-empty list"):
        model.encode("a.png")


def test_direct_transformer_calls():
    """The patched ``transformer`` keeps the original's call: a nested window list (returned, the same list
    object, windows written back) with a stitch on the given ``image_size``, and a tensor (plain, no adapter)."""
    model = make_encoder()
    reference = copy.deepcopy(model)
    patch_model(model, backend="torch")
    windows = [[torch.randn(16, 3, 16, dtype=torch.float64) for _ in range(2)] for _ in range(2)]
    with torch.no_grad():
        expected = reference.transformer([list(row) for row in windows], lora_idx=2, image_size=(8, 8))
        given = [list(row) for row in windows]
        got = model.transformer(given, lora_idx=2, image_size=(8, 8))
        assert got is given
        for i in range(2):
            for j in range(2):
                assert got[i][j].shape == (16, 3, 16) and rel_err(got[i][j], expected[i][j]) <= 1e-12
        plain = torch.randn(25, 2, 16, dtype=torch.float64)
        assert rel_err(model.transformer(plain, lora_idx=3), reference.transformer(plain, lora_idx=3)) <= 1e-12
        with pytest.raises(ValueError, match=r"image_size=\(64, 64\) is not the stitched grid 8x8"):
            model.transformer([list(row) for row in windows], lora_idx=2)


def test_lora_dropout_in_training_runs_and_trains():
    """With the release's LoRA dropout (0.05) and the cross-window MLP's, a training step runs: finite outputs,
    gradients for the adapters the windows use, none for the others (as the reference's loop)."""
    model = release_trainable_(make_encoder(lora_dropout=0.05, lora_repeat_num=6)).train()
    for module in model.modules():
        if isinstance(module, CrossWindowAttention):
            module.shift_attn.mlp.drop1.p = 0.05
    patch_model(model, backend="torch")
    out = model.encode(None, lora_idx=4, input_image=torch.randn(2, 3, IMAGE, IMAGE, dtype=torch.float64))
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    lists = model.transformer.resblocks[0].mlp_lora
    assert all(lists[k].lora_a.weight.grad is not None for k in range(4))
    assert all(lists[k].lora_a.weight.grad is None for k in (4, 5))


# ---------------------------------------------------------------------------------------------------------
# Unpatching and recognition
# ---------------------------------------------------------------------------------------------------------
def test_unpatch_restores_modules_forwards_and_state():
    model = make_encoder()
    images = torch.randn(2, 3, IMAGE, IMAGE, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        expected = model.encode(None, lora_idx=4, input_image=images)
    patch_model(model, backend="torch")
    assert list(model.state_dict()) == list(state) and dict(model.named_parameters()) == params
    assert rule_of(model) == "textmonkey_encoder" and rule_of(model.transformer) == "textmonkey_transformer"
    report = unpatch_model(model)
    assert report.rules["textmonkey_block"] == LAYERS and not is_patched(model)
    assert all(type(b) is VisualAttentionBlock for b in model.transformer.resblocks)
    assert not any(k in ("forward", "encode") or k.startswith("_monkey_kernels") for m in model.modules()
                   for k in m.__dict__)
    assert dict(model.named_parameters()) == params
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    counts = count_calls(model)
    with torch.no_grad():
        assert torch.equal(model.encode(None, lora_idx=4, input_image=images), expected)
    assert counts["blocks"][0] == LAYERS * 5


def test_pickle_and_deepcopy_of_a_patched_encoder(tmp_path):
    model = make_encoder()
    patch_model(model, backend="torch")
    images = torch.randn(1, 3, IMAGE, IMAGE, dtype=torch.float64)
    with torch.no_grad():
        expected = model.encode(None, lora_idx=4, input_image=images)
    torch.save(model, tmp_path / "m.pt")
    for clone in (torch.load(tmp_path / "m.pt", weights_only=False), copy.deepcopy(model)):
        assert is_patched(clone) and clone.__dict__["encode"].module is clone
        with torch.no_grad():
            assert torch.equal(clone.encode(None, lora_idx=4, input_image=images), expected)


def test_a_user_copy_that_changes_the_window_loop_is_skipped():
    """A TransformerBlock whose forward reads no ``window_pos`` / ``window_attention`` (it does something else with
    the windows) and a VisionTransformer whose ``encode`` has another signature are left alone, with reasons."""

    class NoCrossWindow(type(make_encoder().transformer)):
        def forward(self, x, attn_mask=None, lora_idx=None, image_size=(64, 64)):
            for r in self.resblocks:
                x = [[r(w, attn_mask=attn_mask, lora_idx=lora_idx) for w in row] for row in x]
            return x

    model = make_encoder()
    model.transformer.__class__ = NoCrossWindow
    with pytest.warns(UserWarning, match="nothing to patch"):
        report = patch_model(model, backend="torch", strict=False)
    reason = next(r for n, rule, r in report.skipped if rule == "textmonkey_transformer")
    assert "self.window_pos" in reason and "self.window_attention" in reason, reason
    assert all(type(b) is VisualAttentionBlock for b in model.transformer.resblocks)

    class OtherEncode(VisionTransformer):
        def encode(self, image_paths, lora_idx=None):
            return super().encode(image_paths, lora_idx=lora_idx)

    model = make_encoder()
    model.__class__ = OtherEncode
    report = patch_model(model, backend="torch")
    assert "textmonkey_encoder" not in report.rules and report.rules["textmonkey_transformer"] == 1
    reason = next(r for n, rule, r in report.skipped if rule == "textmonkey_encoder")
    assert reason.startswith("encode:") and "input_image" in reason, reason
    images = torch.randn(1, 3, IMAGE, IMAGE, dtype=torch.float64)
    reference = copy.deepcopy(model)
    unpatch_model(reference)
    with torch.no_grad():  # the unpatched encoder with the patched transformer: still one call per layer
        counts = count_calls(model)
        assert rel_err(model(images, lora_idx=4, add_window=True), reference(images, lora_idx=4, add_window=True)) \
            <= 1e-12
        assert counts["blocks"][0] == LAYERS


def test_benchmark_runs_and_counts_block_calls(tmp_path):
    """The benchmark script (one harness, one schema) on its quick case: outputs checked against the reference,
    block calls per encode 4 layers x (4 windows + 1 global view) vs one per layer."""
    import importlib
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.insert(0, root)
    bench = importlib.import_module("benchmarks.bench_textmonkey")
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--device", "cpu", "--quick", "--rounds", "1", "--backends", "torch", "--no-plot",
                             "--out", str(tmp_path / "textmonkey.json")])
        with pytest.raises(SystemExit):
            bench.main(["--device", "cpu", "--release", "--no-plot", "--out", str(tmp_path / "x.json")])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "textmonkey.json").exists() and result["bench"] == "textmonkey"
    rows = {(r["method"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(m, mode) for m in ("reference", "patched") for mode in ("inference", "train_step")}
    assert rows[("reference", "inference")]["block_calls_per_encode"] == 4 * 5
    assert rows[("patched", "inference")]["block_calls_per_encode"] == 4
    assert rows[("patched", "inference")]["rel_diff_to_reference"] < 1e-5


def test_window_rows_round_trip_and_checks():
    """Window-major rows (row k * B + b: window k of image b, tokens row-major) and back, against slicing."""
    from monkey_kernels.rules.textmonkey import WindowGrid, grid_to_window_rows, window_rows_to_grid

    grid = torch.randn(2, 5, 8, 12, dtype=torch.float64)
    layout = WindowGrid(2, 8, 12, 4)
    rows = grid_to_window_rows(grid, layout)
    assert rows.shape == (6 * 2, 16, 5) and layout.count == 6
    for k in range(6):
        i, j = divmod(k, 3)
        for b in range(2):
            window = grid[b, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(5, 16).t()
            assert torch.equal(rows[k * 2 + b], window)
    assert torch.equal(window_rows_to_grid(rows, layout), grid)
    with pytest.raises(ValueError, match="grid must be"):
        grid_to_window_rows(grid[:, :, :7], layout)
    with pytest.raises(ValueError, match="rows must be"):
        window_rows_to_grid(rows[1:], layout)
    with pytest.raises(ValueError, match="patches must be a positive int"):
        WindowGrid(2, 8, 12, 0)


def test_release_geometry_with_the_original_literals():
    """The release's geometry at a tiny width: 896x896 images, 448 px windows of 32x32 patches, the 448 px global
    view, 256 queries, the 12-token Swin window with shift 6 on the 64x64 grid (padded to 72: the -100 mask's
    quirks), the default window_pos (a stitch before block 2 of 3), the token filter keeping 512 of 1024. The
    patched model has NO window_patches / global_view_size attributes, as the public code: the rule's literals
    (32, 448) must be the original's."""
    visual = dict(image_size=[896, 896], patch_size=14, width=16, layers=3, heads=2, mlp_ratio=2.0, output_dim=32,
                  lora_repeat_num=4, add_window=True, use_global=True, resampler=True, r=512,
                  window_dim=(8, 8, 16, 16), window_head=(2, 2, 4, 4), pool_heads=2, perceiver_dim=8,
                  perceiver_dim_head=4, perceiver_heads=2, attn_lora_rank=4, mlp_lora_rank=8, lora_dropout=0.0)
    model = randomize_textmonkey_(VisionTransformer(**visual)).double().eval()
    assert model.transformer.window_attention[0].shift_attn.attn_mask.shape == (36, 144, 144)
    reference = copy.deepcopy(model)
    for module in (model, model.transformer):
        del module.window_patches
    del model.global_view_size
    images = torch.randn(1, 3, 896, 896, dtype=torch.float64)
    patch_model(model, backend="torch")
    counts = count_calls(model)
    with torch.no_grad():
        expected = reference.encode(None, lora_idx=4, input_image=images)
        got = model.encode(None, lora_idx=4, input_image=images)
    assert got.shape == expected.shape == (1, 512 + 256, 32) and rel_err(got, expected) <= 1e-12
    assert counts["blocks"][0] == 3 and counts["cross_window"][0] == 1


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_bf16_autocast_matches_the_reference_under_the_same_autocast(backend):
    """CPU bf16 autocast over fp32 weights (the ops cast as F.linear does): every layer's output has the reference's
    dtype, and the outputs and gradients of the release's trainable set are as close to the float64 reference as
    the unpatched model's under the same autocast. Without the token filter: its selection from bf16 similarities
    is discontinuous (near-ties flip under any rounding, the original's own included)."""
    if backend == "native":
        require_native()
    model = release_trainable_(make_encoder(torch.float32, resampler=False))
    reference = copy.deepcopy(model)
    reference64 = copy.deepcopy(model).double()
    images = torch.randn(2, 3, IMAGE, IMAGE)
    weights = torch.randn(2, 4 * 4 + 4, 32, dtype=torch.float64)
    reference64.train()
    expected, expected_grads = encode_and_backward(reference64, images.double(), 4, weights)
    patch_model(model, backend=backend)

    def run(encoder):
        seen: Dict[int, set] = {}
        handles = [b.register_forward_hook(lambda _m, _a, out, i=i: seen.setdefault(i, set()).add(out.dtype))
                   for i, b in enumerate(encoder.transformer.resblocks)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = encode_and_backward(encoder.train(), images, 4, weights)
        for handle in handles:
            handle.remove()
        return out, grads, seen

    base_out, base_grads, base_dtypes = run(reference)
    out, grads, dtypes = run(model)
    assert dtypes == base_dtypes and len(dtypes) == LAYERS, (dtypes, base_dtypes)
    assert out.dtype == base_out.dtype == torch.bfloat16
    assert rel_err(out, expected) <= 2 * rel_err(base_out, expected) + 1e-3
    assert_grads_close(grads, expected_grads, base_grads, floor=2e-3, factor=3.0)
