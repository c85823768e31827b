"""``MonkeyImageProcessor(tiling="textmonkey")``: the whole image resized like TextMonkey's ``image_transform``
(PIL's bicubic, to a grey level), the global view bit for bit as ``encode`` computes it, the window layout and the
placeholder count against the features of the TextMonkey double, options from ``config.visual``, save/load, bad
options."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers.textmonkey_double import (CLIP_STD, ImageTransform, VisionTransformer, randomize_textmonkey_,
                                       tiny_textmonkey_visual)
from monkey_kernels.processing import MonkeyImageProcessor


def smooth_uint8(h, w):
    """A natural-ish image: low-resolution noise, upsampled (PIL and torch agree to a grey level on it)."""
    low = torch.rand(1, 3, max(2, h // 6), max(2, w // 6), dtype=torch.float64)
    return (F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0] * 255).round().to(torch.uint8)


def tiny_visual(**overrides):
    visual = tiny_textmonkey_visual(**overrides)
    visual.pop("image_start_id")
    return visual


def test_release_options_from_the_config():
    release = dict(image_size=[896, 896], patch_size=14, resampler=True, r=512, use_global=True)
    proc = MonkeyImageProcessor.from_textmonkey_config(release)
    assert (proc.tiling, proc.resolution, proc.tile_size, proc.tokens_per_view) == ("textmonkey", (896, 896), 448,
                                                                                     256)
    layout = proc.layout(1000, 700)
    assert layout.grid == (2, 2) and layout.num_image_tokens == 768 and layout.adapter_ids == (0, 1, 2, 3, -1)
    big = MonkeyImageProcessor.from_textmonkey_config({**release, "image_size": [1344, 1344]})
    assert big.layout(50, 50).grid == (3, 3) and big.layout(50, 50).num_image_tokens == 768
    plain = MonkeyImageProcessor.from_textmonkey_config({**release, "resampler": False, "use_global": False})
    assert plain.layout(50, 50).num_image_tokens == 4 * 256


def test_pixels_match_the_original_transform_and_global_view():
    Image = pytest.importorskip("PIL.Image")
    proc = MonkeyImageProcessor.from_textmonkey_config(tiny_textmonkey_visual())
    images = [smooth_uint8(150, 130), smooth_uint8(90, 200)]
    pils = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
    out = proc(pils, return_tensors="pt")
    assert out["pixel_values"].shape == (2, 3, 112, 112) and out["global_pixel_values"].shape == (2, 3, 56, 56)
    for other in (images, [im.permute(1, 2, 0).numpy() for im in images]):  # tensors, numpy: the same pixels
        assert torch.equal(proc(other, return_tensors="pt")["pixel_values"], out["pixel_values"])
    expected = torch.stack([ImageTransform([112, 112])(pil) for pil in pils]).double()
    # torch's uint8 bicubic is PIL's algorithm; Pillow 13 runs its two passes in another order for some shapes,
    # which moves a few pixels by a grey level or two (see the image processor's docstring)
    level = 1.0 / 255 / min(CLIP_STD)
    diff = (out["pixel_values"].double() - expected).abs()
    assert diff.max() <= 2.01 * level and diff.mean() <= 0.15 * level, (float(diff.max() / level),
                                                                        float(diff.mean() / level))
    # encode's global view is F.interpolate of the normalised whole image, without antialiasing: bit for bit
    assert torch.equal(out["global_pixel_values"],
                       F.interpolate(out["pixel_values"], size=(56, 56), mode="bicubic"))
    assert out["adapter_ids"].tolist() == [0, 1, 2, 3, -1] * 2 and out["grids"].tolist() == [[2, 2]] * 2
    assert out["views_per_image"].tolist() == [5, 5] and out["num_image_tokens"].tolist() == [12, 12]


@pytest.mark.parametrize("overrides", [dict(), dict(resampler=False), dict(use_global=False),
                                       dict(image_size=[168, 168])], ids=["release", "no_filter", "no_global", "3x3"])
def test_num_image_tokens_match_encode(overrides):
    """The processor's pixels go straight into ``encode(None, input_image=...)``; its feature count per image is the
    processor's ``num_image_tokens`` (the span the language model reserves)."""
    visual = tiny_visual(lora_repeat_num=9, **overrides)
    model = randomize_textmonkey_(VisionTransformer(**visual)).eval()
    proc = MonkeyImageProcessor.from_textmonkey_config(visual)
    out = proc([torch.rand(3, 70, 90), torch.rand(3, 120, 60)], return_tensors="pt")
    with torch.no_grad():
        features = model.encode(None, lora_idx=9, input_image=out["pixel_values"])
    assert features.shape[:2] == (2, int(out["num_image_tokens"][0]))
    assert out["num_image_tokens"].tolist() == [features.shape[1]] * 2
    assert ("global_pixel_values" in out) == visual["use_global"]


def test_save_load_round_trip(tmp_path):
    from transformers import AutoImageProcessor

    proc = MonkeyImageProcessor.from_textmonkey_config(tiny_textmonkey_visual())
    proc.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, MonkeyImageProcessor) and loaded.to_dict() == proc.to_dict()
    image = torch.rand(3, 40, 50)
    assert torch.equal(loaded(image)["pixel_values"], proc(image)["pixel_values"])


@pytest.mark.parametrize("options,match", [
    (dict(tiling="textmonkey", resolution=None), "multiples of tile_size=448"),
    (dict(tiling="textmonkey", resolution=(896, 900)), "multiples of tile_size=448"),
    (dict(tiling="textmonkey", resolution=(448, 448), resampler_tokens=512), "resampler_tokens=512 exceeds the 256"),
    (dict(resampler_tokens=0), "resampler_tokens must be a positive int"),
    (dict(use_global_view=1), "use_global_view must be a bool"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        MonkeyImageProcessor(**options)


def test_an_int_image_size_is_refused():
    """TextMonkey's Resize(int) keeps the aspect ratio: a non-square image its encoder cannot run."""
    with pytest.raises(ValueError, match=r"must be \[height, width\]"):
        MonkeyImageProcessor.from_textmonkey_config(dict(image_size=896, resampler=True, r=512, use_global=True))
    with pytest.raises(ValueError, match="config.visual mapping"):
        MonkeyImageProcessor.from_textmonkey_config([896, 896])


def test_pixel_budget_then_the_whole_image_resize():
    """``image_max_pixels`` (LLaMA-Factory's budget, a real resize first), then the resize to the model's size."""
    from monkey_kernels.processing.image_processing_monkey import _resize_pil_like

    proc = MonkeyImageProcessor.from_textmonkey_config(tiny_textmonkey_visual(), image_max_pixels=56 * 56)
    image = smooth_uint8(120, 90)
    out = proc(image, return_tensors="pt")
    budgeted = _resize_pil_like(image[None], 64, 48)  # sqrt(3136 / 10800) * (90, 120) -> (48, 64), int()
    plain = MonkeyImageProcessor.from_textmonkey_config(tiny_textmonkey_visual())
    assert torch.equal(out["pixel_values"], plain(budgeted[0], return_tensors="pt")["pixel_values"])
    assert proc.layout(90, 120).budget_width == 48 and proc.layout(90, 120).budget_height == 64
